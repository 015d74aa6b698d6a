"""Reading a row-level security policy's expression as PostgreSQL prints it.

:func:`pins_tenant` tells whether an expression limits rows to the tenant the
setting names.  It reads text (``pg_get_expr``'s output), keeping track of
parentheses, string literals and quoted names; it does not prove an arbitrary
expression safe.  :mod:`tenant_celery.audit` uses it on every policy.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

__all__ = ["pins_tenant"]


def pins_tenant(expression: str | None, setting: str, quoted_column: str) -> bool:
    """Whether a policy expression, as PostgreSQL prints it, pins rows to the tenant.

    It must be ``column = <right>`` (alone or AND-ed with other terms, never
    OR-ed) where ``<right>`` reads the setting and does not name the column
    (``COALESCE(<setting>, tenant_id)`` would match every row when unset).
    """
    if expression is None:
        return False
    whole = _unwrap(expression)
    if len(_split_top_level(whole, "OR")) > 1:
        return False
    reads = f"current_setting('{setting}'"
    for term in _split_top_level(whole, "AND"):
        left, equals, right = _unwrap(term).partition(" = ")
        if (
            equals
            and _unwrap(left) == quoted_column
            and reads in right
            and not re.search(rf"(?<![\w\"$.]){re.escape(quoted_column)}(?![\w\"$])", right)
        ):
            return True
    return False


def _outside_quotes(expression: str) -> Iterator[tuple[int, int]]:
    """Yield ``(index, depth)`` for each character outside string literals and quoted
    names, ``depth`` counting the parentheses open before it."""
    depth, quote = 0, ""
    for index, char in enumerate(expression):
        if quote:
            quote = "" if char == quote else quote  # a doubled quote closes and reopens
            continue
        if char in "'\"":
            quote = char
            continue
        if char == ")":
            depth -= 1
        yield index, depth
        if char == "(":
            depth += 1


def _split_top_level(expression: str, keyword: str) -> list[str]:
    """Split at `` keyword `` where no parenthesis is open."""
    separator = f" {keyword} "
    cuts = [
        i
        for i, depth in _outside_quotes(expression)
        if depth == 0 and expression.startswith(separator, i)
    ]
    bounds = [0, *(c + len(separator) for c in cuts)]
    ends = [*cuts, len(expression)]
    return [expression[b:e] for b, e in zip(bounds, ends, strict=True)]


def _unwrap(expression: str) -> str:
    """Strip whitespace and the parentheses that enclose the whole expression."""
    expression = expression.strip()
    while expression.startswith("("):
        closing = next(
            (i for i, depth in _outside_quotes(expression) if depth == 0 and i > 0), None
        )
        if closing != len(expression) - 1:
            break
        expression = expression[1:-1].strip()
    return expression
