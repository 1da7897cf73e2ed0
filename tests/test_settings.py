"""Start-up settings: one clear line per mistake, secrets never shown, JSON logs on request."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest

from bridge.__main__ import main
from bridge.logs import JsonFormatter, ReconnectNoise
from bridge.settings import SettingsError, load_settings, redact_url

TOKEN = "tok-0123456789abcdef-sekrit"


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def run_bridge(*args: str, **env: str) -> Ran:
    """`patchwork-bridge ARGS` in this process, with only ``env`` of the BRIDGE_* settings:
    what it says and how it ends are the command's (tests/test_operator.py runs processes
    where the process itself is what is tested: signals, a port in use)."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update({k: v for k, v in saved.items() if not k.startswith("BRIDGE_")} | env)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exc:  # --help
                code = int(exc.code or 0)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return Ran(code, out.getvalue(), err.getvalue())


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"BRIDGE_POLL_INTERVAL": "soon"}, "BRIDGE_POLL_INTERVAL"),
        ({"BRIDGE_PATCHWORK_URL": "ftp://patchwork.example.org"}, "BRIDGE_PATCHWORK_URL"),
        ({"BRIDGE_PATCHWORK_TIMEZONE": "Mars/Olympus"}, "BRIDGE_PATCHWORK_TIMEZONE"),
        ({"BRIDGE_START": "yesterday"}, "BRIDGE_START"),
        ({"BRIDGE_QUEUE_TYPE": "stream"}, "BRIDGE_QUEUE_TYPE"),
        ({"BRIDGE_POLL_INTERVALL": "5"}, "BRIDGE_POLL_INTERVALL"),
        ({"BRIDGE_AMQP_URL": f"http://guest:{TOKEN}@localhost/"}, "BRIDGE_AMQP_URL"),
        ({}, "BRIDGE_PATCHWORK_URL"),  # the producer cannot start without it
    ],
)
def test_a_bad_setting_stops_start_up_with_one_line_naming_it(env, named):
    result = run_bridge("producer", BRIDGE_PATCHWORK_TOKEN=TOKEN, **env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"patchwork-bridge: {named}:")
    assert TOKEN not in result.stderr + result.stdout


def test_secrets_never_appear_in_repr_or_redacted_urls(monkeypatch):
    monkeypatch.setenv("BRIDGE_PATCHWORK_TOKEN", TOKEN)
    monkeypatch.setenv("BRIDGE_AMQP_URL", f"amqp://bridge:{TOKEN}@rabbit:5672/vhost")
    settings = load_settings()
    assert TOKEN not in repr(settings) and TOKEN not in str(settings)
    assert settings.amqp_url_redacted == "amqp://bridge:***@rabbit:5672/vhost"
    assert redact_url("amqp://rabbit/") == "amqp://rabbit/"


def test_misspelled_setting_is_rejected_not_ignored(monkeypatch):
    monkeypatch.setenv("BRIDGE_SUBSCRIPTION", "/etc/subs.toml")
    with pytest.raises(SettingsError, match=r"^BRIDGE_SUBSCRIPTION: unknown setting"):
        load_settings()


def test_every_unknown_setting_is_named_at_once_and_the_pointer_leads_somewhere(monkeypatch):
    """Issue 29, finding 9: the names, all of them, and a document that exists."""
    monkeypatch.setenv("BRIDGE_SUBSCRIPTION", "/etc/subs.toml")
    monkeypatch.setenv("BRIDGE_POLL_INTERVALL", "5")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert message.startswith("BRIDGE_POLL_INTERVALL, BRIDGE_SUBSCRIPTION: unknown settings")
    (doc,) = [w for w in message.replace("(", " ").split() if w.endswith(".md")]
    assert (Path(__file__).parents[1] / doc).is_file()


def test_the_compose_files_variable_in_the_shell_breaks_nothing(monkeypatch):
    monkeypatch.setenv("BRIDGE_SUBSCRIPTIONS_FILE", "./subscriptions.toml")
    assert load_settings().subscriptions is None


def test_keys_secret_makes_a_secret_the_reference_library_takes():
    from standardwebhooks import Webhook

    from bridge.signing import decode_secret

    ran = run_bridge("keys", "secret")
    secret = ran.stdout.strip()
    assert ran.returncode == 0 and secret.startswith("whsec_")
    assert len(decode_secret(secret)) == 32
    Webhook(secret)  # raises on a malformed secret


