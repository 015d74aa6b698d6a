"""Replay routes refused: what a publisher can get real workers to run, in which tenant.

Celery publishes parts of the messages it handles: chain steps, link callbacks,
errbacks, the items of ``celery.map``/``celery.starmap``, and
``tenant_celery.for_each_tenant``'s fan-out.  Each route below is tried
against two real ``celery worker`` processes (prefork, concurrency 2, Redis
broker and results, :mod:`reliability.routes_app`): a **signed** worker, with
``tenant_celery_header_signing_keys`` set, and an **unsigned** one.  Every
tenant task body writes a row whose ``tenant_id`` is the tenant setting it ran
under; after the run the superuser reads every row, so what ran where is
seen past row-level security.  Each attempt has tenants of its own (``A``, the
tenant a message names at its top, and ``B``, the *attacked* tenant a part of
it names), each seeded with :data:`SEED_ROWS` rows, so what one attempt wrote
or deleted is told apart from the others.

=============================  ========================================================  ====  ====
route                          what is published                                         sig.  uns.
=============================  ========================================================  ====  ====
``chain step (argument)``      ``celery.accumulate`` whose ``chain`` holds                h     c
                               ``write_note.si(key, tenant_id=B)``
``chain step (header)``        the same step naming ``B`` in ``options.headers``          h     c
``link callback``              a plain task with ``link=[write_note.si(key,               h     c
                               tenant_id=B)]``
``errback of a refused task``  ``write_note`` for ``A``, unsigned, with ``link_error=``   h     --
                               ``[write_note.si(key, tenant_id=B)]``
``celery.starmap item``        ``celery.starmap(write_for, [[B, key]])``                  h     c
``celery.map item``            ``celery.map(purge, [B])``: would delete ``B``'s rows      h     c
``for_each_tenant unsigned``   the app's own beat schedule entry, not signed              h     c
``for_each_tenant lister``     a fan-out naming a lister no schedule names                h     h
``for_each_tenant os:abort``   a fan-out whose lister is ``os:abort``                     h     h
``nested headers``             ``write_note`` for ``A`` whose nested ``headers`` name     h     h
                               ``B`` (signed for ``A`` by a key holder on the signed
                               worker: a broker writer added the nested key)
``mixed-tenant chord``         ``chord([write_note.s(k), write_note.s(k,                  h     h
                               tenant_id=B)], collect.s(k))`` inside ``A``, by a key
                               holder on the signed worker
``forged chord part``          a header part for ``B`` of a chord whose callback          h     h
                               names ``A`` (signed for ``B`` by a key holder on the
                               signed worker)
``signed chain``               a chain of two ``write_note`` inside ``B``, by a key       c     --
                               holder
``beat's fan-out``             the schedule's control entry, signed as beat signs it      c     --
=============================  ========================================================  ====  ====

``h``: a **hostile** case.  Everything is published by a process that holds no
key, except where the table says a key holder signed it (on the signed worker
this makes the case harder, not easier: the refusal must come from the check
the route is about, not from a missing signature).  A hostile case passes when
the route was **refused** with a :class:`~tenant_celery.TenantCeleryError`
(at publish, or by the worker, stored as the result of the message or of its
replayed part), **wrote nothing** (no row of the attempt in ``A`` or ``B``, nor
anywhere else, except the one chord part that the key holder legitimately
published for ``A``) and **deleted nothing** (every seeded row of ``A`` and
``B`` is still there).  The fan-out routes must also leave the app's listed
tenants untouched, call no lister (:data:`~reliability.routes_app.CALLS`),
and kill no pool process (no ``WorkerLostError`` or ``SIGABRT`` in the
worker's log).

``c``: a **control**.  Without signing the broker is trusted: a message that
names a tenant, in any part of it, runs in that tenant, by design.  So on the
unsigned worker the replay routes are not hostile; they are run to show the
rig sees what a route does when it is *not* refused (a row in ``B``, or ``B``'s
rows deleted), and the signed worker's controls show that the application's
own signed canvas and its beat fan-out still run.  A control passes when its
rows are exactly the ones expected.  A control that did not run makes the
hostile zeros worthless, and is a violation of its own.

What applies to the unsigned worker, then, is what does not depend on who
may name a tenant: one message names one tenant (nested headers), a chord
runs in one tenant (mixed chord, forged part), and ``for_each_tenant`` runs
only the fan-outs of the app's beat schedule (other listers, ``os:abort``).
The errback route does not apply there: nothing refuses its carrier.

:func:`run` is called by :func:`reliability.hostile.run`; its tables, data and
counts are part of the ``hostile`` section.  Attempts per route and worker: 2
in a smoke run, 5 by default, 10 in a full run.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from benchmarks._workers import Transport, Worker, start_worker
from celery import Celery, chain, chord, current_app
from celery.result import AsyncResult

from tenant_celery import TenantCeleryError, tenant_context
from tenant_celery.fanout import FOR_EACH_TENANT_TASK
from tenant_celery.signing import SIGNING_KEYS_ENV

from . import routes_app
from ._common import ReliabilityContext, broker_name
from .load import broker_url
from .route_verdict import (
    CALLS,
    LOST_PROCESSES,
    RouteReport,
    create_tables,
    judge,
    lost_processes,
    read_rows,
    report,
    seed,
)

__all__ = ["ROUTES", "Attempt", "Route", "Target", "plan", "run"]

SIGNED, UNSIGNED = "signed", "unsigned"
WORKER_KINDS = (SIGNED, UNSIGNED)
BROKERS = ("redis", "tcpg")
"""A signed and an unsigned worker on each: Redis, and the package's transport."""
REDIS_DB = 11
WAIT_S = 90.0
"""Longest wait for the published messages, their replays and the controls' rows."""
SETTLE_S = 3.0
"""Time given, after everything finished, to a replayed message that was published
but has not run yet: whatever would run has run by then."""


