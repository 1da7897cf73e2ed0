"""Standard Webhooks signatures (https://www.standardwebhooks.com/), as receivers verify them.

The signed content is ``"{webhook-id}.{webhook-timestamp}."`` followed by the exact
body bytes. ``v1`` is its HMAC-SHA256 with the base64 part of a ``whsec_`` secret; ``v1a``
its ed25519 signature with a ``whsk_`` key, which any receiver verifies with the public
``whpk_`` key: one key for every CI, nothing secret handed out. ed25519 comes from
``cryptography`` (PyCA): the Standard Webhooks library's current release (1.3) signs
only ``v1``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

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
    return _v1(key, signed_content(msg_id, timestamp_s, body))


def signed_content(msg_id: str, timestamp_s: int, body: bytes) -> bytes:
    return f"{msg_id}.{timestamp_s}.".encode() + body


def _v1(key: bytes, signed: bytes) -> str:
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


# -- several secrets, and public-key signatures -----------------------------------------------

SIGNING_KEY_PREFIX = "whsk_"
PUBLIC_KEY_PREFIX = "whpk_"
ED25519_SEED_BYTES = 32


def decode_secrets(text: str) -> list[bytes]:
    """The HMAC keys of one or more ``whsec_`` secrets separated by white space (a rotation:
    the new one and the old one, both signing until every receiver has the new one)."""
    secrets = text.split()
    if not secrets:
        raise ValueError(f"must be at least one {SECRET_PREFIX} secret")
    return [decode_secret(secret) for secret in secrets]


def decode_signing_keys(text: str) -> list[Ed25519PrivateKey]:
    """The ed25519 keys of one or more ``whsk_<base64>`` signing keys separated by white
    space; ValueError, without the value, if one is malformed.

    A key is its 32-byte seed, or the 64 bytes of libsodium's secret key (seed and public
    key), as the Standard Webhooks libraries write it.
    """
    keys = []
    for text_key in text.split():
        if not text_key.startswith(SIGNING_KEY_PREFIX):
            raise ValueError(f"must start with {SIGNING_KEY_PREFIX}")
        raw = _b64(text_key[len(SIGNING_KEY_PREFIX) :], SIGNING_KEY_PREFIX)
        if len(raw) not in (ED25519_SEED_BYTES, 2 * ED25519_SEED_BYTES):
            raise ValueError(f"{SIGNING_KEY_PREFIX} must hold a 32- or 64-byte ed25519 key")
        key = Ed25519PrivateKey.from_private_bytes(raw[:ED25519_SEED_BYTES])
        if len(raw) == 2 * ED25519_SEED_BYTES and raw[ED25519_SEED_BYTES:] != _public_raw(key):
            raise ValueError(f"{SIGNING_KEY_PREFIX}: its public half does not match its seed")
        keys.append(key)
    if not keys:
        raise ValueError(f"must be at least one {SIGNING_KEY_PREFIX} key")
    return keys


def read_key_file(path: Path) -> str:
    """The ``whsk_`` keys in ``path``, checked; ValueError naming the file, never a key."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read {path} ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    try:
        decode_signing_keys(text)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc} (make one with `patchwork-bridge keys new`)") from None
    return text


def public_keys(text: str) -> list[str]:
    """The ``whpk_`` public key of each ``whsk_`` key in ``text``: what CIs are given."""
    return [public_key_text(key) for key in decode_signing_keys(text)]


def public_key_text(key: Ed25519PrivateKey) -> str:
    """``whpk_<base64>``: what a receiver verifies ``v1a`` signatures with."""
    return PUBLIC_KEY_PREFIX + base64.b64encode(_public_raw(key)).decode("ascii")


def new_secret() -> str:
    """A fresh ``whsec_`` secret: 32 random bytes, as the Standard Webhooks libraries make."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def new_signing_key() -> str:
    """A fresh ``whsk_`` key (its seed, from the OS's randomness)."""
    seed = Ed25519PrivateKey.generate().private_bytes(
        Encoding.Raw, PrivateFormat.Raw, NoEncryption()
    )
    return SIGNING_KEY_PREFIX + base64.b64encode(seed).decode("ascii")


class Signer:
    """Signs every delivery with each key it holds: ``v1`` (HMAC, a shared ``whsec_``
    secret) and ``v1a`` (ed25519, a ``whsk_`` key whose ``whpk_`` public key receivers
    hold), space-separated in one ``webhook-signature`` header, as the spec allows. A
    receiver accepts the request when one of them verifies with a key it has."""

    def __init__(self, secrets: list[bytes], signing_keys: list[Ed25519PrivateKey]) -> None:
        self._secrets = secrets
        self._signing_keys = signing_keys

    def __bool__(self) -> bool:
        return bool(self._secrets or self._signing_keys)

    def sign(self, msg_id: str, timestamp_s: int, body: bytes) -> str:
        signed = signed_content(msg_id, timestamp_s, body)
        signatures = [_v1(k, signed) for k in self._secrets]
        signatures += [
            "v1a," + base64.b64encode(k.sign(signed)).decode() for k in self._signing_keys
        ]
        return " ".join(signatures)


def _public_raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _b64(encoded: str, prefix: str) -> bytes:
    try:
        return base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"must be {prefix} followed by base64") from None
