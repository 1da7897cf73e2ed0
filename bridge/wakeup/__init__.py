"""The wake-up: Patchwork's PostgreSQL says when an event is committed, and the poller polls."""
