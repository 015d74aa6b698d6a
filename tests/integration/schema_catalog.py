"""What a schema holds, read from PostgreSQL's catalogs, for comparing two databases.

:func:`snapshot` lists every table's columns (position, type, nullability, default,
identity, generation, collation), constraints, indexes and every sequence with its
parameters and owner column, as plain tuples; :func:`differences` lists what one
snapshot has that the other lacks.  Names of the schema itself do not appear, so a
``public`` schema can be compared with a ``celery`` one.

:func:`create_with_libraries` has kombu's SQLAlchemy transport and Celery's database
result backend create their own tables, in a fresh interpreter (``python -m
tests.integration.schema_catalog URL [SCHEMA]``) so the class-level table settings
Celery changes never leak into the test process.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection

from tests._rig.postgres import render

ROOT = Path(__file__).resolve().parents[2]

Snapshot = dict[str, list[tuple[Any, ...]]]

_RELATIONS = sa.text(
    """
    SELECT c.relname, c.relkind, c.relpersistence
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = :schema AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
      AND NOT (c.relname = ANY(:exclude))
    """
)
_COLUMNS = sa.text(
    """
    SELECT c.relname,
           row_number() OVER (PARTITION BY c.oid ORDER BY a.attnum) AS position,
           a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
           pg_get_expr(d.adbin, d.adrelid), a.attidentity, a.attgenerated,
           CASE WHEN a.attcollation <> t.typcollation THEN co.collname END
    FROM pg_attribute a
    JOIN pg_class c ON c.oid = a.attrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace
    JOIN pg_type t ON t.oid = a.atttypid
    LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
    LEFT JOIN pg_collation co ON co.oid = a.attcollation
    WHERE n.nspname = :schema AND c.relkind IN ('r', 'p') AND a.attnum > 0
      AND NOT a.attisdropped AND NOT (c.relname = ANY(:exclude))
    """
)
_CONSTRAINTS = sa.text(
    """
    SELECT c.relname, k.conname, k.contype, pg_get_constraintdef(k.oid),
           k.condeferrable, k.condeferred, k.convalidated
    FROM pg_constraint k
    JOIN pg_class c ON c.oid = k.conrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = :schema AND NOT (c.relname = ANY(:exclude))
    """
)
_INDEXES = sa.text(
    """
    SELECT t.relname, i.relname, x.indisunique, x.indisprimary,
           regexp_replace(pg_get_indexdef(x.indexrelid), ' ON \\S+ ', ' ON ')
    FROM pg_index x
    JOIN pg_class i ON i.oid = x.indexrelid
    JOIN pg_class t ON t.oid = x.indrelid
    JOIN pg_namespace n ON n.oid = t.relnamespace
    WHERE n.nspname = :schema AND NOT (t.relname = ANY(:exclude))
    """
)
_SEQUENCES = sa.text(
    """
    SELECT c.relname, format_type(s.seqtypid, NULL), s.seqstart, s.seqmin, s.seqmax,
           s.seqincrement, s.seqcycle, s.seqcache, owner.relname, owner_col.attname
    FROM pg_sequence s
    JOIN pg_class c ON c.oid = s.seqrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace
    LEFT JOIN pg_depend d
      ON d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype IN ('a', 'i')
         AND d.refclassid = 'pg_class'::regclass
    LEFT JOIN pg_class owner ON owner.oid = d.refobjid
    LEFT JOIN pg_attribute owner_col
      ON owner_col.attrelid = d.refobjid AND owner_col.attnum = d.refobjsubid
    WHERE n.nspname = :schema
    """
)
_QUERIES = {
    "relations": _RELATIONS,
    "columns": _COLUMNS,
    "constraints": _CONSTRAINTS,
    "indexes": _INDEXES,
    "sequences": _SEQUENCES,
}


def snapshot(
    conn: Connection, schema: str = "public", *, exclude: tuple[str, ...] = ()
) -> Snapshot:
    """Everything :data:`_QUERIES` reads about ``schema``, ignoring tables in ``exclude``."""
    params = {"schema": schema, "exclude": list(exclude)}
    return {
        kind: sorted(tuple(row) for row in conn.execute(query, params))
        for kind, query in _QUERIES.items()
    }


def differences(expected: Snapshot, actual: Snapshot) -> list[str]:
    """One line per row one snapshot has and the other lacks (empty when equal)."""
    lines = []
    for kind in _QUERIES:
        want, got = set(expected[kind]), set(actual[kind])
        lines += [f"{kind}: missing {row}" for row in sorted(want - got)]
        lines += [f"{kind}: unexpected {row}" for row in sorted(got - want)]
    return lines


def create_with_libraries(url: URL, schema: str | None = None) -> str:
    """Have kombu and Celery create their tables in ``url`` (``schema``: where they point).

    Returns the process's output: the kombu and Celery versions used.
    """
    command = [sys.executable, "-m", __name__, render(url)]
    if schema is not None:
        command.append(schema)
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _main(argv: list[str]) -> None:
    import celery  # noqa: PLC0415 (only the subprocess needs them)
    import kombu  # noqa: PLC0415
    from celery import Celery  # noqa: PLC0415

    url = argv[0]
    schema = argv[1] if len(argv) > 1 else None
    # kombu has no schema setting: point its engine at the schema by translation.
    translate = {"schema_translate_map": {None: schema}}
    options = {} if schema is None else {"execution_options": translate}
    with kombu.Connection(f"sqla+{url}", transport_options=options) as connection:
        channel: Any = connection.default_channel
        channel.session.close()  # opening it runs kombu's metadata.create_all()
    app = Celery("schema_catalog", set_as_current=False)
    app.conf.update(
        result_backend=f"db+{url}",
        result_extended=True,
        database_table_schemas={"task": schema, "group": schema} if schema else {},
    )
    app.backend.ResultSession().close()  # runs Celery's create_all() and column check
    print(f"kombu {kombu.__version__}, celery {celery.__version__}")


if __name__ == "__main__":
    _main(sys.argv[1:])
