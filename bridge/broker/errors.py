"""What a broker call can fail with: broker trouble (retried, never our bug) and the
operator's mistakes (one line, no retry)."""

from __future__ import annotations

import asyncio

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


class QueueUnavailable(BrokerUnavailable):
    """A queue cannot be declared just now, and may be in a moment: on a cluster, two
    processes declaring the same new quorum queue at once, or its node restarting."""


BROKER_ERRORS: tuple[type[BaseException], ...] = (
    AMQPError,
    ChannelInvalidStateError,
    NotConfirmed,
    OSError,  # BrokerUnavailable included
    TimeoutError,
)
"""Broker trouble, never our own bugs: a RuntimeError or a KeyError is not in here."""

BROKER_TROUBLE: tuple[type[BaseException], ...] = (*BROKER_ERRORS, asyncio.CancelledError)
"""BROKER_ERRORS and the CancelledError aiormq (7.2) raises into every call in flight when
its heartbeat finds the connection stuck (a hung node). A loop that catches these calls
``bridge.broker.calls.raise_if_cancelled()`` first: a cancel of its own task still stops it."""


class BrokerRefused(Exception):
    """RabbitMQ refused what BRIDGE_AMQP_URL asks (the login, the vhost): retrying will not
    help; the message says what to check, never the password."""


class LoginRefused(BrokerRefused):
    """RabbitMQ refused the user or password of BRIDGE_AMQP_URL."""
