"""``v1a`` (ed25519) signatures and secret rotation, checked by independent verifiers: PyNaCl
(libsodium) for ed25519, the Standard Webhooks reference library for ``v1``. Our signing
code never grades itself here."""

from __future__ import annotations

import base64
import contextlib
import io
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import nacl.exceptions
import nacl.signing
import pytest
from pydantic import SecretStr
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from bridge.__main__ import main
from bridge.demo.patchwork_double import FakePatchwork
from bridge.settings import SettingsError, load_settings
from bridge.signing import PUBLIC_KEY_PREFIX, read_key_file
from bridge.sinks.base import Delivered, Delivery
from bridge.sinks.webhook import WebhookSink
from bridge.webhook.subscriptions import Subscription, load_subscriptions, with_deployment_key
from tests.receiver import Hit, Receiver
from tests.stream_helpers import producer, stream_role, stream_settings

OLD_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
NEW_SECRET = "whsec_" + base64.b64encode(b"a new secret of 32 bytes, random").decode()
BODY = b'{"id": 7, "category": "patch-created", "project": {"link_name": "netdevbpf"}}'


def keys(*args: str) -> str:
    """``patchwork-bridge keys ...``, as an operator runs it, in this process: no process
    boundary is under test here (the test of a missing file runs one)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["keys", *args])
    assert code == 0, err.getvalue()
    return out.getvalue()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with Receiver() as server:
        yield server


async def deliver(receiver: Receiver, **settings: object) -> Hit:
    values: dict[str, object] = {"name": "ci", "url": receiver.url(), "allow_private_network": True}
    sink = WebhookSink(Subscription(**{**values, **settings}))  # type: ignore[arg-type]
    try:
        assert await sink.deliver(Delivery(BODY, "7", "netdevbpf.patch-created")) == Delivered(204)
    finally:
        await sink.close()
    return receiver.requests[-1]


def nacl_verifies(hit: Hit, public_key: str) -> bool:
    """Whether one ``v1a`` signature of the request verifies with ``public_key`` (libsodium)."""
    assert public_key.startswith(PUBLIC_KEY_PREFIX)
    verify_key = nacl.signing.VerifyKey(base64.b64decode(public_key[len(PUBLIC_KEY_PREFIX) :]))
    signed = f"{hit.webhook_id}.{hit.headers['webhook-timestamp']}.".encode() + hit.body
    for part in hit.headers["webhook-signature"].split():
        version, _, signature = part.partition(",")
        if version != "v1a":
            continue
        try:
            verify_key.verify(signed, base64.b64decode(signature))
        except nacl.exceptions.BadSignatureError:
            continue
        return True
    return False


async def test_v1a_signatures_verify_with_the_public_key_alone(
    receiver: Receiver, tmp_path: Path
) -> None:
    key_file = tmp_path / "signing.key"
    key_file.write_text(keys("new"))
    (public,) = keys("public", str(key_file)).split()
    hit = await deliver(receiver, signing_key=read_key_file(key_file))

    assert nacl_verifies(hit, public)
    # Another key does not verify it, and neither does a changed body.
    (other,) = keys("public", str(_new_key_file(tmp_path / "other.key"))).split()
    assert not nacl_verifies(hit, other)
    assert not nacl_verifies(hit._replace(body=hit.body.replace(b"7", b"8")), public)


async def test_a_libsodium_64_byte_secret_key_signs_the_same(receiver: Receiver) -> None:
    """Keys written by the Standard Webhooks libraries hold libsodium's 64 bytes."""
    signing = nacl.signing.SigningKey.generate()
    secret = "whsk_" + base64.b64encode(bytes(signing) + bytes(signing.verify_key)).decode()
    public = "whpk_" + base64.b64encode(bytes(signing.verify_key)).decode()
    assert nacl_verifies(await deliver(receiver, signing_key=secret), public)


