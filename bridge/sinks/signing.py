"""Standard Webhooks signatures (https://www.standardwebhooks.com/), as receivers verify them.

The signed content is ``"{webhook-id}.{webhook-timestamp}."`` followed by the exact
body bytes; the key is the base64 part of a ``whsec_`` secret.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

SECRET_PREFIX = "whsec_"  # noqa: S105 - a format marker, not a secret
MIN_SECRET_BYTES = 24
MAX_SECRET_BYTES = 64
"""Key sizes the Standard Webhooks spec asks for; enforced when subscriptions are loaded."""


def decode_secret(secret: str) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` secret; ValueError (without the value) if malformed.

    Base64 padding is optional, as in the reference libraries.
    """
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"must start with {SECRET_PREFIX}")
    encoded = secret[len(SECRET_PREFIX) :]
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"must be {SECRET_PREFIX} followed by base64") from None
    if not key:
        raise ValueError(f"must be {SECRET_PREFIX} followed by a non-empty key")
    return key


def sign(secret: str, msg_id: str, timestamp_s: int, body: bytes) -> str:
    """``v1,<base64 HMAC-SHA256>`` for the ``webhook-signature`` header.

    ``timestamp_s`` is the integer Unix time sent as ``webhook-timestamp``; receivers
    reject it when it is more than five minutes off, so sign at send time, per attempt.
    """
    return sign_with_key(decode_secret(secret), msg_id, timestamp_s, body)


def sign_with_key(key: bytes, msg_id: str, timestamp_s: int, body: bytes) -> str:
    """``sign`` with an already decoded key, for a sink that signs every delivery."""
    signed = f"{msg_id}.{timestamp_s}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")
