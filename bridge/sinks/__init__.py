"""Sinks: where the consumer hands an event. Built-ins and ``patchwork_bridge.sinks`` plugins."""