# ------------------------------------------------------------------------- attempts


@dataclass
class Target:
    """A worker the routes are tried on, and the runner's client app of it."""

    kind: str
    """:data:`SIGNED` or :data:`UNSIGNED`."""
    worker: Worker
    keys: str | None
    """The signing keys (comma-separated), ``None`` for the unsigned worker."""
    broker: str = "redis"
    """One of :data:`BROKERS`: Redis, or the package's transport."""

    @property
    def ident(self) -> str:
        """A name for keys and tenants: kind and broker, e.g. ``signed-tcpg``."""
        return f"{self.kind}-{self.broker}"

    @property
    def label(self) -> str:
        """The report's name of the worker, e.g. ``signed, Redis``."""
        return f"{self.kind}, {broker_name(self.broker)}"

    @property
    def app(self) -> Celery:
        return self.worker.app

    @contextlib.contextmanager
    def publishing(self, *, key_holder: bool) -> Iterator[Celery]:
        """Publish as a key holder or as a process holding no key.

        ``send_task`` signs with the current app's keys: the client app is made
        current for the block, and the previous one restored after it.
        """
        app = self.app
        previous = current_app._get_current_object()
        app.conf.tenant_celery_header_signing_keys = self.keys if key_holder else None
        app.set_current()
        try:
            yield app
        finally:
            app.conf.tenant_celery_header_signing_keys = None
            previous.set_current()


