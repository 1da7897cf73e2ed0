"""The stream role: the event log as Server-Sent Events, for CI systems without a public URL."""
