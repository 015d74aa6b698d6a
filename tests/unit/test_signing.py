"""Signed tenant headers (``tenant_celery_header_signing_keys``) without a worker.

What a message leaves with is read at ``before_task_publish`` on kombu's
in-memory broker; what a worker does with a message is played by
``Task.apply`` (a message's request, without :class:`TenantTask`'s own
producer side), which goes through the same checks as a worker.  Real
workers are in tests/integration/test_signing_worker.py.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, Task, chain, chord, group

from tenant_celery import (
    ConfigurationError,
    TenantConflict,
    TenantContextMissing,
    current_tenant,
    propagation,
    tenant_context,
    tenant_rejected,
    tenant_task,
)
from tenant_celery.config import header_name
from tenant_celery.propagation import _carry_tenant, _leave_tenant, may_vouch_for, vouching
from tenant_celery.signing import (
    MIN_KEY_BYTES,
    SIGNATURE_HEADER,
    TenantSignatureError,
    key_id,
    parse_signing_keys,
    sign_fan_out,
    sign_tenant,
    signing_keys,
    verify_fan_out,
    verify_signature,
)

A = "6f1c1b2e-8c1e-4b8e-9a57-1d3b1a0c000a"
B = "6f1c1b2e-8c1e-4b8e-9a57-1d3b1a0c000b"
NEW = "new-signing-key-0123456789abcdef-NEW"
OLD = "old-signing-key-0123456789abcdef-OLD"
OTHER = "someone-elses-key-0123456789abcdef"
TASK_ID = "0b6b7c3e-1111-4a4a-8888-000000000001"


# ------------------------------------------------------------------ the keys setting


def test_keys_from_app_conf_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    app = Celery("keys", set_as_current=False)
    assert signing_keys(app) == ()  # unset: off
    monkeypatch.setenv("TENANT_CELERY_HEADER_SIGNING_KEYS", f" {NEW} , {OLD}")
    assert signing_keys(app) == (NEW.encode(), OLD.encode())
    app.conf.tenant_celery_header_signing_keys = [OLD.encode()]  # app.conf beats the env
    assert signing_keys(app) == (OLD.encode(),)
    app.conf.tenant_celery_header_signing_keys = (NEW, OLD)
    assert signing_keys(app) == (NEW.encode(), OLD.encode())


def test_key_forms() -> None:
    assert parse_signing_keys(None) == ()
    assert parse_signing_keys("") == ()
    assert parse_signing_keys(f"{NEW},{OLD}") == (NEW.encode(), OLD.encode())
    assert parse_signing_keys(NEW.encode()) == (NEW.encode(),)
    with_comma = "a,key,that,holds,commas,in,a,list,is,one,key"
    assert parse_signing_keys([with_comma]) == (with_comma.encode(),)


SECRET = "short-secret-value"


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ([], "empty list"),
        (f"{NEW},", "key 2 is empty"),
        (f"{NEW},,{OLD}", "key 2 is empty"),
        ([NEW, ""], "key 2 is empty"),
        (SECRET, "key 1 is shorter than 32 bytes"),
        ([NEW, SECRET.encode()], "key 2 is shorter than 32 bytes"),
        ([NEW, 12345], "key 2 is of type int"),
        ([[NEW]], "key 1 is of type list"),
        ({"key": NEW}, "of type dict"),
        (12345, "of type int"),
    ],
)
def test_unusable_keys_are_refused_without_echoing_them(value: object, problem: str) -> None:
    app = Celery("keys", set_as_current=False)
    app.conf.tenant_celery_header_signing_keys = value
    with pytest.raises(ConfigurationError) as info:
        signing_keys(app)
    message = str(info.value)
    assert "tenant_celery_header_signing_keys" in message
    assert problem in message
    for secret in (NEW, SECRET, "key,that"):
        assert secret not in message


def test_minimum_length_is_32_bytes() -> None:
    assert MIN_KEY_BYTES == 32
    assert parse_signing_keys("k" * 32) == (b"k" * 32,)
    with pytest.raises(ConfigurationError):
        parse_signing_keys("k" * 31)
    # Length counts bytes: 11 three-byte characters are 33 bytes.
    assert parse_signing_keys("€" * 11) == (("€" * 11).encode(),)


def test_signature_header_cannot_be_the_tenant_header() -> None:
    app = Celery("keys", set_as_current=False)
    for name in (SIGNATURE_HEADER, "x_correlation_id"):
        app.conf.tenant_celery_header = name
        with pytest.raises(ConfigurationError, match="tenant_celery_header"):
            header_name(app)


# --------------------------------------------------------------- sign and verify


def test_signature_form_and_key_id() -> None:
    signature = sign_tenant(NEW.encode(), A, TASK_ID, "shop.observe")
    version, kid, mac = signature.split(":")
    assert (version, kid, len(mac)) == ("v1", key_id(NEW.encode()), 64)
    assert NEW not in signature
    assert key_id(NEW.encode()) != key_id(OLD.encode())


def test_verify_accepts_any_listed_key_and_nothing_else() -> None:
    keys = (NEW.encode(), OLD.encode())
    for key in keys:
        verify_signature(keys, sign_tenant(key, A, TASK_ID, "t"), A, TASK_ID, "t")
    with pytest.raises(TenantSignatureError, match="key this process does not accept") as info:
        verify_signature(keys, sign_tenant(OTHER.encode(), A, TASK_ID, "t"), A, TASK_ID, "t")
    assert info.value.reason == "bad-signature"
    assert key_id(OTHER.encode()) in str(info.value)


@pytest.mark.parametrize(
    ("tenant", "task_id", "task_name"),
    [
        (B, TASK_ID, "t"),  # another tenant
        (A, "0b6b7c3e-1111-4a4a-8888-000000000002", "t"),  # copied to another task id
        (A, TASK_ID, "t2"),  # copied to another task
    ],
)
def test_tampered_field_is_refused(tenant: str, task_id: str, task_name: str) -> None:
    keys = (NEW.encode(),)
    signature = sign_tenant(keys[0], A, TASK_ID, "t")
    with pytest.raises(TenantSignatureError, match="altered or copied") as info:
        verify_signature(keys, signature, tenant, task_id, task_name)
    assert info.value.reason == "bad-signature"
    assert isinstance(info.value, TenantContextMissing)  # refused like a missing tenant


def test_fields_cannot_be_shifted_into_each_other() -> None:
    key = NEW.encode()
    assert sign_tenant(key, A, "x:y", "z") != sign_tenant(key, A, "x", "y:z")
    assert sign_tenant(key, A, "", "xy") != sign_tenant(key, A, "x", "y")


@pytest.mark.parametrize(
    "signature",
    [
        "",
        "v1",
        "v2:00000000:" + "0" * 64,
        "v1:0000000:" + "0" * 64,
        "v1:00000000:" + "0" * 63,
        "v1:00000000:" + "0" * 64 + "\n",
        "V1:00000000:" + "0" * 64,
        b"v1:00000000:" + b"0" * 64,
        ["v1"],
        12,
    ],
)
def test_malformed_signature_is_refused(signature: object) -> None:
    with pytest.raises(TenantSignatureError, match="malformed") as info:
        verify_signature((NEW.encode(),), signature, A, TASK_ID, "t")
    assert info.value.reason == "bad-signature"


def test_missing_signature_is_unsigned() -> None:
    with pytest.raises(TenantSignatureError, match="not signed") as info:
        verify_signature((NEW.encode(),), None, A, TASK_ID, "t")
    assert info.value.reason == "unsigned"


# -------------------------------------------------------------------- producer side


@pytest.fixture
def signed_app(app: Celery) -> Celery:
    """The unit tests' in-memory app, signing with ``NEW`` and accepting ``OLD`` too."""
    app.conf.tenant_celery_header_signing_keys = [NEW, OLD]
    return app