GOOD_URL = "https://patchwork.kernel.org"
LOOPBACK_HOOK = '[[webhook]]\nname = "ci"\nurl = "http://127.0.0.1:8080/hook"\n'


@pytest.mark.parametrize(
    ("role", "env", "subscriptions", "exit_code", "says"),
    [
        ("producer", {"BRIDGE_PATCHWORK_URL": GOOD_URL}, None, 0, "configuration ok for producer"),
        ("producer", {}, None, 2, "BRIDGE_PATCHWORK_URL: required for the producer"),
        (
            "producer",
            {"BRIDGE_PATCHWORK_URL": f"{GOOD_URL}/api/1.3"},
            None,
            2,
            "BRIDGE_PATCHWORK_URL: must be the site root, without /api/",
        ),
        (
            "producer",
            {"BRIDGE_PATCHWORK_URL": GOOD_URL, "STATE": "unwritable"},
            None,
            2,
            "cannot write there (Not a directory)",
        ),
        (
            "producer",
            {"BRIDGE_PATCHWORK_URL": GOOD_URL, "STATE": "corrupt"},
            None,
            2,
            "unreadable cursor",
        ),
        ("webhook", {}, None, 2, "BRIDGE_SUBSCRIPTIONS: required for the webhook role"),
        ("webhook", {}, "", 2, "has no [[webhook]] tables; the webhook role would deliver nothing"),
        (
            "webhook",
            {"BRIDGE_SUBSCRIPTIONS": ""},
            None,
            2,
            "BRIDGE_SUBSCRIPTIONS: is empty",
        ),
        ("webhook", {}, LOOPBACK_HOOK, 2, "set allow_private_network = true to deliver there"),
        (
            "webhook",
            {},
            LOOPBACK_HOOK + "allow_private_network = true\n",
            0,
            "configuration ok for webhook",
        ),
        ("run", {"BRIDGE_PATCHWORK_URL": GOOD_URL}, "", 0, "(no subscriptions: the producer only)"),
        (
            None,
            {},
            LOOPBACK_HOOK + "allow_private_network = true\n",
            0,
            "configuration ok for webhook",
        ),
    ],
)
def test_check_config_says_what_the_role_would_fail_on(
    tmp_path, role, env, subscriptions, exit_code, says
):
    """Each of these passed check-config and then failed, or did nothing, at run time."""
    env = dict(env)
    state = tmp_path / "state"
    match env.pop("STATE", None):
        case "unwritable":
            (tmp_path / "file").write_text("")
            state = tmp_path / "file" / "state"
        case "corrupt":
            state.mkdir()
            (state / "cursor.json").write_text('{"version": 2, "high_wat')
    env["BRIDGE_STATE_DIR"] = str(state)
    if subscriptions is not None:
        (tmp_path / "subscriptions.toml").write_text(subscriptions)
        env["BRIDGE_SUBSCRIPTIONS"] = str(tmp_path / "subscriptions.toml")
    result = run_bridge("check-config", *(["--role", role] if role else []), **env)
    assert result.returncode == exit_code, result.stderr
    output = (result.stdout if exit_code == 0 else result.stderr).strip()
    assert len(output.splitlines()) == 1, output
    assert says in output


def test_json_log_lines_carry_message_level_and_extra_fields():
    record = logging.LogRecord(
        "bridge.producer.poller",
        logging.WARNING,
        __file__,
        1,
        "poll failed (%s)",
        ("timeout",),
        None,
    )
    record.subscription = "kernelci"
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "poll failed (timeout)"
    assert line["level"] == "warning"
    assert line["logger"] == "bridge.producer.poller"
    assert line["subscription"] == "kernelci"
    assert line["time"].endswith("+00:00")


class OneShot:
    """Like aio-pika's OneShotCallback: it holds the callback it runs."""

    def __init__(self, callback: object) -> None:
        self.callback = callback


class RobustChannel:
    """Named like aio-pika's, whose ``_on_close`` fails while the connection is down."""

    def _on_close(self) -> None: ...

    def restore(self) -> None: ...


def _record(name: str, level: int, msg: str, args: tuple = (), exc: BaseException | None = None):
    exc_info = (type(exc), exc, None) if exc is not None else None
    return logging.LogRecord(name, level, __file__, 1, msg, args, exc_info)


