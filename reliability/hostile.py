"""Hostile input refused: generated tenant ids, headers and setting names, each tried for real.

Values are generated with Hypothesis strategies (the same ones the property
tests in ``tests/property`` use): SQL-injection strings, quotes, NUL bytes and
other control characters, very long strings, unicode look-alikes (other
scripts' digits, full-width letters, zero-width and line-separator
characters), a valid id with one character changed, ``None``, numbers of
every kind, ``bytes``, lists, nested dicts, and ids of another type (a
``UUID`` where integers are expected, an integer where UUIDs are).  Each value
is tried in every place it can enter:

==================  =================================================================
category            what is tried
==================  =================================================================
``tenant_context``  ``with tenant_context(value)``
``parse:uuid``      :func:`~tenant_celery.parse_tenant_id` under each built-in parser
``parse:integer``   (:func:`~tenant_celery.uuid_tenant_id`,
``parse:slug``      :func:`~tenant_celery.integer_tenant_id`,
                    :func:`~tenant_celery.slug_tenant_id`)
``set_tenant_guc``  :func:`~tenant_celery.set_tenant_guc` in a transaction of the app
                    role, which then reads the row-level-security table
``tenant_session``  :func:`~tenant_celery.tenant_session`, whose block would read it
``task tenant_id``  ``tenant_id=value`` to a tenant task that would write a row:
                    ``apply_async`` (publish) and ``apply`` (eager)
``task header``     the tenant header of a message to that task: received as a worker
                    receives it (``Task.apply``, the worker's checks), and published
``setting name``    the GUC name given to ``set_tenant_guc``, ``bind_tenant_guc``,
                    ``tenant_session`` and the ``tenant_celery_guc`` setting
``header name``     the ``tenant_celery_header`` setting, read and used to publish
==================  =================================================================

A case passes when all of these hold:

* **refused with a clear error**: a :class:`~tenant_celery.TenantCeleryError`
  of the expected kind; its message is one printable line of at most
  :data:`MAX_MESSAGE` characters and, for tenant ids and headers, does not
  echo the value (a malformed id may be a secret pasted into the wrong
  field);
* **wrote nothing**: no row was added to the table (counted as the
  superuser), no message was published, no task body ran;
* **saw nothing**: every read made as the app role after the refusal, in
  the same transaction, returned no row, although the table holds rows of
  two tenants;
* **no SQL carries it**: every statement the app role's engine sent is one
  of the probe's own fixed statements (a refused value never reaches
  ``set_config``), and no statement's text contains the value.

``run(ctx)`` is the ``hostile`` part of ``python -m reliability``: 300 values
per category in a default run, 1,100 in a full one (11,000 cases), 30 in a
smoke run.  It then tries, through a signed and an unsigned real worker, the
routes by which Celery replays parts of a message (chain steps, callbacks,
errbacks, map/starmap items, ``for_each_tenant``, nested headers, chords):
see :mod:`reliability.routes`, whose cases count as hostile cases too.
"""

from __future__ import annotations

import contextlib
import decimal
import fractions
import logging
import math
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import hypothesis
import sqlalchemy as sa
from celery import Celery, Task
from celery.signals import before_task_publish
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

from tenant_celery import (
    ConfigurationError,
    InvalidTenantId,
    TenantCeleryError,
    TenantContextMissing,
    bind_tenant_guc,
    current_tenant,
    integer_tenant_id,
    parse_tenant_id,
    set_tenant_guc,
    set_tenant_id_parser,
    slug_tenant_id,
    tenant_context,
    tenant_rejected,
    tenant_session,
    tenant_task,
    uuid_tenant_id,
)
from tenant_celery.config import DEFAULT_GUC, DEFAULT_HEADER, guc_name, header_name
from tenant_celery.rls import enable_tenant_rls, grant_tenant_tables

__all__ = [
    "CATEGORIES",
    "MAX_MESSAGE",
    "TABLE",
    "CategoryResult",
    "HostileProbe",
    "Outcome",
    "hostile_header_names",
    "hostile_header_values",
    "hostile_setting_names",
    "hostile_tenant_ids",
    "json_hostile_header_values",
    "prepare_table",
    "run",
]

TABLE = "hostile_items"
"""The row-level-security table the probe reads and a refused task would write."""

SEEDED = ("1b6f3a52-7c0e-4e54-9d0f-5a1c2b3d4e01", "1b6f3a52-7c0e-4e54-9d0f-5a1c2b3d4e02")
"""Tenants whose rows are in :data:`TABLE`: what a leak would show."""
ROWS_PER_TENANT = 3
MAX_MESSAGE = 400
"""Longest error message accepted: a refusal must not carry a megabyte of input."""

