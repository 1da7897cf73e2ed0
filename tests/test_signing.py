"""Standard Webhooks signatures, checked by the reference verifier rather than by our own code."""

from __future__ import annotations

import base64
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from bridge.signing import decode_secret, sign

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
BODY = b'{"id": 7, "category": "patch-created", "project": {"link_name": "netdevbpf"}}'


def headers(msg_id: str, timestamp_s: int, signature: str) -> dict[str, str]:
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp_s),
        "webhook-signature": signature,
    }


def test_signature_verifies_with_the_standardwebhooks_library() -> None:
    now = int(time.time())
    signature = sign(SECRET, "7", now, BODY)
    assert signature.startswith("v1,")
    assert Webhook(SECRET).verify(BODY, headers("7", now, signature))["id"] == 7


def test_signature_matches_the_reference_signer_exactly() -> None:
    from datetime import UTC, datetime

    reference = Webhook(SECRET).sign(
        "msg_1", datetime.fromtimestamp(1700000000, UTC), BODY.decode()
    )
    assert sign(SECRET, "msg_1", 1700000000, BODY) == reference


@given(
    st.binary(min_size=24, max_size=64),
    st.text(alphabet=st.characters(codec="ascii", exclude_characters=" "), min_size=1, max_size=30),
    st.text(max_size=200),
)
def test_any_key_id_and_body_verify(key: bytes, msg_id: str, text: str) -> None:
    secret = "whsec_" + base64.b64encode(key).decode()
    body = text.encode()
    now = int(time.time())
    Webhook(secret).verify(
        body, headers(msg_id, now, sign(secret, msg_id, now, body)), json_parse=False
    )


def test_a_changed_body_or_id_does_not_verify() -> None:
    now = int(time.time())
    signature = sign(SECRET, "7", now, BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(BODY + b" ", headers("7", now, signature))
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(BODY, headers("8", now, signature))


def test_unpadded_base64_secret_is_accepted() -> None:
    key = b"k" * 25
    padded = base64.b64encode(key).decode()
    assert padded.endswith("=")
    assert decode_secret("whsec_" + padded.rstrip("=")) == key


@pytest.mark.parametrize(
    "secret", ["MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_", "whsec_not base64!"]
)
def test_malformed_secret_is_refused_without_echoing_it(secret: str) -> None:
    with pytest.raises(ValueError) as caught:
        sign(secret, "7", 1700000000, BODY)
    tail = secret.removeprefix("whsec_")
    assert not tail or tail not in str(caught.value)
