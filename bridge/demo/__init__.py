"""The demo: a Patchwork double, a printing receiver and the recorded events they serve."""