VALID = {"uuid": SEEDED[0], "integer": "4096", "slug": "acme-shop_2"}


# ------------------------------------------------------------------------ strategies

# Characters no tenant id of any built-in parser may hold, setting names and
# header names neither: quoting, SQL, shell and format syntax, whitespace and
# control characters, and unicode that looks like (or is) a digit or letter.
_POISON = (
    "'\"`;\\\x00\x01\x08\x1b\x7f\n\r\t\x0b\x0c %$(){}[]<>=*|&!?#@~^,:/+."
    "\u00a0\u2028\u2029\u200b\ufeff\u202e"
    # accented letters; dotted, dotless, long-s and Kelvin look-alikes; Cyrillic, Greek
    "éüß\u0130\u0131\u017f\u212a\u0405\u043e\u0430\u0391中ف"
    "١٢٣۴߀०১๑𝟘𝟙０１ａｆＦ"  # other scripts' digits, mathematical and full-width forms
    "\ud800\U0001f600"  # a lone surrogate, an emoji
)
_SQL = (
    "' OR '1'='1",
    "' OR 1=1 --",
    "'; DROP TABLE hostile_items; --",
    "x'); SELECT set_config('app.current_tenant_id', '{other}', false); --",
    "{valid}' OR tenant_id IS NOT NULL --",
    "{valid}'; DELETE FROM hostile_items WHERE '1'='1",
    "{valid}; RESET ALL",
    "1; SELECT pg_sleep(10)",
    "' UNION SELECT tenant_id::text FROM hostile_items --",
    "$$; DELETE FROM hostile_items; $$",
    "E'\\x27'",
    "\\'; SET app.current_tenant_id TO '{other}'; --",
    "{valid}\x00{other}",
    "{valid}\n{other}",
    "{valid},{other}",
    "%s",
    "%(value)s",
    ":value",
    "$1",
    "/*",
    "*/ OR 1=1 /*",
    "{{}}",
    "${{jndi:ldap://127.0.0.1/a}}",
    "../../etc/passwd",
)


def _sql_injections(valid: str) -> st.SearchStrategy[str]:
    templates = [t.format(valid=valid, other=SEEDED[1]) for t in _SQL]
    return st.sampled_from(templates)


def _poisoned(valid: str, poison: str) -> st.SearchStrategy[str]:
    """``valid`` with one character replaced by, or one inserted from, ``poison``."""

    @st.composite
    def build(draw: st.DrawFn) -> str:
        char = draw(st.sampled_from(poison))
        index = draw(st.integers(0, len(valid)))
        replace = draw(st.booleans()) and index < len(valid)
        return valid[:index] + char + valid[index + replace :]

    return build()


def _with_poison(poison: str) -> st.SearchStrategy[str]:
    """Any text holding at least one character of ``poison``."""
    return st.tuples(st.text(max_size=40), st.sampled_from(poison), st.text(max_size=40)).map(
        "".join
    )


def _long(valid_char: str, poison: str) -> st.SearchStrategy[str]:
    """Strings of 64 to 20,000 characters, of one valid or poisoned character."""
    chars = st.sampled_from([valid_char, *poison[:8]])
    return st.tuples(chars, st.integers(64, 20_000)).map(lambda pair: pair[0] * pair[1])


def _containers(leaf: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(
        leaf,
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.tuples(children),
            st.dictionaries(st.text(max_size=10), children, max_size=4),
        ),
        max_leaves=8,
    ).filter(lambda value: isinstance(value, (list, tuple, dict)))