def test_reconnect_noise_is_dropped_and_everything_else_kept():
    from aiormq.exceptions import ConnectionClosed

    noise = ReconnectNoise()

    closed = RuntimeError("<Connection: amqp://guest:******@localhost:5672/> closed")
    callback_error = "Callback %r error: %s: %s"
    dropped = [
        _record("aiormq.connection", logging.ERROR, "Unexpected connection close from remote"),
        _record(
            "aiormq.connection",
            logging.WARNING,
            "Cancelling cause reader exited abnormally",
            exc=ConnectionClosed(320, "CONNECTION_FORCED"),
        ),
        _record(
            "aio_pika.tools",
            logging.ERROR,
            callback_error,
            (OneShot(RobustChannel()._on_close), "RuntimeError", closed),
        ),
    ]
    kept = [
        # a reader that died of something else than a closed connection: a real problem
        _record(
            "aiormq.connection",
            logging.WARNING,
            "Cancelling cause reader exited abnormally",
            exc=ValueError("bad frame"),
        ),
        # another callback, or the same one failing for another reason
        _record(
            "aio_pika.tools",
            logging.ERROR,
            callback_error,
            (OneShot(RobustChannel().restore), "RuntimeError", closed),
        ),
        _record(
            "aio_pika.tools",
            logging.ERROR,
            callback_error,
            (OneShot(RobustChannel()._on_close), "KeyError", KeyError("x")),
        ),
        _record("aio_pika.tools", logging.ERROR, callback_error, (object(), "E", ValueError())),
    ]
    assert [noise.filter(r) for r in dropped] == [False] * len(dropped)
    assert [noise.filter(r) for r in kept] == [True] * len(kept)


@pytest.mark.parametrize(
    ("command", "names"),
    [
        (["producer"], ["BRIDGE_PATCHWORK_URL (required)", "BRIDGE_STATE_DIR", "check-config"]),
        (["webhook"], ["BRIDGE_SUBSCRIPTIONS (required)", "BRIDGE_QUEUE_TYPE", "/readyz"]),
        (["run"], ["BRIDGE_SUBSCRIPTIONS", "BRIDGE_HTTP_PORT"]),
        (["check-config"], ["--role", "without connecting to RabbitMQ or Patchwork"]),
        (["dlq", "list"], ["--limit LIMIT  show at most N"]),
    ],
)
def test_help_says_what_a_command_does_and_what_it_reads(command, names):
    result = run_bridge(*command, "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for name in names:
        assert " ".join(name.split()) in text, (name, result.stdout)


def test_the_old_name_of_a_setting_is_read_with_one_line_saying_the_new_one(monkeypatch, caplog):
    monkeypatch.setenv("BRIDGE_POLL_OVERLAP", "30")
    with caplog.at_level(logging.WARNING, logger="bridge.settings"):
        settings = load_settings()
    assert settings.poll_late_wait == 30
    [said] = [r.getMessage() for r in caplog.records if r.name == "bridge.settings"]
    assert (
        said
        == "BRIDGE_POLL_OVERLAP is the old name of BRIDGE_POLL_LATE_WAIT, which it sets; rename it"
    )
    monkeypatch.setenv("BRIDGE_POLL_LATE_WAIT", "60")
    with pytest.raises(
        SettingsError, match="BRIDGE_POLL_OVERLAP: the old name of BRIDGE_POLL_LATE_WAIT"
    ):
        load_settings()


def test_check_config_names_a_receiver_whose_name_resolves_to_a_private_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 29, finding 5: the file loads (a name, not a literal), and every event would
    then be dead-lettered as ssrf; check-config asks the resolver, as delivery will."""
    answers = {"ci.internal.example": "10.1.2.3", "ci.example.org": "93.184.216.34"}
    real = socket.getaddrinfo

    def resolver(host, *args, **kwargs):  # type: ignore[no-untyped-def]
        if host in answers:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answers[host], 0))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    subscriptions = tmp_path / "subscriptions.toml"
    subscriptions.write_text(
        '[[webhook]]\nname = "inside"\nurl = "https://ci.internal.example/hook"\n'
        '[[webhook]]\nname = "outside"\nurl = "https://ci.example.org/hook"\n'
        '[[webhook]]\nname = "allowed"\nurl = "https://ci.internal.example/hook"\n'
        "allow_private_network = true\n"
    )
    ran = run_bridge("check-config", "--role", "webhook", BRIDGE_SUBSCRIPTIONS=str(subscriptions))
    assert ran.returncode == 2
    (line,) = ran.stderr.strip().splitlines()
    assert "webhook 'inside': url: ci.internal.example resolves to 10.1.2.3 (private)" in line
    assert "allow_private_network = true" in line