def verifies(headers: dict[str, Any], keys: tuple[str, ...] = (NEW,)) -> bool:
    try:
        verify_signature(
            tuple(k.encode() for k in keys),
            headers.get(SIGNATURE_HEADER),
            headers["tenant_id"],
            headers["id"],
            headers["task"],
        )
    except TenantSignatureError:
        return False
    return True


def test_every_publish_path_is_signed_with_the_newest_key(
    signed_app: Celery, published: list[dict[str, Any]]
) -> None:
    @tenant_task(app=signed_app, shared=False)
    def observe(tag: object = None) -> None: ...

    with tenant_context(A):
        observe.delay("delay")
        observe.apply_async(("countdown",), countdown=30)
        signed_app.send_task("by.name")
        chain(observe.s(1), observe.s()).delay()
        group(observe.s(i) for i in range(2)).delay()
    observe.delay(tenant_id=B)  # an explicit tenant, outside any context
    observe.apply_async(headers={"tenant_id": B})
    assert len(published) == 8
    for headers in published:
        assert verifies(headers, (NEW,)), headers
        assert headers[SIGNATURE_HEADER].split(":")[1] == key_id(NEW.encode())
        assert not verifies(headers, (OLD,))
    assert [h["tenant_id"] for h in published] == [A] * 6 + [B] * 2