class _LooksLikeAnId:
    """An object whose text form is a valid id: ``str()`` must not be trusted."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"_LooksLikeAnId({self.text!r})"


def _other_types(parser: str) -> st.SearchStrategy[object]:
    valid = VALID[parser]
    numbers: list[st.SearchStrategy[Any]] = [
        st.floats(allow_nan=True, allow_infinity=True),
        st.complex_numbers(max_magnitude=1e6),
        st.decimals(allow_nan=True),
        st.fractions(),
        st.booleans(),
    ]
    if parser == "integer":  # only integers no bigint tenant id can be
        numbers.append(st.integers(max_value=0) | st.integers(min_value=2**63))
        numbers.append(st.just(decimal.Decimal(4096)) | st.just(4096.0))
        others = st.just(uuid.UUID(SEEDED[0])) | st.builds(uuid.uuid4)
    else:
        numbers.append(st.integers())
        others = st.just(uuid.UUID(SEEDED[0])) if parser == "slug" else st.nothing()
    leaf_ids = st.sampled_from([valid, *SEEDED])
    return st.one_of(
        st.none(),
        *numbers,
        others,
        st.binary(max_size=64),
        st.just(valid.encode()),
        st.just(bytearray(valid.encode())),
        st.just(memoryview(valid.encode())),
        _containers(leaf_ids | st.none() | st.integers()),
        st.frozensets(leaf_ids, min_size=1),
        st.just({"tenant_id": valid}),
        st.just({"tenant_id": {"tenant_id": valid}}),
        st.builds(_LooksLikeAnId, leaf_ids),
        st.just(object()),
        st.just(math.inf),
        st.just(fractions.Fraction(1, 3)),
    )


_PARSER_POISON = {
    # a UUID's text may hold hex digits and '-' only: everything else is poison
    "uuid": _POISON + "_ghijklmnopqrstuvwxyzGHXZ",
    "integer": _POISON + "-_abcdefxXe",
    "slug": _POISON + "ABCDEFZ",
}


def hostile_tenant_ids(parser: str = "uuid") -> st.SearchStrategy[object]:
    """Values that ``parser`` (``uuid``, ``integer`` or ``slug``) must refuse."""
    valid = VALID[parser]
    poison = _PARSER_POISON[parser]
    strings = [
        _sql_injections(valid),
        _poisoned(valid, poison),
        _with_poison(poison),
        _long({"uuid": "a", "integer": "9", "slug": "a"}[parser], poison),
        st.sampled_from(["", " ", "\x00", valid * 6, valid * 100, valid.upper() + "'"]),
    ]
    if parser == "uuid":
        strings.append(st.sampled_from(["{" + valid, valid + "}", "urn:" + valid[:-1]]))
        strings.append(st.text(alphabet="0123456789abcdef", max_size=31))
        strings.append(st.text(alphabet="0123456789abcdef", min_size=33, max_size=40))
    elif parser == "integer":
        strings.append(st.sampled_from(["0", "-1", "9223372036854775808", "1e3", "0x10"]))
        strings.append(st.text(alphabet="0123456789", min_size=20, max_size=40))
    else:
        strings.append(st.sampled_from(["_acme", "-acme", "Acme", "a" * 64]))
    return st.one_of(*strings, _other_types(parser))


def hostile_header_values() -> st.SearchStrategy[object]:
    """Values for the tenant header of a message (default parser): ids and ``None``."""
    return hostile_tenant_ids("uuid")


def json_hostile_header_values() -> st.SearchStrategy[object]:
    """Hostile header values a JSON message can carry (for real brokers and workers)."""
    text = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=40)
    poison = _PARSER_POISON["uuid"].replace("\ud800", "")
    leaf = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        _sql_injections(VALID["uuid"]),
        _poisoned(VALID["uuid"], poison),
        st.tuples(text, st.sampled_from(poison), text).map("".join),
    )
    return leaf | st.recursive(
        leaf,
        lambda children: (
            st.lists(children, max_size=3)
            | st.dictionaries(st.text(max_size=8), children, max_size=3)
        ),
        max_leaves=6,
    ).filter(lambda value: isinstance(value, (list, dict)))


def hostile_setting_names() -> st.SearchStrategy[object]:
    """PostgreSQL setting names to refuse (``None``, meaning the default, excluded)."""
    # '_' and '.' both belong in a valid name ("then.then" is one): the dotted
    # shapes a name must not have are listed below instead.
    poison = _POISON.replace("_", "").replace(".", "")
    return st.one_of(
        _poisoned(DEFAULT_GUC, poison),
        _with_poison(poison),
        st.sampled_from(
            [
                "",
                "app",
                "app.",
                ".current",
                "a.b.c",
                "app..current_tenant_id",
                "app.current_tenant_id.",
                "1app.tenant",
                "app.1tenant",
                "app.current_tenant_id'; DROP TABLE hostile_items; --",
                "app.current_tenant_id TO 'x'",
                "app.current_tenant_id = 'x'",
                "search_path",
                "role",
                "session_authorization",
                '"app"."current_tenant_id"',
                "app.current_tenant_id\x00",
                "app." + "x" * 60,
            ]
        ),
        st.tuples(st.sampled_from(["app.", "a" * 40 + "."]), st.integers(64, 5_000)).map(
            lambda pair: pair[0] + "x" * pair[1]
        ),
        st.integers(),
        st.binary(max_size=40),
        st.just(DEFAULT_GUC.encode()),
        st.just([DEFAULT_GUC]),
        st.just({"name": DEFAULT_GUC}),
        st.floats(),
        st.booleans(),
    )


_CELERY_HEADERS = (
    "id",
    "task",
    "headers",
    "correlation_id",
    "args",
    "kwargs",
    "retries",
    "eta",
    "tenant_signature",
    "x_correlation_id",
)


def hostile_header_names() -> st.SearchStrategy[object]:
    """Values of ``tenant_celery_header`` to refuse (``None``, meaning the default, excluded)."""
    poison = _POISON.replace("_", "")
    return st.one_of(
        _poisoned(DEFAULT_HEADER, poison.replace("\u00a0", "")),
        _with_poison(poison),
        st.sampled_from(_CELERY_HEADERS),
        st.sampled_from(["", "1tenant", "tenant-id", "tenant id", "tenant.id", "tenant_id;"]),
        st.tuples(st.sampled_from(poison[:6]), st.integers(64, 5_000)).map(
            lambda pair: "x" * pair[1] + pair[0]
        ),
        st.integers(),
        st.binary(max_size=20),
        st.just(DEFAULT_HEADER.encode()),
        st.just([DEFAULT_HEADER]),
        st.just({"name": DEFAULT_HEADER}),
        st.booleans(),
    )


# ---------------------------------------------------------------------------- table


def prepare_table(admin_engine: Engine, app_role: str) -> None:
    """Create :data:`TABLE` under the package's tenant policy, grant it to ``app_role``
    and seed :data:`ROWS_PER_TENANT` rows for each of :data:`SEEDED`."""
    with admin_engine.begin() as conn:
        conn.exec_driver_sql(
            f"CREATE TABLE {TABLE} ("
            " id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
            " tenant_id uuid NOT NULL,"
            " note text NOT NULL)"
        )
        enable_tenant_rls(conn, TABLE)
        grant_tenant_tables(conn, app_role, [TABLE])
        conn.execute(
            sa.text(f"INSERT INTO {TABLE} (tenant_id, note) VALUES (:tenant, 'seed')"),
            [{"tenant": tenant} for tenant in SEEDED for _ in range(ROWS_PER_TENANT)],
        )


# -------------------------------------------------------------------------- outcomes


@dataclass
class Outcome:
    """What one case showed."""

    category: str
    value: object
    refused: bool = True
    """Every attempt raised the expected error (set False by the first that did not)."""
    clear: bool = True
    wrote_nothing: bool = True
    saw_nothing: bool = True
    sql_clean: bool = True
    problems: list[str] = field(default_factory=list)
    rejections: list[str] = field(default_factory=list)
    """The reasons ``tenant_rejected`` was sent with during the case."""

    @property
    def ok(self) -> bool:
        return (
            self.refused
            and self.clear
            and self.wrote_nothing
            and self.saw_nothing
            and self.sql_clean
            and not self.problems
        )

    def problem(self, text: str) -> None:
        self.problems.append(text)

    def shown(self, limit: int = 60) -> str:
        """The value, abbreviated, for a report."""
        text = repr(self.value)
        return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} chars)"


@dataclass
class CategoryResult:
    """The counts of one category."""

    category: str
    tried: int = 0
    refused: int = 0
    wrote_nothing: int = 0
    saw_nothing: int = 0
    failed: list[Outcome] = field(default_factory=list)

    def add(self, outcome: Outcome) -> None:
        self.tried += 1
        self.refused += outcome.refused and outcome.clear
        self.wrote_nothing += outcome.wrote_nothing
        self.saw_nothing += outcome.saw_nothing and outcome.sql_clean
        if not outcome.ok:
            self.failed.append(outcome)


# ----------------------------------------------------------------------------- probe

_PROBE_SQL = (
    f"SELECT count(*) AS seen, current_setting('{DEFAULT_GUC}', true) AS setting FROM {TABLE}"
)
_WRITE_SQL = f"INSERT INTO {TABLE} (tenant_id, note) VALUES (:tenant, 'written by a task')"
_COUNT_SQL = f"SELECT count(*) FROM {TABLE}"
_NEUTRAL: tuple[object, ...] = (None, "", "\x00", 0, -1, 2**64, 1.5, b"", [], {}, True, object())


def _text_leaves(value: object, depth: int = 0) -> Iterator[str]:
    """The texts a message could echo ``value`` by."""
    if depth > 6:
        return
    if isinstance(value, str):
        yield value
    elif isinstance(value, (bytes, bytearray, memoryview)):
        yield bytes(value).decode("latin-1")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _text_leaves(key, depth + 1)
            yield from _text_leaves(item, depth + 1)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            yield from _text_leaves(item, depth + 1)
    else:
        with contextlib.suppress(Exception):
            yield str(value)
    with contextlib.suppress(Exception):
        yield repr(value)


class HostileProbe:
    """Tries hostile values against real PostgreSQL as the app role; one ``check_*``
    method per category, each returning an :class:`Outcome`.

    ``admin_engine`` counts rows as the superuser; ``app_engine`` connects as
    the app role (row-level security applies) and is only used by the probe.
    :data:`TABLE` must exist (:func:`prepare_table`).  Call :meth:`close` at
    the end.  Not thread-safe: it switches the process's tenant id parser.
    """

    def __init__(self, admin_engine: Engine, app_engine: Engine) -> None:
        self.admin_engine = admin_engine
        self.app_engine = app_engine
        self.sessions = sessionmaker(app_engine)
        self.statements: list[str] = []
        self.published = 0
        self.ran = 0
        self.rejections: list[str] = []
        event.listen(app_engine, "before_cursor_execute", self._record)
        before_task_publish.connect(self._count_publish, weak=False)
        tenant_rejected.connect(self._count_rejection, weak=False)
        self.app = Celery("reliability_hostile", broker="memory://", set_as_current=False)
        self.app.conf.update(task_always_eager=False, task_store_eager_result=False)
        probe = self

        @tenant_task(app=self.app, shared=False, name="reliability.hostile.write_note")
        def write_note(note: str = "hostile") -> int:
            probe.ran += 1
            with probe.app_engine.begin() as conn:
                set_tenant_guc(conn)
                conn.execute(sa.text(_WRITE_SQL), {"tenant": current_tenant()})
                return int(conn.execute(sa.text(_COUNT_SQL)).scalar_one())

        self.write_note = write_note
        self.rows = self._count_all()
        if self.rows != len(SEEDED) * ROWS_PER_TENANT:
            raise RuntimeError(f"{TABLE} holds {self.rows} rows, not the seeded ones")
        self._templates = self._neutral_messages()

    def close(self) -> None:
        event.remove(self.app_engine, "before_cursor_execute", self._record)
        before_task_publish.disconnect(self._count_publish)
        tenant_rejected.disconnect(self._count_rejection)
        self.app.close()

    # -- recording

    def _record(self, conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        self.statements.append(statement)

    def _count_publish(self, sender: object = None, **_: Any) -> None:
        if sender == self.write_note.name:
            self.published += 1

    def _count_rejection(self, sender: object = None, reason: str = "", **_: Any) -> None:
        if getattr(sender, "name", None) == self.write_note.name:
            self.rejections.append(reason)

    def _count_all(self) -> int:
        with self.admin_engine.connect() as conn:
            return int(conn.execute(sa.text(_COUNT_SQL)).scalar_one())

    def _read(self, conn: Connection | Session, outcome: Outcome) -> None:
        """Read the table in the refused attempt's transaction: nothing may be visible."""
        seen, setting = conn.execute(sa.text(_PROBE_SQL)).one()
        if seen:
            outcome.saw_nothing = False
            outcome.problem(f"the app role saw {seen} rows after the refusal")
        if setting not in (None, ""):
            outcome.saw_nothing = False
            outcome.problem("the tenant setting was set after the refusal")

    # -- one case

    @contextlib.contextmanager
    def _case(
        self, category: str, value: object, parser: Callable[[object], str] = uuid_tenant_id
    ) -> Iterator[Outcome]:
        outcome = Outcome(category, value)
        if current_tenant() is not None:
            raise RuntimeError("hostile cases must start outside any tenant")
        self.statements.clear()
        published, ran, rejections = self.published, self.ran, len(self.rejections)
        previous = set_tenant_id_parser(parser)
        try:
            yield outcome
        except Exception as exc:  # the probe's own step failed: a failure of the case
            outcome.problem(f"unexpected {type(exc).__name__} in the probe: {str(exc)[:200]}")
        finally:
            set_tenant_id_parser(previous)
        if current_tenant() is not None:
            outcome.problem("a tenant was left entered")
        if self.published != published:
            outcome.wrote_nothing = False
            outcome.problem("a message was published")
        if self.ran != ran:
            outcome.wrote_nothing = outcome.saw_nothing = False
            outcome.problem("the task body ran")
        rows = self._count_all()
        if rows != self.rows:
            outcome.wrote_nothing = False
            outcome.problem(f"the table holds {rows} rows, not {self.rows}")
            self.rows = rows
        self._check_sql(outcome)
        outcome.rejections = self.rejections[rejections:]

    def _check_sql(self, outcome: Outcome) -> None:
        texts = [t for t in _text_leaves(outcome.value) if len(t) >= 4]
        for statement in self.statements:
            if statement != _PROBE_SQL:
                outcome.sql_clean = False
                outcome.problem(f"SQL was sent: {statement[:80]!r}")
            if any(text in statement and text not in _PROBE_SQL for text in texts):
                outcome.sql_clean = False
                outcome.problem("the value is in the text of a statement")

    def _refused(
        self,
        outcome: Outcome,
        expected: tuple[type[TenantCeleryError], ...],
        attempt: Callable[[], object],
        *,
        may_echo: bool = False,
    ) -> None:
        """Make ``attempt``; it must raise one of ``expected`` with a clear message."""
        try:
            attempt()
        except TenantCeleryError as exc:
            if not isinstance(exc, expected):
                outcome.refused = False
                outcome.problem(f"refused with {type(exc).__name__}, not {expected[0].__name__}")
            self._check_message(outcome, str(exc), may_echo=may_echo)
        except Exception as exc:
            outcome.refused = False
            outcome.problem(f"{type(exc).__name__}, not a TenantCeleryError: {str(exc)[:120]!r}")
        else:
            outcome.refused = False
            outcome.problem("accepted")

    def _check_message(self, outcome: Outcome, message: str, *, may_echo: bool) -> None:
        if not message.isprintable():
            outcome.clear = False
            outcome.problem("the message holds control or invisible characters")
        if len(message) > MAX_MESSAGE:
            outcome.clear = False
            outcome.problem(f"the message is {len(message):,} characters long")
        if may_echo:
            return
        for text in _text_leaves(outcome.value):
            if len(text) >= 4 and text in message and text not in self._templates:
                outcome.clear = False
                outcome.problem("the message echoes the value")
                return

    def _neutral_messages(self) -> str:
        """Every message a refusal of a neutral value gives: text a hostile value may
        share with a message without being echoed by it."""
        messages = []
        for parser in (uuid_tenant_id, integer_tenant_id, slug_tenant_id):
            previous = set_tenant_id_parser(parser)
            try:
                for value in _NEUTRAL:
                    for attempt in (
                        lambda value=value: parse_tenant_id(value),
                        lambda value=value: Task.apply(
                            self.write_note, headers={DEFAULT_HEADER: value}, throw=True
                        ),
                    ):
                        try:
                            attempt()
                        except TenantCeleryError as exc:
                            messages.append(str(exc))
            finally:
                set_tenant_id_parser(previous)
        return "\n".join(messages)

    # -- the categories

    def check_tenant_context(self, value: object) -> Outcome:
        def enter() -> None:
            with tenant_context(value):
                pass

        with self._case("tenant_context", value) as outcome:
            self._refused(outcome, (InvalidTenantId,), enter)
        return outcome

    def check_parser(self, parser: str, value: object) -> Outcome:
        chosen = {"uuid": uuid_tenant_id, "integer": integer_tenant_id, "slug": slug_tenant_id}
        with self._case(f"parse:{parser}", value, chosen[parser]) as outcome:
            self._refused(outcome, (InvalidTenantId,), lambda: parse_tenant_id(value))
        return outcome

    def check_set_tenant_guc(self, value: object) -> Outcome:
        expected = (InvalidTenantId, TenantContextMissing)  # None: "the context's", none here
        with (
            self._case("set_tenant_guc", value) as outcome,
            self.app_engine.connect() as conn,
            conn.begin(),
        ):
            self._refused(outcome, expected, lambda: set_tenant_guc(conn, value))
            self._read(conn, outcome)
        return outcome

    def check_tenant_session(self, value: object) -> Outcome:
        expected = (InvalidTenantId, TenantContextMissing)

        def open_session() -> None:
            with tenant_session(self.sessions, value) as session:
                self._read(session, outcome)

        with self._case("tenant_session", value) as outcome:
            self._refused(outcome, expected, open_session)
        return outcome

    def check_task_argument(self, value: object) -> Outcome:
        task = self.write_note
        with self._case("task tenant_id", value) as outcome:
            self._refused(
                outcome, (InvalidTenantId,), lambda: task.apply_async(kwargs={"tenant_id": value})
            )
            self._refused(
                outcome,
                (InvalidTenantId,),
                lambda: task.apply(kwargs={"tenant_id": value}, throw=True),
            )
        return outcome

    def check_task_header(self, value: object) -> Outcome:
        task = self.write_note
        expected = (InvalidTenantId, TenantContextMissing)  # None: a message without a tenant
        headers = {DEFAULT_HEADER: value}
        with self._case("task header", value) as outcome:
            # As a worker receives it: the message's request, the task's own checks.
            self._refused(outcome, expected, lambda: Task.apply(task, headers=headers, throw=True))
            self._refused(outcome, expected, lambda: task.apply_async(headers=headers))
        if outcome.refused and outcome.rejections not in (["invalid"], ["missing"]):
            outcome.problem(f"tenant_rejected was sent with {outcome.rejections}, not once")
        return outcome

    def check_setting_name(self, value: object) -> Outcome:
        tenant = SEEDED[0]
        expected = (ConfigurationError,)

        def open_session() -> None:
            with tenant_session(self.sessions, tenant, setting=value) as session:  # type: ignore[arg-type]
                self._read(session, outcome)

        def configured() -> str:
            self.app.conf.tenant_celery_guc = value
            try:
                return guc_name(self.app)
            finally:
                self.app.conf.tenant_celery_guc = None

        with self._case("setting name", value) as outcome:
            with self.app_engine.connect() as conn, conn.begin():
                self._refused(
                    outcome,
                    expected,
                    lambda: set_tenant_guc(conn, tenant, setting=value),  # type: ignore[arg-type]
                    may_echo=True,
                )
                self._read(conn, outcome)
            unbind: list[Callable[[], None]] = []

            def bind() -> None:
                unbind.append(bind_tenant_guc(self.app_engine, setting=value))  # type: ignore[arg-type]

            try:
                self._refused(outcome, expected, bind, may_echo=True)
                self._refused(outcome, expected, open_session, may_echo=True)
                self._refused(outcome, expected, configured, may_echo=True)
                # A binding that slipped through would set the tenant here: it must not.
                with tenant_context(tenant), self.app_engine.connect() as conn, conn.begin():
                    self._read(conn, outcome)
            finally:
                # ... and must not go on to fail the cases after this one.
                for undo in unbind:
                    undo()
        return outcome

    def check_header_name(self, value: object) -> Outcome:
        task = self.write_note
        with self._case("header name", value) as outcome:
            self.app.conf.tenant_celery_header = value
            try:
                expected = (ConfigurationError,)
                self._refused(outcome, expected, lambda: header_name(self.app), may_echo=True)
                with tenant_context(SEEDED[0]):
                    self._refused(outcome, expected, task.apply_async, may_echo=True)
                headers = {DEFAULT_HEADER: SEEDED[0]}
                self._refused(
                    outcome,
                    expected,
                    lambda: Task.apply(task, headers=headers, throw=True),
                    may_echo=True,
                )
            finally:
                self.app.conf.tenant_celery_header = None
        return outcome


