"""The subscriptions file: loading, one clear line per mistake, topic matching, sink lookup."""

from __future__ import annotations

import textwrap
from pathlib import Path

import aio_pika
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.settings import SettingsError
from bridge.sinks.base import is_sink
from bridge.sinks.command import CommandSink
from bridge.sinks.registry import load_sink, sink_names
from bridge.sinks.webhook import WebhookSink
from bridge.topics import TopicMatcher, matches
from bridge.webhook.subscriptions import (
    DEFAULT_RETRY_SCHEDULE_S,
    Subscription,
    load_subscriptions,
)

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
TOKEN = "tok-3f9a1c77e2b8"


def write(tmp_path: Path, text: str, name: str = "subscriptions.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_design_example_loads_with_secrets_read_from_files(tmp_path: Path) -> None:
    (tmp_path / "kernelci-token").write_text(TOKEN + "\n")
    path = write(
        tmp_path,
        f"""
        [[webhook]]
        name = "kernelci"
        url = "https://ci.example.org/hooks/patchwork"
        events = ["netdevbpf.*", "*.series-completed"]
        secret = "{SECRET}"
        bearer_token_file = "kernelci-token"
        timeout = 15.0
        concurrency = 16
        retry_schedule = [5, 300, 1800, 7200, 18000, 36000, 36000]
        allow_private_network = false

        [[webhook]]
        name = "local-ci"
        sink = "command"
        command = ["/usr/local/bin/ci-hook", "--queue", "patches"]
        """,
    )
    kernelci, local = load_subscriptions(path)
    assert kernelci.name == "kernelci"
    assert kernelci.events == ["netdevbpf.*", "*.series-completed"]
    assert kernelci.secret is not None and kernelci.secret.get_secret_value() == SECRET
    assert kernelci.bearer_token is not None and kernelci.bearer_token.get_secret_value() == TOKEN
    assert kernelci.bearer_token_file == tmp_path / "kernelci-token"
    assert kernelci.retry_schedule == [5, 300, 1800, 7200, 18000, 36000, 36000]
    assert SECRET not in repr(kernelci) and TOKEN not in repr(kernelci)
    assert local.sink == "command"
    assert local.command == ["/usr/local/bin/ci-hook", "--queue", "patches"]


def test_optional_keys_take_the_documented_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, '[[webhook]]\nname = "min"\nurl = "http://ci.example.org/"\n')
    (sub,) = load_subscriptions(path)
    assert sub.sink == "webhook"
    assert sub.events == ["#"]
    assert (sub.timeout, sub.concurrency) == (15.0, 16)
    assert sub.retry_schedule == DEFAULT_RETRY_SCHEDULE_S
    assert sub.allow_private_network is False
    assert sub.secret is None and sub.bearer_token is None


