"""The webhook side: per-subscription queues, delivery through sinks, retries and dead letters."""
