"""A row in the broker's message table that is not a kombu message is dropped, never raised.

Anyone who can write the table (an attacker with broker access) could otherwise
stop every worker that claims the row, after every restart.
"""

from __future__ import annotations

import pytest

from tenant_celery.transport import _message


@pytest.mark.parametrize(
    "payload",
    [
        "not json",
        '["a list"]',
        '{"no": "body"}',
        '{"body": "x", "properties": []}',
        '{"body": "x", "a": {"__type__": "decimal", "__value__": "zz"}}',
        '{"body": "x", "a": {"__type__": "bytes", "__value__": 1}}',
        '{"body": "x", "a": {"__type__": "datetime", "__value__": []}}',
        "[" * 100_000 + "]" * 100_000,
    ],
)
def test_a_payload_that_is_not_a_message_is_none(payload: str) -> None:
    assert _message(payload) is None


def test_a_message_is_read() -> None:
    assert _message('{"body": "x", "properties": {}}') == {
        "body": "x",
        "properties": {"delivery_info": {}},
    }
