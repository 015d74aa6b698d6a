"""The demo's own failures: a clear message when the embedded server's extra is missing."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from tenant_celery.demo import (
    DemoUsageError,
    _Cleanup,
    _held_logs,
    _import_pgserver,
    _Interrupt,
    _Progress,
)


def test_missing_embedded_extra_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pgserver", None)  # makes the import fail
    # A usage error: tenant-celery demo exits 2 with it.
    with pytest.raises(DemoUsageError, match=r"'embedded' extra.*tenant-celery\[embedded\].*--dsn"):
        _import_pgserver()


def test_clean_up_names_only_what_was_started() -> None:
    out = io.StringIO()
    removed: list[str] = []
    nothing = _Cleanup()
    nothing.callback(removed.append, "engine")  # not something the user hears of
    nothing.close(_Progress(out))
    assert (out.getvalue(), removed) == ("", ["engine"])

    some = _Cleanup()
    some.callback(removed.append, "role")
    some.started("the role")
    some.callback(removed.append, "database")
    some.started("the database")
    some.close(_Progress(out))
    assert removed == ["engine", "database", "role"]
    lines = [line.split("] ", 1)[1] for line in out.getvalue().splitlines()]
    assert lines == ["removing the database and the role", "removed the database and the role"]


@pytest.mark.parametrize("interrupted", [False, True])
def test_the_embedded_server_s_log_is_dropped_only_when_interrupted(
    interrupted: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """pgserver logs a failed initdb at length; when the demo's Ctrl-C killed it, that is
    no news, and the demo says "interrupted" alone."""
    interrupt = _Interrupt()
    with (
        caplog.at_level(logging.INFO, logger="pgserver.test"),
        _held_logs("pgserver.test", interrupt),
    ):
        logging.getLogger("pgserver.test").error("Failed postgres command initdb")
        interrupt.requested = interrupted
        assert caplog.messages == []  # held meanwhile
    assert caplog.messages == ([] if interrupted else ["Failed postgres command initdb"])
