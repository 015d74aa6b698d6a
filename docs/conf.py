"""Sphinx configuration for the tenant-celery documentation."""

from __future__ import annotations

import sys

from sphinx.application import Sphinx
from sphinx.pycode import ModuleAnalyzer

import tenant_celery

project = "tenant-celery"
author = "tenant-celery developers"
copyright = "tenant-celery developers"
release = tenant_celery.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]
nitpicky = False

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


def setup(app: Sphinx) -> None:
    app.connect("autodoc-process-docstring", _docstring_where_defined)
    app.connect("autodoc-process-bases", _unparametrized_bases)
