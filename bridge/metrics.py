"""Every Prometheus metric of the bridge, on a registry the caller owns.

Labels are bounded sets only (project, category, subscription, outcome, reason,
queue): never a URL, an event id or an error text. Tests build their own
``Metrics()`` so counters never leak between them.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "patchwork_bridge"

# Poll errors: the reason a poll of Patchwork failed.
POLL_ERROR_REASONS = ("timeout", "connect", "http_4xx", "http_5xx", "bad_json", "bad_page")
# Publish failures: what the broker did with a publish that was not confirmed.
PUBLISH_FAILURE_REASONS = ("nack", "returned", "timeout", "connection")
# Delivery outcomes, one per ack/retry/dead decision of the consumer; "unmatched": acked
# undelivered, its routing key matches none of the subscription's patterns any more.
GAP_OUTCOMES = ("opened", "filled", "expired")
EVENT_READS = ("new", "gap", "sweep", "count")
DELIVERY_OUTCOMES = ("delivered", "retried", "dead_lettered", "refused", "disabled", "unmatched")
# Delivery failure reasons: a webhook's, and those only the checks role has.
WEBHOOK_FAILURE_REASONS = (
    "timeout",
    "connect",
    "http_3xx",
    "http_4xx",
    "http_5xx",
    "http_429",
    "http_410",
    "ssrf",
    "invalid",
    "sink_error",
)
CHECKS_FAILURE_REASONS = ("wrong_project", "forbidden", "not_found", "empty_series")
DELIVERY_FAILURE_REASONS = WEBHOOK_FAILURE_REASONS + CHECKS_FAILURE_REASONS
STREAM_DISCONNECT_REASONS = ("client", "slow", "stalled", "shutdown", "broker", "error")
STREAM_REFUSED_STATUSES = ("400", "401", "403", "503")
WAKEUP_FAILURE_REASONS = ("connection", "no_trigger")


class Metrics:
    """All metric families of one process (producer, consumer or both)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        p = PREFIX

        # Producer
        self.events_published = Counter(
            f"{p}_events_published",
            "Events confirmed by the broker, by project and category.",
            ["project", "category"],
            registry=r,
        )
        self.polls = Counter(
            f"{p}_polls", "Polls that fetched and published without error.", registry=r
        )
        self.poll_errors = Counter(
            f"{p}_poll_errors", "Failed polls of Patchwork, by reason.", ["reason"], registry=r
        )
        self.bad_events = Counter(
            f"{p}_bad_events",
            "Items in a Patchwork page that are not usable events (missing id, date or project).",
            ["reason"],
            registry=r,
        )
        self.schema_violations = Counter(
            f"{p}_schema_violations",
            "Events published despite breaking their category's JSON Schema.",
            ["category"],
            registry=r,
        )
        self.publish_failures = Counter(
            f"{p}_publish_failures",
            "Publishes the broker did not confirm, by reason.",
            ["reason"],
            registry=r,
        )
        self.poll_duration = Histogram(
            f"{p}_poll_duration_seconds",
            "Time to fetch, publish and confirm one poll's events.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=r,
        )
        self.cursor_lag = Gauge(
            f"{p}_cursor_lag_seconds",
            "Now minus the time of the newest event the cursor has passed.",
            registry=r,
        )
        self.producer_active = Gauge(
            f"{p}_producer_active",
            "1 on the producer that holds the poller lock and polls, 0 on a standby.",
            registry=r,
        )
        self.cursor_write_errors = Counter(
            f"{p}_cursor_write_errors",
            "Cursor saves that failed (the producer goes on and writes again next poll).",
            registry=r,
        )
        self.last_poll_success = Gauge(
            f"{p}_last_successful_poll_timestamp_seconds",
            "Unix time of the last poll that fetched and published without error.",
            registry=r,
        )

        self.event_visibility_delay = Histogram(
            f"{p}_event_visibility_delay_seconds",
            "First seen minus the event's date (in Patchwork's zone), per event published.",
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900),
            registry=r,
        )
        self.id_gaps = Counter(
            f"{p}_id_gaps",
            "Ids missing between ids seen (late events): opened, filled, or expired unfilled.",
            ["outcome"],
            registry=r,
        )
        self.open_gaps = Gauge(
            f"{p}_id_gaps_open", "Ids the producer is waiting for now.", registry=r
        )
        self.poll_events_read = Histogram(
            f"{p}_poll_events_read",
            "Events Patchwork served for one poll, all its reads together.",
            buckets=(0, 1, 5, 10, 30, 100, 250, 500, 1000, 2500, 10000),
            registry=r,
        )
        self.patchwork_events_read = Counter(
            f"{p}_patchwork_events_read",
            "Events Patchwork served, by read: new, gap, sweep (a whole-window read), count.",
            ["read"],
            registry=r,
        )
        self.patchwork_request_duration = Histogram(
            f"{p}_patchwork_request_duration_seconds",
            "One request to Patchwork's events API, answer read.",
            buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )

        # Consumer
        self.deliveries = Counter(
            f"{p}_webhook_deliveries",
            "Delivery attempts by subscription and outcome.",
            ["subscription", "outcome"],
            registry=r,
        )
        self.delivery_failures = Counter(
            f"{p}_webhook_failures",
            "Failed delivery attempts by subscription and reason.",
            ["subscription", "reason"],
            registry=r,
        )
        self.delivery_duration = Histogram(
            f"{p}_webhook_delivery_duration_seconds",
            "Duration of one delivery attempt, by subscription.",
            ["subscription"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.in_flight = Gauge(
            f"{p}_webhook_in_flight",
            "Deliveries in progress, by subscription.",
            ["subscription"],
            registry=r,
        )
        self.subscription_enabled = Gauge(
            f"{p}_subscription_enabled",
            "1 while a subscription delivers, 0 once disabled (410 Gone or by an operator).",
            ["subscription"],
            registry=r,
        )

        self.breaker_open = Gauge(
            f"{p}_webhook_breaker_open",
            "1 while a subscription's circuit breaker is open: its receiver kept failing, its "
            "events wait in its queue and only probes are sent.",
            ["subscription"],
            registry=r,
        )
        self.breaker_probes = Counter(
            f"{p}_webhook_breaker_probes",
            "Probes of an open circuit breaker, by result (ok, failed, empty: nothing to probe).",
            ["subscription", "result"],
            registry=r,
        )

        self.history_records = Counter(
            f"{p}_attempt_history_records",
            "Delivery attempts written to the attempt history (<exchange>.deliveries).",
            registry=r,
        )
        self.history_bytes = Counter(
            f"{p}_attempt_history_bytes",
            "Bytes written to the attempt history; its size on the broker is what was written "
            "within BRIDGE_LOG_MAX_AGE.",
            registry=r,
        )
        self.history_dropped = Counter(
            f"{p}_attempt_history_dropped",
            "Attempt records not written: the broker refused them, or the buffer was full.",
            registry=r,
        )

        self.wakeup_listening = Gauge(
            f"{p}_wakeup_listening",
            "1 while the producer listens to Patchwork's PostgreSQL with the trigger in place.",
            registry=r,
        )
        self.wakeup_notifications = Counter(
            f"{p}_wakeup_notifications",
            "Notifications of committed events from Patchwork's PostgreSQL.",
            registry=r,
        )
        self.wakeup_failures = Counter(
            f"{p}_wakeup_failures",
            "Times listening stopped working, by reason (connection, no_trigger).",
            ["reason"],
            registry=r,
        )

        # Queues
        self.queue_messages = Gauge(
            f"{p}_queue_messages_ready",
            "Ready messages in each of the bridge's queues.",
            ["queue"],
            registry=r,
        )
        self.queue_consumers = Gauge(
            f"{p}_queue_consumers",
            "Consumers attached to each of the bridge's queues.",
            ["queue"],
            registry=r,
        )
        # Stream
        self.stream_clients = Gauge(
            f"{p}_stream_clients",
            "Clients connected to the event stream, by consumer.",
            ["consumer"],
            registry=r,
        )
        self.stream_events_sent = Counter(
            f"{p}_stream_events_sent",
            "Events sent to stream clients, by consumer.",
            ["consumer"],
            registry=r,
        )
        self.stream_disconnects = Counter(
            f"{p}_stream_disconnects",
            "Stream clients gone, by reason: client (it left), slow (fell a buffer behind "
            "the log's tail), stalled (a write did not finish), shutdown, broker, error.",
            ["reason"],
            registry=r,
        )
        self.stream_refused = Counter(
            f"{p}_stream_requests_refused",
            "Stream and checks requests refused, by HTTP status (400, 401, 403; 503: try again).",
            ["status"],
            registry=r,
        )
        self.stream_lag = Gauge(
            f"{p}_stream_client_lag_events",
            "Events between the log's tail and the furthest-behind client, by consumer.",
            ["consumer"],
            registry=r,
        )
        self.broker_node = Gauge(
            f"{p}_broker_node",
            "1 for the RabbitMQ node (host:port) the role's connection is on now, by role.",
            ["role", "node"],
            registry=r,
        )
        self.broker_connected = Gauge(
            f"{p}_broker_connected",
            "1 while the role's connection to RabbitMQ is up.",
            ["role"],
            registry=r,
        )

    # Every child a role can increment, at 0 from its start: a panel or an alert then reads
    # 0, not "No data". Only closed label sets; a project appears with its first event.

    def producer_started(self, *, wakeup: bool) -> None:
        for reason in POLL_ERROR_REASONS:
            self.poll_errors.labels(reason)
        for reason in PUBLISH_FAILURE_REASONS:
            self.publish_failures.labels(reason)
        for outcome in GAP_OUTCOMES:
            self.id_gaps.labels(outcome)
        for read in EVENT_READS:
            self.patchwork_events_read.labels(read)
        if wakeup:
            for reason in WAKEUP_FAILURE_REASONS:
                self.wakeup_failures.labels(reason)

    def lane_started(self, name: str, failure_reasons: tuple[str, ...]) -> None:
        for outcome in DELIVERY_OUTCOMES:
            self.deliveries.labels(name, outcome)
        for reason in failure_reasons:
            self.delivery_failures.labels(name, reason)

    def stream_started(self, consumers: list[str]) -> None:
        for name in consumers:
            self.stream_clients.labels(name).set(0)
            self.stream_events_sent.labels(name)
        for reason in STREAM_DISCONNECT_REASONS:
            self.stream_disconnects.labels(reason)
        for status in STREAM_REFUSED_STATUSES:
            self.stream_refused.labels(status)

    def render(self) -> bytes:
        return generate_latest(self.registry)