@dataclass
class Attempt:
    """One publish of a route on one worker, and what it led to."""

    route: Route
    target: Target
    index: int
    key: str
    """Every row the attempt's tasks write has this key, or ``<key>.<part>``."""
    a: str
    b: str
    hostile: bool
    shared_key: str | None = None
    """The key of every row of the attempt when it cannot choose one: a fan-out of
    the beat schedule writes the schedule's own (``beat``, ``control``)."""
    results: list[AsyncResult[Any]] = field(default_factory=list)
    """The messages published: each must finish."""
    replays: list[str] = field(default_factory=list)
    """Ids of the parts Celery would publish from them (chain steps, callbacks, errbacks)."""
    refused_at_publish: BaseException | None = None
    problems: list[str] = field(default_factory=list)
    outcome: str = ""
    """How it was refused (or ran), for the report: ``worker: TenantConflict``."""
    refused: bool = False
    wrote_nothing: bool = True
    deleted_nothing: bool = True
    ran_as_designed: bool = False
    """Controls only: exactly the expected rows were written or deleted."""

    @property
    def ok(self) -> bool:
        if self.hostile:
            return (
                self.refused and self.wrote_nothing and self.deleted_nothing and not self.problems
            )
        return self.ran_as_designed and not self.problems

    def tenants(self) -> tuple[str, ...]:
        """The tenants the attempt is about: the listed ones for a fan-out."""
        return routes_app.LISTED if self.route.fan_out else (self.a, self.b)

    def problem(self, text: str) -> None:
        self.problems.append(f"{self.route.name} on the {self.target.label} worker: {text}")


def _frozen(signature: Any) -> Any:
    signature.freeze()
    return signature


# ---------------------------------------------------------------------------- routes


def _chain_argument(at: Attempt) -> None:
    step = _frozen(at.target.app.tasks[routes_app.WRITE_NOTE].si(at.key, tenant_id=at.b))
    at.replays.append(step.id)
    with at.target.publishing(key_holder=False) as app:
        at.results.append(app.send_task("celery.accumulate", (1,), chain=[step]))


def _chain_header(at: Attempt) -> None:
    task = at.target.app.tasks[routes_app.WRITE_NOTE]
    step = _frozen(task.si(at.key).set(headers={"tenant_id": at.b}))
    at.replays.append(step.id)
    with at.target.publishing(key_holder=False) as app:
        at.results.append(app.send_task("celery.accumulate", (1,), chain=[step]))


def _link(at: Attempt) -> None:
    callback = _frozen(at.target.app.tasks[routes_app.WRITE_NOTE].si(at.key, tenant_id=at.b))
    at.replays.append(callback.id)
    with at.target.publishing(key_holder=False) as app:
        at.results.append(app.send_task(routes_app.PLAIN_NOOP, link=[callback]))


def _errback(at: Attempt) -> None:
    task = at.target.app.tasks[routes_app.WRITE_NOTE]
    errback = _frozen(task.si(f"{at.key}.errback", tenant_id=at.b))
    at.replays.append(errback.id)
    with at.target.publishing(key_holder=False) as app:
        at.results.append(
            app.send_task(
                routes_app.WRITE_NOTE,
                (f"{at.key}.carrier",),
                headers={"tenant_id": at.a},
                link_error=[errback],
            )
        )


def _starmap(at: Attempt) -> None:
    task = at.target.app.tasks[routes_app.WRITE_FOR].s()
    with at.target.publishing(key_holder=False) as app:
        at.results.append(
            app.send_task("celery.starmap", kwargs={"task": task, "it": [[at.b, at.key]]})
        )


def _map(at: Attempt) -> None:
    task = at.target.app.tasks[routes_app.PURGE].s()
    with at.target.publishing(key_holder=False) as app:
        at.results.append(app.send_task("celery.map", kwargs={"task": task, "it": [at.b]}))


def _entry(app: Celery, name: str) -> tuple[list[Any], dict[str, Any]]:
    entry = app.conf.beat_schedule[name]
    return list(entry["args"]), dict(entry["kwargs"])


def _fan_out_unsigned(at: Attempt) -> None:
    # The hostile case replays the entry whose rows say "beat"; the control (on the
    # unsigned worker, where the broker is trusted) the one whose rows say "control".
    args, kwargs = _entry(at.target.app, routes_app.ENTRY_OF_KEY[_shared(at)])
    with at.target.publishing(key_holder=False) as app:
        at.results.append(app.send_task(FOR_EACH_TENANT_TASK, args, kwargs))


