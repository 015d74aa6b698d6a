"""tenant_context, current_tenant, require_tenant and the tenant id parsers."""

from __future__ import annotations

import asyncio
import threading
import uuid

import pytest

from tenant_celery import (
    InvalidTenantId,
    TenantContextMissing,
    current_tenant,
    integer_tenant_id,
    parse_tenant_id,
    require_tenant,
    set_tenant_id_parser,
    slug_tenant_id,
    tenant_context,
    uuid_tenant_id,
)

A = "6f1c1b2e-8c1e-4b8e-9a57-1d3b1a0c0001"
B = "6f1c1b2e-8c1e-4b8e-9a57-1d3b1a0c0002"


def test_outside_any_tenant() -> None:
    assert current_tenant() is None
    with pytest.raises(TenantContextMissing, match="tenant_context"):
        require_tenant()


def test_context_sets_canonical_form_and_restores() -> None:
    with tenant_context(uuid.UUID(A.upper())) as entered:
        assert entered == A
        assert current_tenant() == A
        assert require_tenant() == A
    assert current_tenant() is None


def test_context_decorates_a_function_and_is_entered_once_at_a_time() -> None:
    @tenant_context(A)
    def inside() -> str | None:
        return current_tenant()

    assert [inside(), inside()] == [A, A]
    assert current_tenant() is None
    context = tenant_context(B)
    with context, pytest.raises(RuntimeError, match="once at a time"), context:
        pass
    assert current_tenant() is None
    with context:  # again, once left
        assert current_tenant() == B
    assert current_tenant() is None


def test_an_invalid_id_enters_nothing() -> None:
    context = tenant_context("not a tenant")
    with pytest.raises(InvalidTenantId), context:
        pass
    assert current_tenant() is None


def test_contexts_nest_and_restore_on_error() -> None:
    def fail_inside_b() -> None:
        with tenant_context(B):
            assert current_tenant() == B
            raise RuntimeError

    with tenant_context(A):
        with pytest.raises(RuntimeError):
            fail_inside_b()
        assert current_tenant() == A
    assert current_tenant() is None


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        ("not-a-uuid", "str"),
        ("s3cr3t-password-value", "str"),
        (12, "int"),
        (None, "NoneType"),
        (b"\x00" * 16, "bytes"),
        ("x" * 10_000, "str"),
    ],
)
def test_invalid_id_names_type_never_value(value: object, type_name: str) -> None:
    with pytest.raises(InvalidTenantId) as info, tenant_context(value):
        pytest.fail("entered a tenant with an invalid id")
    message = str(info.value)
    assert f"type {type_name}" in message
    if isinstance(value, str):
        assert value not in message
    assert current_tenant() is None


def test_invalid_id_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="UUID"):
        parse_tenant_id("nope")


def test_threads_see_their_own_tenant() -> None:
    seen: dict[str, str | None] = {}
    barrier = threading.Barrier(2)

    def run(name: str, tenant: str) -> None:
        with tenant_context(tenant):
            barrier.wait()
            seen[name] = current_tenant()

    threads = [
        threading.Thread(target=run, args=("a", A)),
        threading.Thread(target=run, args=("b", B)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == {"a": A, "b": B}
    assert current_tenant() is None


def test_asyncio_tasks_see_their_own_tenant() -> None:
    async def run(tenant: str) -> str | None:
        with tenant_context(tenant):
            await asyncio.sleep(0.01)
            return current_tenant()

    async def main() -> list[str | None]:
        return list(await asyncio.gather(run(A), run(B)))

    assert asyncio.run(main()) == [A, B]


@pytest.mark.parametrize(
    ("parser", "good", "canonical", "bad"),
    [
        (uuid_tenant_id, uuid.UUID(A), A, ["", "1", A + "0"]),
        (integer_tenant_id, "42", "42", [0, -1, True, "4.2", "0x10", 2**63, "", "12a"]),
        (integer_tenant_id, 7, "7", [None]),
        (slug_tenant_id, "acme-corp_1", "acme-corp_1", ["Acme", "-acme", "a" * 64, "a b", ""]),
    ],
)
def test_builtin_parsers(parser: object, good: object, canonical: str, bad: list[object]) -> None:
    previous = set_tenant_id_parser(parser)  # type: ignore[arg-type]
    try:
        assert parse_tenant_id(good) == canonical
        for value in bad:
            with pytest.raises(InvalidTenantId):
                parse_tenant_id(value)
    finally:
        set_tenant_id_parser(previous)


def test_custom_parser_errors_become_invalid_tenant_id() -> None:
    def strict(value: object) -> str:
        if value != "only":
            raise ValueError(f"bad {value}")  # its message is not passed on
        return "only"

    previous = set_tenant_id_parser(strict)
    try:
        assert parse_tenant_id("only") == "only"
        with pytest.raises(InvalidTenantId) as info:
            parse_tenant_id("secret")
        assert "secret" not in str(info.value)
        assert isinstance(info.value.__cause__, ValueError)
    finally:
        set_tenant_id_parser(previous)


def test_parser_must_return_text() -> None:
    previous = set_tenant_id_parser(lambda value: 1)  # type: ignore[arg-type,return-value]
    try:
        with pytest.raises(InvalidTenantId, match="expected a non-empty str"):
            parse_tenant_id("x")
    finally:
        set_tenant_id_parser(previous)


def test_canonical_uuid_text_is_returned_as_it_is() -> None:
    value = str(uuid.uuid4())
    assert uuid_tenant_id(value) is value
    assert uuid_tenant_id(value.upper()) == value  # other forms are still normalised
    assert uuid_tenant_id(value.replace("-", "")) == value
