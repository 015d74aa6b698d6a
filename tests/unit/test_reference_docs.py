"""The reference pages list exactly what the code has: settings, exceptions and the
audit's problem codes."""

from __future__ import annotations

import re
from pathlib import Path

from tenant_celery import audit, errors

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "src" / "tenant_celery"
REFERENCE = ROOT / "docs" / "reference"


def settings_read_by_the_code() -> set[str]:
    names: set[str] = set()
    for path in SOURCE.rglob("*.py"):
        names.update(re.findall(r"\bsetting\(\s*\w+,\s*\"(\w+)\"", path.read_text()))
    return names


def test_every_setting_the_code_reads_is_in_the_configuration_reference() -> None:
    read = settings_read_by_the_code()
    assert {"header", "guc", "monitor_port", "monitor_host", "database_url"} <= read
    page = (REFERENCE / "configuration.md").read_text()
    rows = re.findall(r"^\| `tenant_celery_(\w+)` \| `TENANT_CELERY_(\w+)` \|", page, re.M)
    assert all(key.upper() == env for key, env in rows), rows
    assert {key for key, _ in rows} == read


def test_every_exception_is_in_the_exceptions_reference() -> None:
    page = (REFERENCE / "exceptions.md").read_text()
    documented = re.findall(r"\.\. autoexception:: tenant_celery\.(\w+)", page)
    assert sorted(documented) == sorted(errors.__all__)
    assert ".. automodule:: tenant_celery.errors" in page  # the hierarchy, from errors.py
    for name in errors.__all__:
        drawn = re.search(rf"^\s+(?:[│ ]*[├└]── )?{name}\b", errors.__doc__ or "", re.M)
        assert drawn, f"{name} is missing from the hierarchy drawn in errors.py"


def test_every_problem_code_is_in_the_audit_reference() -> None:
    codes = {
        getattr(audit, name)
        for name in audit.__all__
        if name.isupper() and isinstance(getattr(audit, name), str)
    }
    assert len(codes) == len([n for n in audit.__all__ if n.isupper()])  # no two share a code
    page = (REFERENCE / "rls.md").read_text()
    rows = re.findall(r"^\| `([a-z_]+)` \| [^|]+ \| [^|]+ \|$", page, re.M)
    assert sorted(rows) == sorted(codes)
    # Every code named as a constant is that constant's name in upper case.
    for code in codes:
        assert getattr(audit, code.upper()) == code