def test_a_tenant_task_is_signed_by_its_own_app(
    published: list[dict[str, Any]],
) -> None:
    # The publish hook is not told the app; another app may be the current one.
    signing = Celery("signing", broker="memory://", set_as_current=False)
    signing.conf.tenant_celery_header_signing_keys = [NEW]
    other = Celery("other", broker="memory://", set_as_current=True)

    @tenant_task(app=signing, shared=False)
    def observe() -> None: ...

    try:
        with tenant_context(A):
            observe.delay()
            other.send_task("by.name")  # the current app: no keys, nothing signed
    finally:
        signing.close()
        other.close()
    assert verifies(published[0])
    assert SIGNATURE_HEADER not in published[1]


def test_nothing_is_signed_when_signing_is_off(
    app: Celery, published: list[dict[str, Any]]
) -> None:
    with tenant_context(A):
        app.send_task("by.name")
        app.send_task("by.name", headers={SIGNATURE_HEADER: "left alone"})
    assert SIGNATURE_HEADER not in published[0]
    assert published[1][SIGNATURE_HEADER] == "left alone"


def test_header_for_another_tenant_is_left_unsigned(
    signed_app: Celery, published: list[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    # A plain task's retry copies its request's headers, signature included:
    # only a header naming the publishing context is vouched for.
    stale = sign_tenant(NEW.encode(), B, "some-other-task-id", "by.name")
    with caplog.at_level(logging.WARNING, "tenant_celery"), tenant_context(A):
        signed_app.send_task("by.name", headers={"tenant_id": B, SIGNATURE_HEADER: stale})
    signed_app.send_task("by.name", headers={"tenant_id": B})  # no context at all
    assert [h["tenant_id"] for h in published] == [B, B]
    assert all(SIGNATURE_HEADER not in h for h in published)
    assert "left unsigned" in caplog.text


def test_retry_is_signed_again_for_the_same_task_id(
    signed_app: Celery, published: list[dict[str, Any]]
) -> None:
    with tenant_context(A):
        signed_app.send_task("by.name", task_id=TASK_ID)
        # a retry: same id, the previous message's headers carried over
        carried = {"tenant_id": A, SIGNATURE_HEADER: "v1:00000000:" + "0" * 64}
        signed_app.send_task("by.name", task_id=TASK_ID, headers=carried)
    first, retry = published
    assert first["id"] == retry["id"] == TASK_ID
    assert verifies(first)
    assert verifies(retry)
    assert carried[SIGNATURE_HEADER].startswith("v1:00000000")  # the caller's dict is untouched


def test_unusable_keys_refuse_to_publish(app: Celery, published: list[dict[str, Any]]) -> None:
    app.conf.tenant_celery_header_signing_keys = ["too short"]

    @tenant_task(app=app, shared=False)
    def observe() -> None: ...

    with tenant_context(A), pytest.raises(ConfigurationError, match="signing_keys"):
        observe.delay()
    assert published == []


# ------------------------------------------------------------ what the worker does


class Tasks:
    """Tasks of an eager app that signs with ``NEW`` and accepts ``OLD``."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.ran: list[str | None] = []
        ran = self.ran

        @tenant_task(app=app, shared=False)
        def observe(tag: object = None) -> dict[str, Any]:
            ran.append(current_tenant())
            return {"tenant": current_tenant(), "tag": tag}

        @tenant_task(app=app, shared=False)
        def collect(results: list[dict[str, Any]]) -> dict[str, Any]:
            return {"tenant": current_tenant(), "parts": [r["tenant"] for r in results]}

        @app.task(shared=False)
        def plain() -> str | None:
            return current_tenant()

        self.observe, self.collect, self.plain = observe, collect, plain


@pytest.fixture
def eager() -> Iterator[Tasks]:
    app = Celery("signed-eager", set_as_current=False)
    app.conf.update(
        task_always_eager=True,
        task_eager_propagates=True,
        task_store_eager_result=False,
        broker_url="memory://",
        result_backend="cache+memory://",
        tenant_celery_header_signing_keys=[NEW, OLD],
    )
    yield Tasks(app)
    assert current_tenant() is None, "a task left its tenant behind"


@pytest.fixture
def rejected() -> Iterator[list[tuple[str, type[BaseException]]]]:
    seen: list[tuple[str, type[BaseException]]] = []

    def on_rejected(sender: Any, reason: str, exc: BaseException, **_: Any) -> None:
        seen.append((reason, type(exc)))

    tenant_rejected.connect(on_rejected)
    yield seen
    tenant_rejected.disconnect(on_rejected)


def test_eager_calls_sign_and_verify(eager: Tasks, rejected: list[Any]) -> None:
    with tenant_context(A):
        assert eager.observe.delay(1).get() == {"tenant": A, "tag": 1}
        result = chord((eager.observe.s(i) for i in range(2)), eager.collect.s()).delay()
        assert result.get() == {"tenant": A, "parts": [A, A]}
    assert eager.observe.apply(kwargs={"tenant_id": B}).get()["tenant"] == B
    assert rejected == []


def message(tasks: Tasks, headers: dict[str, Any], **options: Any) -> Any:
    """Run ``observe`` as a received message with these headers (no producer side)."""
    return Task.apply(tasks.observe, task_id=TASK_ID, headers=headers, **options)


def test_signed_message_runs(eager: Tasks, rejected: list[Any]) -> None:
    for key in (NEW, OLD):  # rotation: a message signed with the old key still runs
        signature = sign_tenant(key.encode(), A, TASK_ID, eager.observe.name)
        assert message(eager, {"tenant_id": A, SIGNATURE_HEADER: signature}).get()["tenant"] == A
    assert rejected == []
    assert eager.ran == [A, A]


def test_forged_messages_are_refused_before_the_body(eager: Tasks, rejected: list[Any]) -> None:
    name = eager.observe.name
    forged = [
        ({"tenant_id": A}, {}),  # unsigned
        ({}, {"kwargs": {"tenant_id": A}}),  # named by the arguments alone: unsigned
        ({"tenant_id": A, SIGNATURE_HEADER: sign_tenant(OTHER.encode(), A, TASK_ID, name)}, {}),
        ({"tenant_id": B, SIGNATURE_HEADER: sign_tenant(NEW.encode(), A, TASK_ID, name)}, {}),
        ({"tenant_id": A, SIGNATURE_HEADER: sign_tenant(NEW.encode(), A, "other-id", name)}, {}),
        ({"tenant_id": A, SIGNATURE_HEADER: sign_tenant(NEW.encode(), A, TASK_ID, "other")}, {}),
        ({"tenant_id": A, SIGNATURE_HEADER: "v1:garbage"}, {}),
    ]
    for headers, options in forged:
        with pytest.raises(TenantSignatureError):
            message(eager, headers, **options)
    assert eager.ran == []
    assert (
        rejected
        == [("unsigned", TenantSignatureError)] * 2 + [("bad-signature", TenantSignatureError)] * 5
    )


def test_old_key_refused_once_dropped(eager: Tasks, rejected: list[Any]) -> None:
    eager.app.conf.tenant_celery_header_signing_keys = [NEW]
    signature = sign_tenant(OLD.encode(), A, TASK_ID, eager.observe.name)
    with pytest.raises(TenantSignatureError, match="does not accept"):
        message(eager, {"tenant_id": A, SIGNATURE_HEADER: signature})
    assert eager.ran == []


def worker_request(task: Task[Any, Any], **headers: Any) -> None:
    """Push a request as a worker builds it: custom headers become attributes."""
    task.push_request(id=TASK_ID, is_eager=False, called_directly=False, headers=None, **headers)


def test_plain_task_enters_only_a_verified_tenant(
    eager: Tasks, caplog: pytest.LogCaptureFixture
) -> None:
    plain = eager.plain
    valid = sign_tenant(NEW.encode(), A, TASK_ID, plain.name)
    for headers, expected in [
        ({"tenant_id": A, SIGNATURE_HEADER: valid}, A),
        ({"tenant_id": A}, None),
        ({"tenant_id": A, SIGNATURE_HEADER: sign_tenant(NEW.encode(), A, "x", plain.name)}, None),
    ]:
        worker_request(plain, **headers)
        try:
            with tenant_context(B):  # what a thread may hold: never lent to the task
                _carry_tenant(task=plain)
                assert current_tenant() == expected
                _leave_tenant(task=plain)
        finally:
            plain.pop_request()
    assert "invalid or not signed" in caplog.text


def test_metrics_label_only_a_verified_tenant(eager: Tasks) -> None:
    from tenant_celery.metrics import _tenant_of  # noqa: PLC0415

    observe = eager.observe
    valid = sign_tenant(NEW.encode(), A, TASK_ID, observe.name)
    for headers, expected in [
        ({"tenant_id": A, SIGNATURE_HEADER: valid}, A),
        ({"tenant_id": B, SIGNATURE_HEADER: valid}, None),
        ({"tenant_id": B}, None),
    ]:
        worker_request(observe, **headers)
        try:
            assert _tenant_of(observe, observe.request) == expected
        finally:
            observe.pop_request()


def test_main_process_handling_enters_only_a_verified_tenant(eager: Tasks) -> None:
    # What the worker's main process does for a lost or timed-out message: its
    # errbacks and chord failures are published inside the message's tenant.
    from celery.contrib.testing.mocks import TaskMessage  # noqa: PLC0415

    from tenant_celery.request import TenantRequest  # noqa: PLC0415

    observe = eager.observe
    valid = sign_tenant(NEW.encode(), A, TASK_ID, observe.name)
    for headers, expected in [
        ({"tenant_id": A, SIGNATURE_HEADER: valid}, A),
        ({"tenant_id": A}, None),
        ({"tenant_id": B, SIGNATURE_HEADER: valid}, None),
    ]:
        message = TaskMessage(observe.name, id=TASK_ID, **headers)
        request = TenantRequest(message, app=eager.app, task=observe)
        with tenant_context(B), request._message_tenant():
            assert current_tenant() == expected


def _signed_request(eager: Tasks, **options: Any) -> Any:
    from celery.contrib.testing.mocks import TaskMessage  # noqa: PLC0415

    from tenant_celery.request import TenantRequest  # noqa: PLC0415

    observe = eager.observe
    signature = sign_tenant(NEW.encode(), A, TASK_ID, observe.name)
    message = TaskMessage(
        observe.name, id=TASK_ID, tenant_id=A, **{SIGNATURE_HEADER: signature}, **options
    )
    return TenantRequest(message, app=eager.app, task=observe)


def test_main_process_verifies_a_messages_tenant_once(
    eager: Tasks, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The log context, the events and every main-process handling of one message
    # share one verification of its tenant (an HMAC with signing on).
    from celery.worker.request import Request  # noqa: PLC0415

    from tenant_celery import request as request_module  # noqa: PLC0415

    checks: list[str] = []
    check = request_module.signing.check_signature

    def counted(*args: Any) -> None:
        checks.append(args[1])
        check(*args)

    monkeypatch.setattr(request_module.signing, "check_signature", counted)
    seen: list[str | None] = []
    monkeypatch.setattr(Request, "_announce_revoked", lambda *_: seen.append(current_tenant()))
    from celery.worker.state import revoked as revoked_ids  # noqa: PLC0415

    request = _signed_request(eager, expires="2000-01-01T00:00:00+00:00")
    assert request._log_context() == (A, None)
    with request._message_tenant():
        assert current_tenant() == A
    try:
        assert request.revoked()  # expired: Celery stores and announces it, in the tenant
    finally:
        revoked_ids.discard(TASK_ID)  # Celery remembers an expired id as revoked
    assert seen == [A]
    assert checks == [A]


def test_a_message_nothing_revokes_is_checked_without_reading_its_tenant(
    eager: Tasks, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Celery asks every message whether it was revoked before it runs: when none of
    # the marks its check reads is set, the answer needs no tenant (and costs none).
    from celery.worker.request import Request  # noqa: PLC0415
    from celery.worker.state import revoked as revoked_ids  # noqa: PLC0415

    from tenant_celery.request import TenantRequest  # noqa: PLC0415

    request = _signed_request(eager)
    read: list[bool] = []
    verified = TenantRequest._verified_tenant

    def reading(self: Any) -> str | None:
        read.append(True)
        return verified(self)

    monkeypatch.setattr(TenantRequest, "_verified_tenant", reading)
    assert not request.revoked()
    assert read == []
    assert Request.revoked(request) is False  # Celery's own check, this release, agrees
    seen: list[str | None] = []
    monkeypatch.setattr(Request, "_announce_revoked", lambda *_: seen.append(current_tenant()))
    revoked_ids.add(TASK_ID)  # as `celery control revoke` does in the worker
    try:
        with tenant_context(B):  # never the thread's tenant: the message's
            assert _signed_request(eager).revoked()
    finally:
        revoked_ids.discard(TASK_ID)
    assert seen == [A]
    assert read == [True]


@pytest.mark.parametrize("mark", ["stamp", "already", "id"])
def test_a_message_something_revokes_is_revoked_in_its_tenant(
    eager: Tasks, monkeypatch: pytest.MonkeyPatch, mark: str
) -> None:
    # Each mark Celery's check reads makes the message revoked, and the check that
    # stores it runs in the message's tenant.
    from celery.worker import state  # noqa: PLC0415
    from celery.worker.request import Request  # noqa: PLC0415

    seen: list[str | None] = []
    monkeypatch.setattr(Request, "_announce_revoked", lambda *_: seen.append(current_tenant()))
    options: dict[str, Any] = {}
    if mark == "stamp":
        options = {"stamped_headers": ["batch"], "stamps": {"batch": "b-1"}}
        monkeypatch.setitem(state.revoked_stamps, "batch", "b-1")
    request = _signed_request(eager, **options)
    if mark == "already":
        request._already_revoked = True
    if mark == "id":
        state.revoked.add(TASK_ID)
    try:
        with tenant_context(B):
            assert request.revoked()
    finally:
        state.revoked.discard(TASK_ID)
    assert seen == ([] if mark == "already" else [A])


def test_signature_refusals_count_as_rejected(eager: Tasks) -> None:
    from prometheus_client import CollectorRegistry  # noqa: PLC0415

    from tenant_celery import install_metrics  # noqa: PLC0415
    from tenant_celery.metrics import TASK_FAILURE_TOTAL, TASK_REJECTED_TOTAL  # noqa: PLC0415

    registry = CollectorRegistry()
    install_metrics(eager.app, registry=registry)
    for headers in ({"tenant_id": A}, {"tenant_id": A, SIGNATURE_HEADER: "v1:bad"}):
        with pytest.raises(TenantSignatureError):
            message(eager, headers)
    labels = {"task_name": eager.observe.name}
    assert registry.get_sample_value(TASK_REJECTED_TOTAL, labels) == 2
    assert registry.get_sample_value(TASK_FAILURE_TOTAL, labels) in (None, 0)


def test_the_documented_key_command_makes_a_usable_key() -> None:
    # docs/howto/signing.md: python -c "import secrets; print(secrets.token_urlsafe(32))"
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    page = (Path(__file__).resolve().parents[2] / "docs" / "howto" / "signing.md").read_text()
    command = 'python -c "import secrets; print(secrets.token_urlsafe(32))"'
    assert f"$ {command}" in page
    code = command.split('"')[1]
    keys = [
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.strip()
        for _ in range(2)
    ]
    assert keys[0] != keys[1]
    assert parse_signing_keys(",".join(keys)) == tuple(k.encode() for k in keys)


# ------------------------------------------------ authority: what a worker may sign


def test_fan_out_signature_is_its_own_domain() -> None:
    key = NEW.encode()
    fan_out = sign_fan_out(key, TASK_ID, "tenant_celery.for_each_tenant")
    verify_fan_out((OLD.encode(), key), fan_out, TASK_ID, "tenant_celery.for_each_tenant")
    with pytest.raises(TenantSignatureError):
        verify_fan_out((key,), fan_out, TASK_ID + "x", "tenant_celery.for_each_tenant")
    with pytest.raises(TenantSignatureError, match="not signed"):
        verify_fan_out((key,), None, TASK_ID, "tenant_celery.for_each_tenant")
    # Neither form of signature can be read as the other, whatever the parser accepts.
    with pytest.raises(TenantSignatureError):
        verify_fan_out((key,), sign_tenant(key, "", TASK_ID, "t"), TASK_ID, "t")
    with pytest.raises(TenantSignatureError):
        verify_signature((key,), sign_fan_out(key, TASK_ID, "t"), "", TASK_ID, "t")


def test_authority_outside_a_worker_inside_a_message_and_in_vouching() -> None:
    # Application code outside a worker names any tenant.
    assert may_vouch_for(A)
    assert may_vouch_for(B)
    with vouching(A):  # handling a message verified for A
        assert may_vouch_for(A)
        assert not may_vouch_for(B)
        with vouching(B):  # fan_out's choice, inside that
            assert may_vouch_for(B)
        assert not may_vouch_for(B)
    with vouching(None):  # a message that names no verified tenant
        assert not may_vouch_for(A)
    assert may_vouch_for(B)


def test_worker_process_code_outside_a_message_vouches_for_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(propagation._Process, "in_worker", True)
    assert not may_vouch_for(A)
    with vouching(A):
        assert may_vouch_for(A)


def test_a_message_of_one_tenant_cannot_publish_for_another(
    eager: Tasks, published: list[dict[str, Any]]
) -> None:
    eager.app.conf.task_always_eager = False
    with vouching(A):
        with tenant_context(A), pytest.raises(TenantConflict, match="fan_out"):
            eager.observe.apply_async(kwargs={"tenant_id": B})
        with pytest.raises(TenantConflict, match="fan_out"):
            eager.observe.apply(kwargs={"tenant_id": B})
        with pytest.raises(TenantConflict, match="tenant argument"):
            eager.observe(tenant_id=B)  # as celery.starmap calls a task
    assert published == []
    assert eager.ran == []


def test_direct_call_naming_a_tenant_is_a_choice_when_signing_is_off(eager: Tasks) -> None:
    eager.app.conf.tenant_celery_header_signing_keys = None
    with vouching(A):
        assert eager.observe(tenant_id=B)["tenant"] == B


def test_main_process_handling_vouches_only_for_the_verified_tenant(eager: Tasks) -> None:
    from celery.contrib.testing.mocks import TaskMessage  # noqa: PLC0415

    from tenant_celery.request import TenantRequest  # noqa: PLC0415

    observe = eager.observe
    valid = sign_tenant(NEW.encode(), A, TASK_ID, observe.name)
    for headers, expected in [
        ({"tenant_id": A, SIGNATURE_HEADER: valid}, A),
        ({"tenant_id": A}, None),  # unsigned
        # one message, two tenants: the nested headers disagree with the message's own
        ({"tenant_id": A, SIGNATURE_HEADER: valid, "headers": {"tenant_id": B}}, None),
    ]:
        message = TaskMessage(observe.name, id=TASK_ID, **headers)
        request = TenantRequest(message, app=eager.app, task=observe)
        with request._message_tenant():
            assert current_tenant() == expected
            assert may_vouch_for(A) is (expected == A)
            assert not may_vouch_for(B)


def test_a_fan_out_message_is_signed_by_trusted_code_only(
    signed_app: Celery, published: list[dict[str, Any]]
) -> None:
    fan_out_task = "tenant_celery.for_each_tenant"
    signed_app.send_task(fan_out_task, ("t", "m:f", []))  # celery beat
    with tenant_context(A):
        signed_app.send_task(fan_out_task, ("t", "m:f", []))  # a web request
    with vouching(A):
        signed_app.send_task(fan_out_task, ("t", "m:f", []))  # a worker handling A's message
    beat, web, worker = published
    for headers in (beat, web):
        verify_fan_out((NEW.encode(),), headers[SIGNATURE_HEADER], headers["id"], fan_out_task)
    assert SIGNATURE_HEADER not in worker
