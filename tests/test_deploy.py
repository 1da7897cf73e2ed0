"""deploy/, the Dockerfile and docker-compose.yml agree with the code they package.

promtool, hadolint and `docker compose config` checks live in .ci/check-packaging; these tests catch
drift between the files and the package: a renamed metric or queue, an example that no
longer loads, a health check that does not reach /healthz.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from pathlib import Path

import yaml

from bridge.delivery.queues import checks_queues, subscription_queues
from bridge.http import start_server
from bridge.metrics import Metrics
from bridge.webhook.subscriptions import Subscription, load_subscriptions

ROOT = Path(__file__).resolve().parents[1]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "patchwork-bridge.json"
EXAMPLE = ROOT / "deploy" / "subscriptions.example.toml"
DEMO_SUBSCRIPTIONS = ROOT / "deploy" / "subscriptions.demo.toml"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"


def exported_names() -> set[str]:
    """Every sample name /metrics can show, with the suffixes prometheus_client adds."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    return {
        family.name + suffix
        for family in Metrics().registry.collect()
        for suffix in suffixes[family.type]
    }


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def alert_expressions_text() -> str:
    return ALERTS.read_text()


def test_alerts_and_dashboard_use_only_metrics_the_bridge_exports() -> None:
    exported = exported_names()
    for source, text in (
        ("alerts.yml", alert_expressions_text()),
        ("dashboard", "\n".join(dashboard_expressions())),
    ):
        used = set(re.findall(r"\bpatchwork_bridge_[a-z_]+", text))
        assert used, source
        assert used <= exported, f"{source} uses unknown metrics {sorted(used - exported)}"


def test_dashboard_shows_every_family_an_operator_asked_for() -> None:
    text = "\n".join(dashboard_expressions())
    for name in (
        "patchwork_bridge_events_published_total",
        "patchwork_bridge_webhook_deliveries_total",
        "patchwork_bridge_webhook_failures_total",
        "patchwork_bridge_webhook_delivery_duration_seconds_bucket",
        "patchwork_bridge_queue_messages_ready",
        "patchwork_bridge_cursor_lag_seconds",
        "patchwork_bridge_poll_errors_total",
        "patchwork_bridge_subscription_enabled",
        "patchwork_bridge_webhook_in_flight",
        # the stream role's clients, and what the producer asks of Patchwork
        "patchwork_bridge_stream_clients",
        "patchwork_bridge_stream_events_sent_total",
        "patchwork_bridge_stream_client_lag_events",
        "patchwork_bridge_stream_disconnects_total",
        "patchwork_bridge_stream_requests_refused_total",
        "patchwork_bridge_patchwork_request_duration_seconds_count",
        "patchwork_bridge_patchwork_events_read_total",
        "patchwork_bridge_id_gaps_total",
        # who polls, and who is connected
        "patchwork_bridge_producer_active",
        "patchwork_bridge_broker_connected",
    ):
        assert name in text, name
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (le, subscription)" in text


def queue_patterns() -> list[str]:
    """Every ``queue=~"..."`` regex of the alerts and the dashboard, as Prometheus sees it."""
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    all_subscriptions = variables["subscription"]["allValue"]
    texts = [alert_expressions_text(), *dashboard_expressions()]
    patterns = []
    for text in texts:
        for literal in re.findall(r'queue=~"((?:[^"\\]|\\.)*)"', text):
            pattern = literal.replace("\\\\", "\\").replace("$subscription", all_subscriptions)
            patterns.append(pattern)
    return patterns


def test_queue_patterns_select_the_queues_the_consumer_declares() -> None:
    subscription = Subscription(name="kernelci", url="https://ci.example.org/hook")
    queues = subscription_queues("patchwork", "kernelci")
    watched = queues.watched(subscription.retry_schedule)  # what the depth sampler reports
    main, dead = queues.main, queues.dead
    kinds = {
        "main": [main],
        "retry": [q for q in watched if q not in (main, dead)],
        "dead": [dead],
        "marker": [queues.marker],
    }
    assert kinds["retry"] and main in watched and dead in watched

    selected = []
    for pattern in queue_patterns():
        matched = {
            kind for kind, queues in kinds.items() if any(re.fullmatch(pattern, q) for q in queues)
        }
        # A pattern picks one whole kind (or main with its retries), never part of one.
        assert matched in ({"main"}, {"dead"}, {"main", "retry"}), (pattern, matched)
        for kind in matched:
            assert all(re.fullmatch(pattern, q) for q in kinds[kind]), (pattern, kind)
        selected.append(frozenset(matched))
    assert {frozenset({"main"}), frozenset({"dead"}), frozenset({"main", "retry"})} <= set(selected)


