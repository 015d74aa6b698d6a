"""The tenant task: a Celery task that runs inside exactly one tenant, or not at all."""

from __future__ import annotations

import inspect
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any, Concatenate, Literal, ParamSpec, TypeVar, overload

from celery import Celery, shared_task
from celery.app.task import Context
from celery.utils import uuid

from . import propagation, signing
from ._compat import GenericTask
from .config import header_name
from .context import _current, _enter, _exit, current_tenant, parse_tenant_id, tenant_context
from .errors import (
    ConfigurationError,
    InvalidTenantId,
    TenantCeleryError,
    TenantConflict,
    TenantContextMissing,
)
from .signals import tenant_entered, tenant_rejected

if TYPE_CHECKING:
    from celery.result import AsyncResult, EagerResult

__all__ = ["TENANT_ARG", "TenantTask", "tenant_task"]

logger = logging.getLogger("tenant_celery")

#: Where a worker's first refusal points its reader.
REFUSAL_DOCS = (
    "https://tenant-celery.readthedocs.io/en/latest/howto/tenant-tasks.html#refused-tasks"
)

#: What to do about a refusal whose exception does not say it already.
_REMEDIES = {
    signing.UNSIGNED: (
        "if a producer of yours sent it, give that producer the signing keys "
        "(tenant_celery_header_signing_keys); otherwise find who publishes to this queue"
    ),
    signing.BAD_SIGNATURE: (
        "if a producer of yours sent it, check that it signs with a key this worker "
        "accepts; otherwise find who publishes to this queue"
    ),
}
#: Set on the exception a refusal raises, so that Celery's own failure line for it is
#: dropped (the refusal has logged its one line) while the task still fails with it.
_REFUSED_MARK = "_tenant_celery_refused"

_P = ParamSpec("_P")
_R = TypeVar("_R")

TENANT_ARG = "tenant_id"
"""Keyword argument that names a task's tenant explicitly at call time."""

_NOT_GIVEN = object()

_ASYNC_REFUSED = (
    "tenant task {name!r} is an async def function, which Celery cannot run: it would "
    "return a coroutine that is never awaited; make it a plain def that calls "
    "asyncio.run(...) on the coroutine (the tenant context is copied into it)"
)


