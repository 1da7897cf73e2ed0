"""RabbitMQ: errors, calls that survive the client libraries' edge cases, connections, topology."""