async def test_during_a_rotation_receivers_with_either_secret_verify(receiver: Receiver) -> None:
    hit = await deliver(receiver, secret=f"{NEW_SECRET} {OLD_SECRET}")
    headers = dict(hit.headers)
    assert len(headers["webhook-signature"].split()) == 2
    for holder in (OLD_SECRET, NEW_SECRET):
        assert Webhook(holder).verify(hit.body, headers)["id"] == 7
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + base64.b64encode(b"x" * 32).decode()).verify(hit.body, headers)


async def test_secret_and_public_key_sign_side_by_side(receiver: Receiver, tmp_path: Path) -> None:
    """A receiver that still holds the shared secret and one that moved to the public key
    both verify the same request: v1 verifiers skip v1a signatures, and the reverse."""
    key_file = _new_key_file(tmp_path / "signing.key")
    (public,) = keys("public", str(key_file)).split()
    hit = await deliver(receiver, secret=OLD_SECRET, signing_key=read_key_file(key_file))
    assert Webhook(OLD_SECRET).verify(hit.body, dict(hit.headers))["id"] == 7
    assert nacl_verifies(hit, public)


async def test_the_deployment_key_signs_for_every_subscription_without_its_own(
    receiver: Receiver, tmp_path: Path
) -> None:
    deployment = _new_key_file(tmp_path / "deployment.key")
    own = _new_key_file(tmp_path / "own.key")
    file = tmp_path / "subscriptions.toml"
    file.write_text(
        f'[[webhook]]\nname = "plain"\nurl = "{receiver.url()}"\nallow_private_network = true\n'
        f'[[webhook]]\nname = "own"\nurl = "{receiver.url()}"\nallow_private_network = true\n'
        f'signing_key_file = "{own}"\n'
    )
    plain_sub, own_sub = with_deployment_key(
        load_subscriptions(file), SecretStr(read_key_file(deployment))
    )
    (deployment_public,) = keys("public", str(deployment)).split()
    (own_public,) = keys("public", str(own)).split()
    for sub, public, not_public in (
        (plain_sub, deployment_public, own_public),
        (own_sub, own_public, deployment_public),
    ):
        hit = await deliver(receiver, **sub.model_dump(exclude={"name", "url"}))
        assert nacl_verifies(hit, public) and not nacl_verifies(hit, not_public)


def test_an_unusable_key_file_is_one_clear_line(tmp_path: Path, monkeypatch) -> None:
    bad = tmp_path / "bad.key"
    bad.write_text("whsk_not-base64!")
    monkeypatch.setenv("BRIDGE_SIGNING_KEY_FILE", str(bad))
    with pytest.raises(SettingsError, match=r"BRIDGE_SIGNING_KEY_FILE.*bad.key.*keys new") as e:
        load_settings()
    assert "not-base64" not in str(e.value)  # never the key itself
    file = tmp_path / "subscriptions.toml"
    file.write_text(
        f'[[webhook]]\nname = "ci"\nurl = "https://ci.example.org/"\nsigning_key_file = "{bad}"\n'
    )
    with pytest.raises(SettingsError, match="signing_key_file") as e:
        load_subscriptions(file)
    assert "not-base64" not in str(e.value)


def test_keys_public_names_a_missing_file_without_a_traceback(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bridge", "keys", "public", str(tmp_path / "none.key")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert (
        done.stderr.startswith("patchwork-bridge: keys: cannot read") and "none.key" in done.stderr
    )
    assert len(done.stderr.splitlines()) == 1  # one line, no traceback


def _new_key_file(path: Path) -> Path:
    path.write_text(keys("new"))
    return path


@pytest.mark.broker
async def test_the_stream_port_serves_the_public_keys_without_a_token(
    patchwork: FakePatchwork, exchange_name: str, tmp_path: Path
) -> None:
    key_file = _new_key_file(tmp_path / "signing.key")
    settings = stream_settings(patchwork, exchange_name, tmp_path).model_copy(
        update={"signing_key_file": key_file}
    )
    async with (
        producer(settings),
        stream_role(settings) as url,
        httpx.AsyncClient(timeout=10) as client,
    ):
        response = await client.get(f"{url}/v1/signing-keys")
    assert response.status_code == 200
    assert response.json() == {"keys": keys("public", str(key_file)).split()}
