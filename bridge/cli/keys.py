"""``patchwork-bridge keys new|public|secret``: keys for webhook signatures.

``secret`` prints a fresh ``whsec_`` secret for a subscription's ``secret`` (``v1``, HMAC:
the receiver holds the same).

``new`` prints a fresh ``whsk_`` signing key (keep it like a password: put it in a file
named by BRIDGE_SIGNING_KEY_FILE or a subscription's ``signing_key_file``). ``public``
prints the ``whpk_`` public key of each key in a file, or of the deployment's, for the
CIs: they verify with it, and hold nothing secret.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bridge.cli.common import CliError, Commands, command
from bridge.settings import load_settings
from bridge.signing import new_secret, new_signing_key, public_keys, read_key_file


def register(commands: Commands) -> None:
    keys = commands.add_parser("keys", help="make an ed25519 signing key, or print public keys")
    actions = keys.add_subparsers(dest="keys_command", required=True)
    actions.add_parser("new", help="print a new whsk_ signing key")
    actions.add_parser("secret", help="print a new whsec_ secret (v1, shared with one receiver)")
    public = actions.add_parser(
        "public", help="print the whpk_ public key of each key in FILE (or the deployment's)"
    )
    public.add_argument("file", nargs="?", type=Path, help="default: BRIDGE_SIGNING_KEY_FILE")
    keys.set_defaults(run=run)


@command
def run(args: argparse.Namespace) -> None:
    if args.keys_command == "new":
        print(new_signing_key())
        return
    if args.keys_command == "secret":
        print(new_secret())
        return
    path = args.file or load_settings().signing_key_file
    if path is None:
        raise CliError("keys public: give a FILE, or set BRIDGE_SIGNING_KEY_FILE", 2)
    for key in _public_keys_in(path):
        print(key)


def _public_keys_in(path: Path) -> list[str]:
    """The ``whpk_`` keys of the ``whsk_`` keys in ``path``; CliError naming the file."""
    try:
        return public_keys(read_key_file(path))
    except ValueError as exc:  # the message names the file, never a key
        raise CliError(f"keys: {exc}", 2) from None
