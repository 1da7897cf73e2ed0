"""Operator commands: dead letters, queues for CI systems, subscriptions, configuration checks."""
