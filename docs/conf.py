"""Sphinx configuration for the tenant-celery documentation."""

from __future__ import annotations

import ast
import importlib.util
import pkgutil
import sys
from pathlib import Path

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.pycode import ModuleAnalyzer

import tenant_celery

# The charts extension (docs/_ext) formats numbers with the benchmarks' own code.
sys.path.insert(0, str(Path(__file__).resolve().parent / "_ext"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

project = "tenant-celery"
author = "tenant-celery developers"
copyright = "tenant-celery developers"
release = tenant_celery.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "benchmark_charts",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_tools"]  # _tools: scripts that make files for the docs
nitpicky = False
# Smart quotes stay on (typographic quotes, and the en dash of "name -- text" in
# field lists), so a command-line flag must be code, never prose: "--flag" in
# prose becomes an en dash. tests/docs_site/test_built_docs.py fails on any flag
# of the sources that became a dash.
smartquotes = True

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
python_maximum_signature_line_length = 88
autodoc_type_aliases = {"TenantIdParser": "tenant_celery.TenantIdParser"}

napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "furo"
html_title = f"tenant-celery {release}"
html_static_path = ["_static"]
html_css_files = ["benchmarks.css"]


def _docstring_where_defined(
    app: Sphinx, what: str, name: str, obj: object, options: object, lines: list[str]
) -> None:
    """Give a constant documented under its re-exported name the docstring
    written beside its definition.

    Autodoc looks for a variable's docstring in the module it is documented
    in (``tenant_celery``), finds none there and falls back to the docstring
    of the value's type (``str``).
    """
    if what != "data" or not name.startswith("tenant_celery."):
        return
    module_name, _, attr = name.rpartition(".")
    for defining in sorted(sys.modules):
        if not defining.startswith("tenant_celery.") or defining == module_name:
            continue
        if getattr(sys.modules[defining], attr, _MISSING) is not obj:
            continue
        docs = ModuleAnalyzer.for_module(defining).find_attr_docs()
        if ("", attr) in docs:
            lines[:] = list(docs["", attr])
            return


_MISSING = object()


def _unparametrized_bases(
    app: Sphinx, name: str, obj: object, options: object, bases: list[type]
) -> None:
    """Show ``celery.app.task.Task`` rather than ``Task[_P, _R]`` as a base."""
    bases[:] = [getattr(base, "__origin__", base) for base in bases]


# Functions whose ``@overload`` stubs are for type checkers only: the page shows
# the one signature its autodoc directive gives (or the implementation's).
_ONE_SIGNATURE = {"tenant_celery.task": ("tenant_task",)}


def _drop_overloads(app: Sphinx) -> None:
    """Hide the overloads of :data:`_ONE_SIGNATURE` from autodoc, which would
    otherwise show every overload instead of any signature it is given."""
    for module, names in _ONE_SIGNATURE.items():
        analyzer = ModuleAnalyzer.for_module(module)  # cached: autodoc reuses it
        analyzer.analyze()
        for name in names:
            analyzer.overloads.pop(name, None)


def _public_modules() -> list[str]:
    """``tenant_celery`` and every module under it with no ``_``-prefixed part."""
    found = ["tenant_celery"]
    for info in pkgutil.walk_packages(tenant_celery.__path__, "tenant_celery."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            found.append(info.name)
    return found


def _home(module: str, name: str) -> str:
    """Where ``module.name`` is defined: ``from .x import name`` followed to ``x``."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return f"{module}.{name}"
    package = module if spec.submodule_search_locations else module.rpartition(".")[0]
    for node in ast.parse(Path(spec.origin).read_text(encoding="utf-8")).body:
        if not isinstance(node, ast.ImportFrom):
            continue
        for alias in node.names:
            if (alias.asname or alias.name) != name:
                continue
            source = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            if source == "tenant_celery" or source.startswith("tenant_celery."):
                return _home(source, alias.name)
            return f"{module}.{name}"
    return f"{module}.{name}"


def _public_names_by_home() -> dict[str, set[str]]:
    """Every ``module.name`` of a public module's ``__all__``, grouped by the
    name's definition."""
    by_home: dict[str, set[str]] = {}
    for module in _public_modules():
        try:
            public = getattr(importlib.import_module(module), "__all__", ())
        except Exception:  # Alembic's env.py runs under Alembic only: no names of its own
            continue
        for name in public:
            by_home.setdefault(_home(module, name), set()).add(f"{module}.{name}")
    return by_home


_BY_HOME: dict[str, set[str]] = {}


def _alias_reexports(app: Sphinx, doctree: nodes.document) -> None:
    """Let every public name of an object documented once resolve to its entry.

    ``tenant_celery.tenant_context`` is also ``tenant_celery.context.tenant_context``;
    the page documents one of them, and a cross-reference to any of them (and
    ``objects.inv``) finds that entry, as ``:canonical:`` does for classes.
    """
    if not _BY_HOME:
        _BY_HOME.update(_public_names_by_home())
    domain = app.env.get_domain("py")
    documented = getattr(domain, "objects", {})
    here = [
        (name, entry)
        for name, entry in list(documented.items())
        if entry.docname == app.env.docname and not entry.aliased
    ]
    for name, entry in here:
        # ``module.first.rest``: ``first`` a name of ``module``, ``rest`` a member
        # of it (a class's method) or nothing.
        parts = name.split(".")
        modules = [i for i in range(1, len(parts)) if ".".join(parts[:i]) in sys.modules]
        if not modules or not name.startswith("tenant_celery"):
            continue
        cut = modules[-1]
        module, first, rest = ".".join(parts[:cut]), parts[cut], parts[cut + 1 :]
        for other in sorted(_BY_HOME.get(_home(module, first), ())):
            alias = ".".join([other, *rest])
            if alias not in documented:
                domain.note_object(alias, entry.objtype, entry.node_id, aliased=True)


def setup(app: Sphinx) -> None:
    app.connect("autodoc-process-docstring", _docstring_where_defined)
    app.connect("autodoc-process-bases", _unparametrized_bases)
    app.connect("builder-inited", _drop_overloads)
    app.connect("doctree-read", _alias_reexports)
