"""The API reference covers the whole public API, checked on a real build of the docs.

The rule: every public module (``tenant_celery`` and each module under it with no
``_``-prefixed part) is a ``py:module`` entry of the build's ``objects.inv``, and
every name in a public module's ``__all__`` is an entry under ``<module>.<name>``,
for ``tenant_celery`` itself ``tenant_celery.<name>``. A name that several modules
export (``tenant_celery.tenant_task`` is ``tenant_celery.task.tenant_task``) is
documented once; ``docs/conf.py`` enters its other names as aliases of that entry,
so cross-references may use any of them.

The build is the session's ``docs_html`` (``tests/docs_site/conftest.py``).
"""

from __future__ import annotations

import ast
import importlib.util
import pkgutil
import posixpath
import re
from pathlib import Path

import pytest

import tenant_celery

ROOT = Path(__file__).resolve().parents[2]

#: Public modules that their tool runs rather than imports: documented as modules,
#: with no names of their own (Alembic's environment script).
RUN_NOT_IMPORTED = frozenset({"tenant_celery.migrations.env"})


def public_modules() -> list[str]:
    modules = ["tenant_celery"]
    for info in pkgutil.walk_packages(tenant_celery.__path__, "tenant_celery."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            modules.append(info.name)
    return sorted(modules)


def public_names(module: str) -> list[str]:
    """``<module>.<name>`` for each name of the module's ``__all__``, read from its
    source: importing every module here would run their import-time work (the
    demo's worker app installs its metrics) in the test process."""
    if module in RUN_NOT_IMPORTED:
        return []
    spec = importlib.util.find_spec(module)
    assert spec is not None, module
    assert spec.origin is not None, module
    tree = ast.parse(Path(spec.origin).read_text(), spec.origin)
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [
            "__all__"
        ]:
            return [f"{module}.{name}" for name in ast.literal_eval(node.value)]
    pytest.fail(f"{module} ({spec.origin}) has no __all__ = [...]")


@pytest.fixture(scope="module")
def inventory(docs_html: Path) -> dict[str, set[str]]:
    """``objects.inv`` as role (``py:function``...) -> names."""
    from sphinx.util.inventory import InventoryFile  # noqa: PLC0415 (a dev-only tool)

    with (docs_html / "objects.inv").open("rb") as stream:
        loaded = InventoryFile.load(stream, "", posixpath.join)
    return {role: set(entries) for role, entries in loaded.items()}


def python_entries(inventory: dict[str, set[str]]) -> set[str]:
    return {name for role, names in inventory.items() if role.startswith("py:") for name in names}


def test_the_rule_sees_the_whole_package() -> None:
    modules = public_modules()
    assert {"tenant_celery", "tenant_celery.task", "tenant_celery.migrations"} <= set(modules)
    assert {"tenant_celery.testing", "tenant_celery.demo.app"} <= set(modules)
    assert not [m for m in modules if "._" in m]
    assert len(public_names("tenant_celery")) == len(tenant_celery.__all__) >= 40


def test_every_public_module_is_documented(inventory: dict[str, set[str]]) -> None:
    missing = sorted(set(public_modules()) - inventory.get("py:module", set()))
    assert not missing, f"public modules with no py:module entry in the docs: {missing}"


def test_every_name_of_tenant_celery_is_documented(inventory: dict[str, set[str]]) -> None:
    documented = python_entries(inventory)
    missing = [name for name in public_names("tenant_celery") if name not in documented]
    assert not missing, f"names of tenant_celery.__all__ missing from objects.inv: {missing}"


def test_every_name_of_every_public_module_is_documented(inventory: dict[str, set[str]]) -> None:
    documented = python_entries(inventory)
    missing = [
        name
        for module in public_modules()
        for name in public_names(module)
        if name not in documented
    ]
    assert not missing, f"names of public modules' __all__ missing from objects.inv: {missing}"


def test_tenant_task_shows_one_signature(docs_html: Path) -> None:
    page = (docs_html / "reference" / "api.html").read_text(encoding="utf-8")
    signatures = re.findall(
        r'<span class="pre">tenant_task</span></span><span class="sig-paren">\(', page
    )
    assert len(signatures) == 1, "tenant_task should render as one signature, not its overloads"
    assert 'id="tenant_celery.tenant_task"' in page