class TenantTask(GenericTask[_P, _R]):
    """Base class of tasks that always run inside exactly one tenant.

    Use it as ``@app.task(base=TenantTask)``, as the app's ``task_cls``, or
    through :func:`tenant_task`.

    The tenant comes from, in order of authority:

    1. an explicit ``tenant_id`` keyword argument at call time (or a
       positional one, when the function declares that parameter), or the
       tenant header given in ``headers=``; two explicit sources that
       disagree raise :class:`~tenant_celery.TenantConflict`;
    2. otherwise the tenant context active when the task is published.

    The tenant is written to the message header (``tenant_id`` unless the
    ``tenant_celery_header`` setting says otherwise), so it reaches the worker
    and everything the task publishes in turn.  The function receives
    ``tenant_id`` only when its signature declares that parameter.

    Publishing with no tenant raises :class:`~tenant_celery.TenantContextMissing`
    and sends nothing.  In the worker, a message with no tenant, an invalid
    one, or a header and argument that disagree, is refused before the body
    runs: the task fails (it is not retried), :data:`~tenant_celery.signals.tenant_rejected`
    is sent and a warning is logged.  With signed tenant headers on
    (:mod:`tenant_celery.signing`), so is a message whose tenant header is not
    signed for it with an accepted key.
    """

    #: Handles, in the worker's main process, the failures that never reach the
    #: pool (hard time limit, lost process, revoke, expiry) inside the tenant.
    Request = "tenant_celery.request:TenantRequest"

    @classmethod
    def on_bound(cls, app: Celery) -> None:
        """Refuse a coroutine function: Celery calls a task's function and stores what it
        returns, so an ``async def`` body would never run (in any tenant)."""
        super().on_bound(app)
        run = cls.__dict__.get("run")
        if inspect.iscoroutinefunction(getattr(run, "__func__", run)):
            registry: Any = getattr(app, "_tasks")  # noqa: B009 (Celery registers, then binds)
            if registry.get(cls.name) is not None and type(registry[cls.name]) is cls:
                del registry[cls.name]
            raise ConfigurationError(_ASYNC_REFUSED.format(name=cls.name))

    @cached_property
    def tenant_required(self) -> bool:
        """Whether this task refuses to run without a tenant.

        True except for Celery's own built-in tasks (``celery.*``: chord
        unlock, backend cleanup, ...), which an app whose ``task_cls`` is
        ``TenantTask`` also builds from this class.  Those pass a tenant on
        when their message carries one, like plain tasks, and run without one
        otherwise.
        """
        return not self.name.startswith("celery.")

    # --- the function's own ``tenant_id`` parameter -------------------------

    @cached_property
    def _tenant_parameter(self) -> tuple[bool, int | None]:
        """Whether the function declares ``tenant_id``, and its positional index."""
        try:
            params = list(inspect.signature(self.run).parameters.values())
        except (TypeError, ValueError):  # pragma: no cover (builtins, C callables)
            return False, None
        for index, param in enumerate(params):
            if param.name != TENANT_ARG:
                continue
            if param.kind is param.POSITIONAL_ONLY:
                raise ConfigurationError(
                    f"task {self.name!r} declares {TENANT_ARG!r} as positional-only; "
                    "make it a keyword or positional-or-keyword parameter"
                )
            if param.kind is param.POSITIONAL_OR_KEYWORD:
                return True, index
            return True, None
        return False, None

    def _explicit_tenant(
        self, args: Sequence[Any], kwargs: Mapping[str, Any], header: object
    ) -> tuple[str | None, bool]:
        """The tenant named explicitly by arguments and header, validated.

        Returns the tenant (or ``None``) and whether it was given positionally.
        """
        _, index = self._tenant_parameter
        positional = index is not None and len(args) > index
        if not positional and TENANT_ARG not in kwargs:  # the usual case: no argument
            return (None if header is None else parse_tenant_id(header)), False
        named: list[object] = []
        if index is not None and len(args) > index:
            named.append(args[index])
        if TENANT_ARG in kwargs:
            # An explicit ``tenant_id=None`` is refused as invalid, not read as
            # "use the context": a caller that names a tenant must name one.
            named.append(kwargs[TENANT_ARG])
        if header is not None:
            named.append(header)
        tenants = {parse_tenant_id(value) for value in named}
        if len(tenants) > 1:
            raise TenantConflict(
                f"task {self.name!r} was given different tenants by its {TENANT_ARG!r} "
                "argument and its tenant header; pass one tenant, or none and let "
                "the tenant context decide"
            )
        return (tenants.pop() if tenants else None), positional

    def _shape_kwargs(
        self, kwargs: Mapping[str, Any], tenant: str, positional: bool
    ) -> dict[str, Any]:
        """A new kwargs dict with ``tenant_id`` present exactly when the function asks."""
        accepts, _ = self._tenant_parameter
        if not accepts and TENANT_ARG not in kwargs:  # the usual case
            return {**kwargs}
        shaped = {key: value for key, value in kwargs.items() if key != TENANT_ARG}
        if accepts and not positional:
            shaped[TENANT_ARG] = tenant
        return shaped

    # --- producer side --------------------------------------------------------

    def _prepare(
        self,
        args: Sequence[Any] | None,
        kwargs: Mapping[str, Any] | None,
        headers: Mapping[str, Any] | None,
        keys: tuple[bytes, ...],
    ) -> tuple[tuple[Any, ...], dict[str, Any], dict[str, Any], str]:
        """Resolve the tenant to publish with; return new args, kwargs, headers and it.

        ``keys`` are the app's signing keys, read by the caller (which refuses
        unusable ones before anything is sent).
        """
        args = tuple(args or ())
        kwargs = kwargs or {}
        header = header_name(self.app)
        tenant, positional = self._explicit_tenant(
            args, kwargs, None if headers is None else headers.get(header)
        )
        if tenant is None:
            tenant = _current.get()
        if tenant is None:
            raise TenantContextMissing(
                f"cannot publish tenant task {self.name!r} without a tenant: publish it "
                f"inside tenant_context(...) or pass {TENANT_ARG}=..."
            )
        if keys and not propagation.may_vouch_for(tenant):
            raise TenantConflict(
                f"cannot publish tenant task {self.name!r} for another tenant than the one "
                "this worker handles a message of (or for any, outside one): with signed "
                "tenant headers a worker vouches only for the verified tenant of the "
                "message it runs; publish work for other tenants with fan_out(...)"
            )
        return (
            args,
            self._shape_kwargs(kwargs, tenant, positional),
            {**(headers or {}), header: tenant},
            tenant,
        )

    def _fix_chord_tenant(self, chord: object, tenant: str) -> None:
        """Fix the tenant of the chord this message is a header part of, or refuse it.

        The first header part published names the chord's tenant in its
        callback's headers, so the callback runs there whichever part ends
        last; a part in another tenant would feed that tenant's results to the
        callback, and is refused before it is sent.
        """
        if not isinstance(chord, dict):
            return
        options = chord.get("options")
        if not isinstance(options, dict):
            return
        header = header_name(self.app)
        headers = options.get("headers")
        named = headers.get(header) if isinstance(headers, Mapping) else None
        if named is None:
            options["headers"] = {**(headers or {}), header: tenant}
            return
        if parse_tenant_id(named) != tenant:
            raise TenantConflict(
                f"tenant task {self.name!r} is a header part of a chord of another tenant; "
                "a chord runs in one tenant: publish one chord per tenant (fan_out(...) "
                "of a task that builds it, for instance)"
            )

    def apply_async(
        self,
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
        task_id: str | None = None,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        shadow: str | None = None,
        **options: Any,
    ) -> AsyncResult[_R]:
        """Publish the task with its tenant in the message header.

        Accepts everything :meth:`celery.Task.apply_async` does.  The caller's
        ``args``, ``kwargs`` and ``headers`` are not modified.

        Raises:
            TenantContextMissing: no explicit tenant and no tenant context.
            TenantConflict: explicit tenants disagree.
            InvalidTenantId: an explicit tenant is malformed.
            ConfigurationError: the signing keys setting is unusable.
        """
        # The publish hook reads this task's app's settings, whichever app is current.
        app_token = propagation._publishing_app.set(self.app)
        try:
            if not self.tenant_required:
                return super().apply_async(
                    args, kwargs, task_id, producer, link, link_error, shadow, **options
                )
            # Unusable keys are refused here, before anything is sent, not in the hook.
            keys = signing.signing_keys(self.app)
            args, kwargs, options["headers"], tenant = self._prepare(
                args, kwargs, options.get("headers"), keys
            )
            self._fix_chord_tenant(options.get("chord"), tenant)
            # Publish inside the task's tenant: the hook signs the tenant header only
            # when it names the context, and a tenant named here is the caller's choice.
            token = _enter(tenant)
            try:
                return super().apply_async(
                    args, kwargs, task_id, producer, link, link_error, shadow, **options
                )
            finally:
                _exit(token)
        finally:
            propagation._publishing_app.reset(app_token)

    def apply(
        self,
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
        link: Any = None,
        link_error: Any = None,
        task_id: str | None = None,
        retries: int | None = None,
        throw: bool | None = None,
        logfile: str | None = None,
        loglevel: str | None = None,
        headers: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> EagerResult[_R]:
        """Run the task in this process (eager), inside its tenant.

        The tenant is resolved as for :meth:`apply_async`, and the same errors
        are raised before anything runs.  With signing on, the tenant header is
        signed here (this process is the producer) and verified by the task as
        a worker verifies it.
        """
        if not self.tenant_required:
            return super().apply(
                args, kwargs, link, link_error, task_id, retries, throw, logfile, loglevel,
                headers, **options,
            )  # fmt: skip
        keys = signing.signing_keys(self.app)
        args, kwargs, headers, tenant = self._prepare(args, kwargs, headers, keys)
        if keys:
            task_id = task_id or uuid()
            headers[signing.SIGNATURE_HEADER] = signing.sign_tenant(
                keys[0], tenant, task_id, self.name
            )
        return super().apply(
            args, kwargs, link, link_error, task_id, retries, throw, logfile, loglevel,
            headers, **options,
        )  # fmt: skip

    # --- worker side ----------------------------------------------------------

    def _refuse(self, request: Context, exc: TenantCeleryError, reason: str) -> None:
        """Announce a refusal and mark ``exc``, which the caller raises: one warning line
        (task, reason, remedy) instead of Celery's error line and traceback."""
        tenant_rejected.send(sender=self, reason=reason, exc=exc, request=request)
        setattr(exc, _REFUSED_MARK, True)
        remedy = _REMEDIES.get(reason)
        logger.warning(
            "tenant task %s[%s] refused (%s): %s%s; the task fails without running and is "
            "not retried%s",
            self.name,
            request.id,
            reason,
            exc,
            f"; {remedy}" if remedy else "",
            f". About refused tasks: {REFUSAL_DOCS}" if _first_refusal() else "",
        )

    def _check_chord_tenant(self, request: Context, tenant: str, header: str) -> None:
        """Refuse a chord header part whose chord names another tenant."""
        chord = request.chord
        if not chord:
            return
        options = chord.get("options") if isinstance(chord, Mapping) else None
        headers = options.get("headers") if isinstance(options, Mapping) else None
        named = headers.get(header) if isinstance(headers, Mapping) else None
        if named is not None and parse_tenant_id(named) != tenant:
            raise TenantConflict(
                f"tenant task {self.name!r} is a header part of a chord whose callback "
                "runs in another tenant; its result would reach that tenant: publish a "
                "chord's header and callback in one tenant"
            )

    def __call__(self, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        request = self.request
        if not self.tenant_required:
            if request.called_directly:
                return super().__call__(*args, **kwargs)
            return self.run(*args, **kwargs)
        if request.called_directly:
            # A plain function call: no message, so the caller's context applies.
            tenant, positional = self._explicit_tenant(args, kwargs, None)
            if (
                tenant is not None
                and signing.signing_keys(self.app)
                and not propagation.may_vouch_for(tenant)
            ):
                # Celery's map, starmap and chunks call a task with arguments taken
                # from their own message: those name no more than its verified tenant.
                raise TenantConflict(
                    f"tenant task {self.name!r} was called with a tenant argument naming "
                    "another tenant than the verified tenant of the message this worker "
                    "handles; with signed tenant headers a called task runs in that tenant only"
                )
            tenant = tenant or current_tenant()
            if tenant is None:
                raise TenantContextMissing(
                    f"tenant task {self.name!r} called without a tenant: call it inside "
                    f"tenant_context(...) or pass {TENANT_ARG}=..."
                )
            with tenant_context(tenant):
                return super().__call__(*args, **self._shape_kwargs(kwargs, tenant, positional))

        try:
            fields = propagation._request_fields(request)
            header = header_name(self.app)
            raw = propagation.message_header(fields, header)
            tenant, positional = self._explicit_tenant(args, kwargs, raw)
            if tenant is None:
                raise TenantContextMissing(
                    f"tenant task {self.name!r} received a message without a tenant; "
                    "publish it inside tenant_context(...) or pass tenant_id=..."
                )
            keys = signing.signing_keys(self.app)
            if keys:
                # Only a signed header names a tenant: one named by the arguments
                # alone counts as unsigned.
                signature = propagation.message_header(fields, signing.SIGNATURE_HEADER)
                signing.verify_signature(
                    keys, None if raw is None else signature, tenant, request.id, self.name
                )
            if request.chord:
                self._check_chord_tenant(request, tenant, header)
        except signing.TenantSignatureError as exc:
            self._refuse(request, exc, exc.reason)
            raise
        except TenantContextMissing as exc:
            self._refuse(request, exc, "missing")
            raise
        except InvalidTenantId as exc:
            self._refuse(request, exc, "invalid")
            raise
        except TenantConflict as exc:
            self._refuse(request, exc, "conflict")
            raise

        # Reset by task_postrun, after chain and link callbacks are published.
        propagation._remember(request, _enter(tenant))
        if not request.is_eager:
            propagation._remember_authority(request, tenant)
        tenant_entered.send(sender=self, tenant_id=tenant, request=request)
        # Call ``run`` directly: ``Task.__call__`` would push a second request
        # and hide this one (its id, headers, retries) from a bound task.
        return self.run(*args, **self._shape_kwargs(kwargs, tenant, positional))


class _Refusals:
    """Which process has pointed to :data:`REFUSAL_DOCS` already (a fork starts afresh)."""

    def __init__(self) -> None:
        self.pointed_in = 0
        self.lock = threading.Lock()


_refusals = _Refusals()


def _first_refusal() -> bool:
    """True once per process: for its first refusal."""
    with _refusals.lock:
        first = _refusals.pointed_in != os.getpid()
        _refusals.pointed_in = os.getpid()
        return first


class _DropRefusalFailures(logging.Filter):
    """Drop Celery's failure line for a refused task: the refusal logged its own line,
    and a refusal is expected behaviour, not a crash worth a traceback.

    Only the exceptions :meth:`TenantTask._refuse` marked are dropped; the same
    exception types raised by a task's body are logged by Celery as usual.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not getattr(exc, _REFUSED_MARK, False)


# Celery logs a task's failure, with its traceback, on this logger (celery.app.trace).
logging.getLogger("celery.app.trace").addFilter(_DropRefusalFailures())


@overload
def tenant_task(fun: Callable[_P, _R], /) -> TenantTask[_P, _R]: ...
@overload
def tenant_task(
    *, app: Celery | None = ..., bind: Literal[False] = ..., **options: Any
) -> Callable[[Callable[_P, _R]], TenantTask[_P, _R]]: ...
@overload
def tenant_task(
    *, app: Celery | None = ..., bind: Literal[True], **options: Any
) -> Callable[[Callable[Concatenate[TenantTask[_P, _R], _P], _R]], TenantTask[_P, _R]]: ...
def tenant_task(
    fun: Callable[..., Any] | None = None, /, *, app: Celery | None = None, **options: Any
) -> Any:
    """Declare a tenant task, like :func:`celery.shared_task` or ``app.task``.

    Usable bare (``@tenant_task``) or with any task option
    (``@tenant_task(bind=True, autoretry_for=(IOError,), app=app)``).  Without
    ``app`` the task is shared, registered with every app as
    :func:`~celery.shared_task` does.  ``base`` defaults to :class:`TenantTask`
    and must be a subclass of it.
    """
    base = options.setdefault("base", TenantTask)
    if not (isinstance(base, type) and issubclass(base, TenantTask)):
        raise ConfigurationError(f"tenant_task base must be a subclass of TenantTask, got {base!r}")
    register = shared_task(**options) if app is None else app.task(**options)

    def decorate(function: Callable[..., Any]) -> Any:
        if inspect.iscoroutinefunction(function):
            name = options.get("name") or f"{function.__module__}.{function.__qualname__}"
            raise ConfigurationError(_ASYNC_REFUSED.format(name=name))
        return register(function)

    if fun is not None:
        return decorate(fun)
    return decorate
