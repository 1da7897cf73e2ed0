"""The broker under test: read from the environment here, and nowhere else.

``TEST_AMQP_URL`` (default: the machine's RabbitMQ on 127.0.0.1:5672) and
``TEST_RABBITMQCTL`` (default ``rabbitmqctl``; for a node of ``.ci/rabbitmq``:
``.ci/rabbitmq ctl 4.3``). Not BRIDGE_* names: the bridge refuses unknown ones. conftest.py
exports the URL as ``BRIDGE_AMQP_URL`` too, so every Settings() and every role started
as a process talks to the same broker.

``TEST_CLUSTER_URLS`` (default: none, and the cluster tests skip) names the nodes of a
cluster, comma-separated, as ``.ci/rabbitmq cluster urls`` prints them;
``TEST_CLUSTER_CTL`` the command that kills, pauses, resumes and restarts its nodes.
"""

from __future__ import annotations

import os
import shlex
import subprocess

AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
RABBITMQCTL = shlex.split(os.environ.get("TEST_RABBITMQCTL", "rabbitmqctl"))
CLUSTER_URLS = os.environ.get("TEST_CLUSTER_URLS", "")
CLUSTER_CTL = shlex.split(os.environ.get("TEST_CLUSTER_CTL", ".ci/rabbitmq cluster"))


def rabbitmqctl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run rabbitmqctl against the broker under test; the caller checks the return code."""
    return subprocess.run(
        [*RABBITMQCTL, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