def _fan_out_lister(lister: str) -> Callable[[Attempt], None]:
    def publish(at: Attempt) -> None:
        _, kwargs = _entry(at.target.app, routes_app.FAN_OUT_ENTRY)
        args = [routes_app.WRITE_EACH, lister, [at.key]]
        # Signed as beat signs it where there is a key: the schedule check must refuse it.
        with at.target.publishing(key_holder=True) as app:
            at.results.append(app.send_task(FOR_EACH_TENANT_TASK, args, kwargs))

    return publish


def _nested_headers(at: Attempt) -> None:
    headers = {"tenant_id": at.a, "headers": {"tenant_id": at.b}}
    with at.target.publishing(key_holder=True) as app, tenant_context(at.a):
        at.results.append(app.send_task(routes_app.WRITE_NOTE, (at.key,), headers=headers))


def _mixed_chord(at: Attempt) -> None:
    tasks = at.target.app.tasks
    note, collect = tasks[routes_app.WRITE_NOTE], tasks[routes_app.COLLECT]
    first = _frozen(note.s(f"{at.key}.own"))
    at.results.append(at.target.app.AsyncResult(first.id))
    body = _frozen(collect.s(f"{at.key}.callback"))
    at.replays.append(body.id)
    header = [first, note.s(f"{at.key}.other", tenant_id=at.b)]
    with at.target.publishing(key_holder=True), tenant_context(at.a):
        try:
            chord(header, body).delay()
        except TenantCeleryError as exc:
            at.refused_at_publish = exc
        else:
            at.problem("the chord was published")


def _forged_chord_part(at: Attempt) -> None:
    app = at.target.app
    body = _frozen(app.tasks[routes_app.COLLECT].s(f"{at.key}.callback"))
    body.set(headers={"tenant_id": at.a})
    at.replays.append(body.id)
    group_id = str(uuid.uuid4())
    # A chord of one part: if the part ran, the backend would call the callback.
    app.backend.set_chord_size(group_id, 1)  # type: ignore[attr-defined]
    with at.target.publishing(key_holder=True), tenant_context(at.b):
        at.results.append(
            app.send_task(
                routes_app.WRITE_NOTE,
                (f"{at.key}.part",),
                headers={"tenant_id": at.b},
                chord=dict(body),
                group_id=group_id,
            )
        )


def _signed_chain(at: Attempt) -> None:
    note = at.target.app.tasks[routes_app.WRITE_NOTE]
    second = _frozen(note.si(f"{at.key}.2"))
    at.replays.append(second.id)
    with at.target.publishing(key_holder=True), tenant_context(at.b):
        at.results.append(chain(note.si(f"{at.key}.1"), second).apply_async())


def _shared(at: Attempt) -> str:
    if at.shared_key is None:
        raise RuntimeError(f"{at.route.name} publishes a schedule entry: it needs a shared key")
    return at.shared_key


def _beat_fan_out(at: Attempt) -> None:
    args, kwargs = _entry(at.target.app, routes_app.ENTRY_OF_KEY[_shared(at)])
    with at.target.publishing(key_holder=True) as app:  # what celery beat sends
        at.results.append(app.send_task(FOR_EACH_TENANT_TASK, args, kwargs))


@dataclass(frozen=True)
class Route:
    """A way to get a tenant task body run, and where it is hostile or a control."""

    name: str
    publish: Callable[[Attempt], None]
    hostile_on: tuple[str, ...]
    control_on: tuple[str, ...] = ()
    fan_out: bool = False
    """The route goes through ``for_each_tenant``: the listed tenants are at stake."""
    own: tuple[str, ...] = ()
    """Keys (``<key>.<part>``) a hostile attempt may write in ``A``: its own legitimate part."""
    control_rows: tuple[tuple[str, str], ...] = ()
    """A control's expected rows: ``(tenant, key)``, ``tenant`` ``"A"`` or ``"B"``, ``key``
    a part (``""`` for the attempt's key itself).  A fan-out's are counted per listed tenant."""
    control_deletes: tuple[str, ...] = ()
    """Tenants (``"A"``, ``"B"``) a control deletes the seeded rows of."""
    evidence: str = ""
    """What else shows that the route ran: :data:`CALLS` (the noisy lister was called)
    or :data:`LOST_PROCESSES` (a pool process of the worker died)."""
    schedule: bool = False
    """The route publishes an entry of the app's beat schedule, whose arguments (so the
    key its rows have) it cannot choose: ``beat`` for a hostile attempt, ``control``
    for a control."""