def test_secret_file_is_read_at_load_without_its_trailing_newline(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\r\n")
    path = write(
        tmp_path,
        f"""
        [[webhook]]
        name = "a"
        url = "https://ci.example.org/"
        secret_file = "{secret_file}"
        """,
    )
    (sub,) = load_subscriptions(path)
    assert sub.secret is not None and sub.secret.get_secret_value() == SECRET


def test_a_file_without_webhooks_loads_as_none(tmp_path: Path) -> None:
    assert load_subscriptions(write(tmp_path, "# nothing yet\n")) == []


@pytest.mark.parametrize(
    ("table", "key", "says"),
    [
        ('url = "https://x.example/"\nevent = ["#"]', "event", "unknown key"),
        ('url = "ftp://x.example/"', "url", "http"),
        ('url = "https:///nohost"', "url", "host"),
        ('url = "https://user:pw@x.example/"', "url", "user:password"),
        ('url = "https://x.example/"\nevents = ["netdev*"]', "events", "'netdev*'"),
        (
            'url = "https://x.example/"\nevents = ["a.b", "a..b"]',
            "events",
            "bad topic pattern 'a..b'",
        ),
        ('url = "https://x.example/"\nevents = []', "events", "at least one"),
        ('url = "https://x.example/"\nsecret_file = "missing"', "secret_file", "cannot read"),
        (
            'url = "https://x.example/"\nbearer_token_file = "/nonexistent/t"',
            "bearer_token_file",
            "cannot read",
        ),
        (
            f'url = "https://x.example/"\nsecret = "{SECRET}"\nsecret_file = "s"',
            "secret_file",
            "not both",
        ),
        ('url = "https://x.example/"\nsecret = "hunter2-hunter2"', "secret", "whsec_"),
        ('url = "https://x.example/"\nsecret = "whsec_!!!hunter2"', "secret", "base64"),
        ('url = "https://x.example/"\nsecret = "whsec_aHVudGVyMg=="', "secret", "24 to 64 bytes"),
        ('url = "https://x.example/"\nsink = "carrier-pigeon"', "sink", "unknown sink"),
        ("timeout = 3", "url", "required"),
        ('sink = "command"', "command", "required"),
        ('url = "https://x.example/"\ntimeout = 0', "timeout", "greater than 0"),
        (
            'url = "https://x.example/"\nconcurrency = 0',
            "concurrency",
            "greater than or equal to 1",
        ),
        ('url = "https://x.example/"\nretry_schedule = [5, -1]', "retry_schedule", "> 0"),
        ('url = "https://x.example/"\nbearer_token = "two words"', "bearer_token", "one word"),
    ],
)
def test_each_mistake_is_one_line_naming_file_subscription_and_key(
    tmp_path: Path, table: str, key: str, says: str
) -> None:
    path = write(tmp_path, f'[[webhook]]\nname = "ci-one"\n{table}\n')
    with pytest.raises(SettingsError) as caught:
        load_subscriptions(path)
    (line,) = str(caught.value).splitlines()
    assert line.startswith(f"{path}: webhook 'ci-one': {key}: ")
    assert says in line
    assert "hunter2" not in line and "pw@" not in line


def test_every_mistake_in_the_file_is_reported_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [[webhook]]
        name = "good"
        url = "https://x.example/"

        [[webhook]]
        name = "good"
        url = "https://y.example/"

        [[webhook]]
        name = "Bad Name"
        url = "gopher://x.example/"
        colour = "blue"
        """,
    )
    with pytest.raises(SettingsError) as caught:
        load_subscriptions(path)
    lines = str(caught.value).splitlines()
    assert lines == [
        f"{path}: webhook 'good': name: duplicate name (also webhook #1)",
        f"{path}: webhook #3: colour: unknown key",
        f"{path}: webhook #3: name: String should match pattern '^[a-z0-9-]+$'",
        f"{path}: webhook #3: url: must be an http:// or https:// URL with a host",
    ]


def test_a_secret_file_holding_a_bad_secret_is_blamed_without_quoting_it(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("correct-horse-battery\n")
    path = write(tmp_path, '[[webhook]]\nname = "a"\nurl = "https://x/"\nsecret_file = "secret"\n')
    with pytest.raises(SettingsError) as caught:
        load_subscriptions(path)
    assert "webhook 'a': secret_file: must start with whsec_" in str(caught.value)
    assert "correct-horse" not in str(caught.value)


def test_broken_toml_names_the_file_and_the_position(tmp_path: Path) -> None:
    path = write(tmp_path, '[[webhook]]\nname = "a"\nsecret = whsec_unquoted\n')
    with pytest.raises(SettingsError, match=rf"^{path}: not valid TOML: .*line 3") as caught:
        load_subscriptions(path)
    assert "unquoted" not in str(caught.value)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="cannot read subscriptions"):
        load_subscriptions(tmp_path / "nope.toml")


def test_unknown_top_level_table_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, '[[webhooks]]\nname = "a"\nurl = "https://x/"\n')
    with pytest.raises(
        SettingsError, match=r"webhooks: unknown key, subscriptions are \[\[webhook\]\]"
    ):
        load_subscriptions(path)


# Topic matching -------------------------------------------------------------------------

PATTERNS = [
    "#",
    "*",
    "*.*",
    "netdevbpf.*",
    "*.series-completed",
    "netdevbpf.#",
    "#.patch-created",
    "#.netdevbpf.#",
    "a.#.b",
    "a.*.b",
    "#.#",
    "*.#",
    "#.*",
    "linux-mm.patch-created",
    "*.*.*",
]
KEYS = [
    "netdevbpf.patch-created",
    "netdevbpf.series-completed",
    "linux-mm.series-completed",
    "linux-mm.patch-created",
    "netdevbpf",
    "a.b",
    "a.x.b",
    "a.x.y.b",
    "x.netdevbpf.y.z",
    "patch-created",
    "one.two.three",
]


async def test_matcher_agrees_with_rabbitmq_on_every_pattern_and_key(
    amqp: aio_pika.abc.AbstractConnection, exchange_name: str
) -> None:
    channel = await amqp.channel()
    exchange = await channel.declare_exchange(exchange_name, aio_pika.ExchangeType.TOPIC)
    queues = []
    for pattern in PATTERNS:
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, pattern)
        queues.append(queue)
    for key in KEYS:
        await exchange.publish(aio_pika.Message(key.encode()), routing_key=key)

    # Publisher confirms: each publish returned once the broker had routed it to every queue.
    for pattern, queue in zip(PATTERNS, queues, strict=True):
        got = set()
        while (message := await queue.get(fail=False, no_ack=True)) is not None:
            got.add(message.body.decode())
        assert got == {key for key in KEYS if matches(pattern, key)}, pattern
    await channel.close()


words = st.sampled_from(["netdevbpf", "linux-mm", "patch-created", "a", "b"])
keys = st.lists(words, min_size=1, max_size=5).map(".".join)


@given(keys)
def test_hash_matches_every_key_and_a_key_matches_itself(key: str) -> None:
    assert matches("#", key)
    assert matches(key, key)
    assert TopicMatcher(["nothing.here", key])(key)


@given(st.lists(words, min_size=1, max_size=5), st.data())
def test_star_stands_for_exactly_one_word(key_words: list[str], data: st.DataObject) -> None:
    i = data.draw(st.integers(min_value=0, max_value=len(key_words) - 1))
    pattern = [*key_words[:i], "*", *key_words[i + 1 :]]
    assert matches(".".join(pattern), ".".join(key_words))
    assert not matches(".".join(pattern), ".".join([*key_words, "extra"]))
    hashed = [*key_words[:i], "#", *key_words[i + 1 :]]
    assert matches(".".join(hashed), ".".join(key_words[:i] + key_words[i + 1 :]))


def test_no_pattern_matches_nothing() -> None:
    assert not TopicMatcher([])("netdevbpf.patch-created")


# Sink registry -------------------------------------------------------------------------


def test_built_in_sinks_are_found_through_entry_points() -> None:
    assert {"webhook", "command"} <= set(sink_names())
    webhook = load_sink(Subscription(name="w", url="https://ci.example.org/"))
    command = load_sink(Subscription(name="c", sink="command", command=["true"]))
    assert isinstance(webhook, WebhookSink) and is_sink(webhook)
    assert isinstance(command, CommandSink) and is_sink(command)


def test_unknown_sink_is_a_settings_error_naming_the_subscription() -> None:
    with pytest.raises(SettingsError, match="webhook 'x': sink: unknown sink 'smoke-signal'"):
        load_sink(Subscription(name="x", sink="smoke-signal"))


def test_sink_that_cannot_use_its_settings_is_a_settings_error() -> None:
    with pytest.raises(SettingsError, match="webhook 'x': sink: webhook: a webhook needs a url"):
        load_sink(Subscription(name="x"))


def test_the_checks_roles_own_name_is_refused_for_a_subscription(tmp_path):
    """Its queues would be the checks role's bridge.checks, not a webhook's."""
    path = write(tmp_path, '[[webhook]]\nname = "checks"\nurl = "https://ci.example/"\n')
    with pytest.raises(SettingsError) as caught:
        load_subscriptions(path)
    assert str(caught.value) == (
        f"{path}: webhook 'checks': name: 'checks' is the checks role's own; choose another"
    )
