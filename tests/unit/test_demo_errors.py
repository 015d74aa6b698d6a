"""The demo's own failures: a clear message when the embedded server's extra is missing."""

from __future__ import annotations

import io
import sys

import pytest

from tenant_celery.demo import DemoUsageError, _Cleanup, _import_pgserver, _Progress


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