ROUTES: tuple[Route, ...] = (
    Route("chain step (argument)", _chain_argument, (SIGNED,), (UNSIGNED,),
          control_rows=(("B", ""),)),
    Route("chain step (header)", _chain_header, (SIGNED,), (UNSIGNED,),
          control_rows=(("B", ""),)),
    Route("link callback", _link, (SIGNED,), (UNSIGNED,), control_rows=(("B", ""),)),
    Route("errback of a refused task", _errback, (SIGNED,)),
    Route("celery.starmap item", _starmap, (SIGNED,), (UNSIGNED,), control_rows=(("B", ""),)),
    Route("celery.map item (purge)", _map, (SIGNED,), (UNSIGNED,), control_deletes=("B",)),
    Route("for_each_tenant unsigned", _fan_out_unsigned, (SIGNED,), (UNSIGNED,), fan_out=True,
          control_rows=(("listed", ""),), schedule=True),
    Route("for_each_tenant lister", _fan_out_lister(routes_app.NOISY_LISTER),
          (SIGNED, UNSIGNED), fan_out=True, evidence=CALLS),
    Route("for_each_tenant os:abort", _fan_out_lister("os:abort"), (SIGNED, UNSIGNED),
          fan_out=True, evidence=LOST_PROCESSES),
    Route("nested headers", _nested_headers, (SIGNED, UNSIGNED)),
    Route("mixed-tenant chord", _mixed_chord, (SIGNED, UNSIGNED), own=("own",)),
    Route("forged chord part", _forged_chord_part, (SIGNED, UNSIGNED)),
    Route("signed chain", _signed_chain, (), (SIGNED,), control_rows=(("B", "1"), ("B", "2"))),
    Route("beat's fan-out", _beat_fan_out, (), (SIGNED,), fan_out=True,
          control_rows=(("listed", ""),), schedule=True),
)  # fmt: skip
"""Every route, in the order of the module docstring's table."""

# ------------------------------------------------------------------------- workers


def _start(ctx: ReliabilityContext, kind: str, keys: str, broker: str) -> Target:
    results = ctx.redis_db(REDIS_DB)
    url = results if broker == "redis" else broker_url(ctx, broker)
    worker = start_worker(
        ctx,
        Transport(broker, url, results),
        pool="prefork",
        concurrency=2,
        tag=f"-routes-{kind}",
        app_module="reliability.routes_app",
        client=routes_app.make_app,
        # An empty value is "off", whatever the runner's own environment says.
        environ={SIGNING_KEYS_ENV: keys if kind == SIGNED else ""},
    )
    ctx.on_close(worker.stop)
    return Target(kind, worker, keys if kind == SIGNED else None, broker)