def test_every_dead_letter_pattern_counts_the_checks_roles_too() -> None:
    checks = checks_queues("patchwork")
    webhook_dead = subscription_queues("patchwork", "kernelci").dead
    dead_patterns = [p for p in queue_patterns() if re.fullmatch(p, webhook_dead)]
    assert dead_patterns
    for pattern in dead_patterns:
        assert re.fullmatch(pattern, checks.dead), pattern
        assert not re.fullmatch(pattern, checks.main), pattern


def test_demo_subscriptions_load_and_match_the_demo_receiver() -> None:
    [demo] = load_subscriptions(DEMO_SUBSCRIPTIONS)

    assert demo.url == "http://receiver:8080/hooks/patchwork"
    assert demo.allow_private_network  # the receiver is another container on the network
    assert demo.secret is not None
    receiver_secret = re.search(r"WEBHOOK_SECRET: (\S+)", COMPOSE.read_text())
    assert receiver_secret is not None
    assert receiver_secret.group(1) == demo.secret.get_secret_value()


def compose_services() -> dict[str, dict]:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def bridge_roles(services: dict[str, dict]) -> dict[str, dict]:
    """The services that run a role of the bridge (not its demo doubles)."""
    return {
        name: s
        for name, s in services.items()
        if s.get("image") == "patchwork-bridge:local" and "entrypoint" not in s
    }


def test_compose_on_a_real_site_mounts_no_demo_subscription() -> None:
    """Without BRIDGE_SUBSCRIPTIONS_FILE the stack gets the example, which delivers nowhere:
    a real site's events must not pile up in a demo receiver's dead queue. The demo needs
    no variable: its webhook role mounts the demo's subscriptions itself."""
    compose = COMPOSE.read_text()
    mounts = set(re.findall(r"\$\{BRIDGE_SUBSCRIPTIONS_FILE:-([^}]+)\}", compose))
    assert mounts == {"./deploy/subscriptions.example.toml"}
    assert load_subscriptions(EXAMPLE) == []
    services = compose_services()
    assert services["webhook"]["profiles"] == ["webhooks"]
    assert services["demo-webhook"]["profiles"] == ["demo"]
    [mount] = services["demo-webhook"]["volumes"]
    assert mount.startswith("./deploy/subscriptions.demo.toml:")


def test_prometheus_scrapes_each_role_only_where_it_runs() -> None:
    """A role whose profile is off must be no target at all, not a target that is down:
    each role is found by its service name, which resolves only while it runs."""
    config = yaml.safe_load(PROMETHEUS.read_text())
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "patchwork-bridge"]
    assert "static_configs" not in job
    names = {name for sd in job["dns_sd_configs"] for name in sd["names"]}
    assert names == set(bridge_roles(compose_services()))
    assert {"source_labels": ["__meta_dns_name"], "target_label": "role"} in job["relabel_configs"]


def test_commented_subscription_example_is_valid_once_uncommented(tmp_path: Path) -> None:
    text = EXAMPLE.read_text()
    commented = text[text.index("# [[webhook]]") :]
    table = "\n".join(line.removeprefix("# ") for line in commented.splitlines())
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "kernelci-webhook").write_text("whsec_" + "QUJD" * 8 + "\n")
    (secrets / "kernelci-token").write_text("a-bearer-token\n")
    path = tmp_path / "subscriptions.toml"
    path.write_text(table.replace("/run/secrets", str(secrets)))

    [kernelci] = load_subscriptions(path)

    assert kernelci.events == ["netdevbpf.*", "*.series-completed"]
    defaults = Subscription(name="x", url="https://ci.example.org/hook")
    # The comment says these values are the defaults.
    assert (kernelci.timeout, kernelci.concurrency, kernelci.retry_schedule) == (
        defaults.timeout,
        defaults.concurrency,
        defaults.retry_schedule,
    )


def dockerfile_healthcheck() -> list[str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    match = re.search(r"^HEALTHCHECK .*?CMD (\[.*\])$", text, re.M)
    assert match is not None
    return json.loads(match.group(1))


async def run_healthcheck(port: int) -> int:
    argv = dockerfile_healthcheck()
    assert argv[0] == "python"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *argv[1:],
        env={**os.environ, "BRIDGE_HTTP_PORT": str(port)},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await asyncio.wait_for(process.wait(), 30)


async def test_image_healthcheck_passes_while_healthz_answers_and_fails_after() -> None:
    runner, port = await start_server(Metrics(), [], "127.0.0.1", 0)
    try:
        assert await run_healthcheck(port) == 0
    finally:
        await runner.cleanup()

    assert await run_healthcheck(port) != 0


def test_compose_roles_run_the_image_commands_the_cli_knows() -> None:
    from bridge.__main__ import build_parser

    roles = bridge_roles(compose_services())
    assert {"producer", "webhook", "stream", "checks", "demo-webhook"} <= set(roles)
    for name, service in roles.items():
        [command] = service["command"]
        assert command == name.removeprefix("demo-"), name
        assert build_parser().parse_args([command]).command == command
