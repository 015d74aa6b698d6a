"""Signed tenant headers, over generated tenants, task ids, task names and keys.

A signature verifies for exactly the tenant, task id and task name it was made
for, with exactly the keys that include the one that made it; no other
triple, however close (a field shifted into its neighbour, one character
changed), verifies.
"""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from tenant_celery.signing import (
    MIN_KEY_BYTES,
    TenantSignatureError,
    key_id,
    sign_tenant,
    verify_signature,
)

fields = st.text(max_size=60)
keys = st.binary(min_size=MIN_KEY_BYTES, max_size=64)


@given(keys, fields, fields, fields)
def test_a_signature_verifies_for_what_it_was_made_for(
    key: bytes, tenant: str, task_id: str, task_name: str
) -> None:
    signature = sign_tenant(key, tenant, task_id, task_name)
    verify_signature((key,), signature, tenant, task_id, task_name)
    assert signature.split(":")[1] == key_id(key)


@given(keys, st.tuples(fields, fields, fields), st.tuples(fields, fields, fields))
def test_no_other_triple_verifies(
    key: bytes, signed: tuple[str, str, str], presented: tuple[str, str, str]
) -> None:
    assume(signed != presented)
    signature = sign_tenant(key, *signed)
    with pytest.raises(TenantSignatureError, match="altered or copied"):
        verify_signature((key,), signature, *presented)


@given(keys, fields, fields, fields, st.data())
def test_shifting_text_between_fields_changes_the_signature(
    key: bytes, tenant: str, task_id: str, task_name: str, data: st.DataObject
) -> None:
    joined = task_id + task_name
    cut = data.draw(st.integers(0, len(joined)))
    if cut == len(task_id):
        return  # the same triple
    assert sign_tenant(key, tenant, task_id, task_name) != sign_tenant(
        key, tenant, joined[:cut], joined[cut:]
    )


@given(keys, keys, fields)
def test_only_listed_keys_verify(signer: bytes, other: bytes, tenant: str) -> None:
    assume(signer != other)
    signature = sign_tenant(signer, tenant, "id", "name")
    verify_signature((other, signer), signature, tenant, "id", "name")  # rotation
    with pytest.raises(TenantSignatureError):
        verify_signature((other,), signature, tenant, "id", "name")