@contextlib.contextmanager
def _keyless_environment() -> Iterator[None]:
    """Hide signing keys the runner's environment may hold: the publisher holds none."""
    saved = os.environ.pop(SIGNING_KEYS_ENV, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[SIGNING_KEYS_ENV] = saved


def _barrier(targets: Sequence[Target]) -> None:
    """Wait until each worker has taken everything queued before now."""
    results = []
    for target in targets:
        with target.publishing(key_holder=False) as app:
            results += [app.send_task(routes_app.PLAIN_NOOP) for _ in range(4)]
    for result in results:
        result.get(timeout=WAIT_S)


# ------------------------------------------------------------------------- waiting


def _wait(attempts: Sequence[Attempt], deadline: float) -> None:
    """Wait until every published message finished (whatever its outcome)."""
    pending = [(at, r) for at in attempts for r in at.results]
    while pending and time.monotonic() < deadline:
        pending = [(at, r) for at, r in pending if not r.ready()]
        if pending:
            time.sleep(0.2)
    for at, result in pending:
        at.problem(f"message {result.id} did not finish in {WAIT_S:.0f} s")


def _wait_for_controls(admin: sa.Engine, attempts: Sequence[Attempt], deadline: float) -> None:
    """Wait until the controls' replayed parts finished and their fan-outs' rows are there."""
    replays = [
        (at, at.target.app.AsyncResult(i)) for at in attempts if not at.hostile for i in at.replays
    ]
    while replays and time.monotonic() < deadline:
        replays = [(at, r) for at, r in replays if not r.ready()]
        if replays:
            time.sleep(0.2)
    fan_outs = [at for at in attempts if not at.hostile and at.route.fan_out]
    wanted = len(fan_outs) * len(routes_app.LISTED)
    while fan_outs and time.monotonic() < deadline:
        if sum(read_rows(admin).by_key.get(routes_app.CONTROL_KEY, Counter()).values()) >= wanted:
            break
        time.sleep(0.3)


# ------------------------------------------------------------------------------ run


def _tenant(ctx: ReliabilityContext, ident: str, route: Route, index: int, role: str) -> str:
    name = f"tenant-celery-routes-{ctx.run_id}-{ident}-{route.name}-{index}-{role}"
    return str(uuid.uuid5(uuid.NAMESPACE_URL, name))


def plan(ctx: ReliabilityContext, targets: Sequence[Target], per_route: int) -> list[Attempt]:
    """Every attempt: each route, on each worker it is hostile or a control on."""
    attempts = []
    for index in range(per_route):
        for route in ROUTES:
            for target in targets:
                hostile = target.kind in route.hostile_on
                if not hostile and target.kind not in route.control_on:
                    continue
                key = f"{ctx.run_id}.{target.ident}.{ROUTES.index(route)}.{index}"
                attempts.append(
                    Attempt(
                        route=route,
                        target=target,
                        index=index,
                        key=key,
                        a=_tenant(ctx, target.ident, route, index, "A"),
                        b=_tenant(ctx, target.ident, route, index, "B"),
                        hostile=hostile,
                        shared_key=(
                            (routes_app.FAN_OUT_KEY if hostile else routes_app.CONTROL_KEY)
                            if route.schedule
                            else None
                        ),
                    )
                )
    return attempts


def run(ctx: ReliabilityContext) -> RouteReport:
    """Try every route on a signed and an unsigned worker of each broker; see the module
    docstring."""
    per_route = ctx.pick(smoke=2, default=5, full=10)
    keys = ", ".join(f"reliability-routes-{ctx.run_id}-{n}-{uuid.uuid4().hex}" for n in range(2))
    admin = ctx.admin_engine(pool_size=1)
    create_tables(admin, ctx.app_role)
    with _keyless_environment():
        targets = [_start(ctx, kind, keys, broker) for broker in BROKERS for kind in WORKER_KINDS]
        ctx.say("hostile: replay routes, a signed and an unsigned worker on each broker ready")
        attempts = plan(ctx, targets, per_route)
        seed(admin, [*routes_app.LISTED, *(t for at in attempts for t in (at.a, at.b))])
        shares = Counter(at.shared_key for at in attempts if at.shared_key)
        started = time.monotonic()
        deadline = started + WAIT_S
        for at in attempts:
            at.route.publish(at)
        _wait(attempts, deadline)
        _wait_for_controls(admin, attempts, deadline)
        _barrier(targets)
        time.sleep(SETTLE_S)
        rows = read_rows(admin)
        elapsed = time.monotonic() - started
        lost = {
            t.ident: lost_processes(t.worker.log_path.read_text(errors="replace")) for t in targets
        }
        for at in attempts:
            judge(at, rows, lost, shares)
        for target in targets:
            target.worker.stop()
    found = report(ctx, attempts, per_route, elapsed)
    found.data["lister_calls"] = rows.calls
    found.data["pool_processes_lost"] = {f"{t.label} worker": lost[t.ident] for t in targets}
    return found
