"""The demo's own failures: a clear message when the embedded server's extra is missing."""

from __future__ import annotations

import sys

import pytest

from tenant_celery.demo import DemoError, _import_pgserver


def test_missing_embedded_extra_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pgserver", None)  # makes the import fail
    with pytest.raises(DemoError, match=r"'embedded' extra.*tenant-celery\[embedded\].*--dsn"):
        _import_pgserver()
