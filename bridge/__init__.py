"""patchwork-bridge: poll Patchwork's events once, fan them out over RabbitMQ and webhooks."""

__version__ = "0.2.0"