# ------------------------------------------------------------------------ categories

Check = Callable[[HostileProbe, object], Outcome]


def _parser_check(parser: str) -> Check:
    return lambda probe, value: probe.check_parser(parser, value)


CATEGORIES: dict[str, tuple[Callable[[], st.SearchStrategy[object]], Check]] = {
    "tenant_context": (hostile_tenant_ids, HostileProbe.check_tenant_context),
    "parse:uuid": (lambda: hostile_tenant_ids("uuid"), _parser_check("uuid")),
    "parse:integer": (lambda: hostile_tenant_ids("integer"), _parser_check("integer")),
    "parse:slug": (lambda: hostile_tenant_ids("slug"), _parser_check("slug")),
    "set_tenant_guc": (hostile_tenant_ids, HostileProbe.check_set_tenant_guc),
    "tenant_session": (hostile_tenant_ids, HostileProbe.check_tenant_session),
    "task tenant_id": (hostile_tenant_ids, HostileProbe.check_task_argument),
    "task header": (hostile_header_values, HostileProbe.check_task_header),
    "setting name": (hostile_setting_names, HostileProbe.check_setting_name),
    "header name": (hostile_header_names, HostileProbe.check_header_name),
}
"""Category -> (strategy, check).  Every category draws its own values."""


def generate(strategy: st.SearchStrategy[object], count: int, seed: int) -> list[object]:
    """``count`` values drawn from ``strategy`` (fewer if it has fewer), reproducibly."""
    values: list[object] = []

    @hypothesis.seed(seed)
    @settings(
        max_examples=count,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(value: object) -> None:
        values.append(value)

    collect()
    return values


def try_all(probe: HostileProbe, per_category: int, seed: int) -> list[CategoryResult]:
    """Generate ``per_category`` values for every category and check each one."""
    results = []
    for index, (category, (strategy, check)) in enumerate(CATEGORIES.items()):
        result = CategoryResult(category)
        for value in generate(strategy(), per_category, seed + index):
            result.add(check(probe, value))
        results.append(result)
    return results


# ------------------------------------------------------------------------- the part

FULL_MINIMUM = 10_000
"""Cases a full run must try."""


def run(ctx: Any) -> Any:
    """The ``hostile`` part of ``python -m reliability``: see the module docstring."""
    from reliability import routes  # noqa: PLC0415 (the runner's package)
    from reliability._common import Section, Tally, broker_name  # noqa: PLC0415

    per_category = ctx.pick(smoke=30, default=300, full=1_100)
    seed = zlib.crc32(f"hostile-{ctx.run_id}".encode())
    admin = ctx.admin_engine()
    prepare_table(admin, ctx.app_role)
    # Every refusal logs a warning by design: thousands of them say nothing here.
    package_logger = logging.getLogger("tenant_celery")
    level = package_logger.level
    package_logger.setLevel(logging.ERROR)
    try:
        probe = HostileProbe(admin, ctx.app_engine(pool_size=2, max_overflow=0))
        try:
            ctx.say(f"hostile: {per_category:,} generated values per category, seed {seed}")
            results = try_all(probe, per_category, seed)
        finally:
            probe.close()
    finally:
        package_logger.setLevel(level)
    tried = sum(r.tried for r in results)
    passed = sum(r.tried - len(r.failed) for r in results)
    rows = [
        [r.category, r.tried, r.refused, r.wrote_nothing, r.saw_nothing, len(r.failed)]
        for r in results
    ]
    rows.append(
        [
            "total",
            tried,
            sum(r.refused for r in results),
            sum(r.wrote_nothing for r in results),
            sum(r.saw_nothing for r in results),
            tried - passed,
        ]
    )
    failures = [f for r in results for f in r.failed]
    notes = [
        f"values generated with Hypothesis, seed {seed}; the app role is not a superuser, "
        f"has no BYPASSRLS and owns nothing; {TABLE} holds {len(SEEDED) * ROWS_PER_TENANT} "
        f"rows of {len(SEEDED)} tenants",
        "refused: a TenantCeleryError of the expected kind, one printable line, the value "
        "not echoed (tenant ids and headers); saw nothing: no row read and no SQL other "
        "than the probe's own, the value in no statement's text",
        *(f"FAILED {f.category} {f.shown()}: {'; '.join(f.problems)}" for f in failures[:10]),
    ]
    table = ctx.report(
        "Hostile input",
        ["category", "tried", "refused (clear error)", "wrote nothing", "saw nothing", "failed"],
        rows,
        notes,
    )
    ctx.say("hostile: replay routes through real workers")
    replayed = routes.run(ctx)
    section = Section(
        key="hostile",
        title="Hostile input refused",
        tables=[table, *replayed.tables],
        data={
            "seed": seed,
            "per_category": per_category,
            "categories": {
                r.category: {
                    "tried": r.tried,
                    "refused": r.refused,
                    "wrote_nothing": r.wrote_nothing,
                    "saw_nothing": r.saw_nothing,
                    "failed": len(r.failed),
                }
                for r in results
            },
            "failures": [
                {"category": f.category, "value": f.shown(200), "problems": f.problems}
                for f in failures[:50]
            ],
            "replay_routes": replayed.data,
        },
        tally=Tally(
            hostile_tried=tried + replayed.tried,
            hostile_refused=passed + replayed.passed,
            pools=["prefork 2"],
            brokers=[broker_name(b) for b in routes.BROKERS],
        ),
    )
    section.violations.extend(replayed.violations)
    section.require(tried > 0, "no hostile case was tried")
    section.require(replayed.tried > 0, "no replay route was tried")
    if ctx.size == "full":
        section.require(
            tried >= FULL_MINIMUM, f"a full run tried {tried:,} hostile cases, fewer than 10,000"
        )
    return section
