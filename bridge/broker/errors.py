"""What a broker call can fail with: broker trouble (retried, never our bug) and the
operator's mistakes (one line, no retry)."""

from __future__ import annotations

from aiormq.exceptions import AMQPError, ChannelInvalidStateError


class TopologyError(Exception):
    """What the bridge must declare cannot be, or a queue of its name is another
    deployment's: an operator's to mend (one line, no retry)."""


class NotConfirmed(Exception):
    """The broker returned a publish (no such queue) instead of confirming it."""


# Errors of a broker call: the broker refused it, the channel or connection went away, or
# it took longer than BROKER_TIMEOUT_S.
class BrokerUnavailable(ConnectionError):
    """A channel could not be opened: the connection is closed or reconnecting."""


BROKER_ERRORS: tuple[type[BaseException], ...] = (
    AMQPError,
    ChannelInvalidStateError,
    NotConfirmed,
    OSError,  # BrokerUnavailable included
    TimeoutError,
)
"""Broker trouble, never our own bugs: a RuntimeError or a KeyError is not in here."""


class LoginRefused(Exception):
    """RabbitMQ refused the user or password of BRIDGE_AMQP_URL: retrying will not help."""
