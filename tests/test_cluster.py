"""The whole bridge on a three-node RabbitMQ 4.3 cluster while nodes fail: the node the
bridge is on killed, then the node it moved to hung (SIGSTOP) and back. Every event
reaches every receiver, the CI queue and every stream client. Runs where
TEST_CLUSTER_URLS names the cluster (.ci/run starts one); bench/cluster.py runs the
longer series and times it."""

from __future__ import annotations

import pytest

from bridge.demo.patchwork_double import FakePatchwork
from tests.cluster_tools import CLUSTER_URLS, Cluster, Scenario

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(not CLUSTER_URLS, reason="no cluster: TEST_CLUSTER_URLS is unset"),
    pytest.mark.timeout(600),
]


async def test_every_event_arrives_everywhere_while_the_bridges_node_dies_then_hangs(
    tmp_path, unique
):
    cluster = Cluster()
    scenario = Scenario(
        cluster,
        tmp_path,
        unique,
        patchwork=FakePatchwork(tz="Australia/Canberra"),
        subscriptions=2,
        stream_clients=3,
    )
    try:
        await scenario.start()
        killed = await scenario.producer_node()
        kill = await scenario.fault("kill", killed)
        hung = await scenario.producer_node()  # where the bridge moved to: the worst case
        pause = await scenario.fault("pause", hung, pause_s=20)
        await scenario.settle()
        missing, duplicates = scenario.missing(), scenario.duplicates()
        log = scenario.log()
        (tmp_path.parent / "cluster-bridge.log").write_text(log)
    finally:
        await scenario.stop()
        await scenario.clean()
    assert scenario.added, "no events were fed"
    assert missing == dict.fromkeys(missing, 0), (missing, log[-4000:])
    assert kill.first_after_s is not None and pause.first_after_s is not None, (
        scenario.faults,
        log[-6000:],
    )
    # At least once: a repeat is an event whose ack the fault cut off, never most of them.
    assert all(n <= len(scenario.added) // 2 for n in duplicates.values()), duplicates
    assert "Traceback" not in log, log[-4000:]
