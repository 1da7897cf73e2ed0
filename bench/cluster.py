"""The bridge on a three-node RabbitMQ 4.3 cluster while nodes fail, and its rate there.

Faults: ``run`` with 3 subscriptions, 20 stream clients and a CI queue made by ``bind``,
against the Patchwork double with the measured serving cost, mail arriving at 5 events/s.
Then, each ``--rounds`` times: ``kill -9`` of the node the producer is on, ``kill -9`` of
the node leading most of the main queues, and SIGSTOP for ``--pause-s`` then SIGCONT of
the producer's node (round 1), the main queues' (round 2), another (round 3). For each
fault: the time from it to the first webhook delivery of an event Patchwork created after
it. At the end: what each reader is missing (must be 0) and how many repeats each got.

Rate: the whole path's deliveries/s (a backlog of ``--events`` to 3 receivers), on the
cluster and on a single 4.3 node (``.ci/rabbitmq start 4.3``), both with quorum queues,
in turn, ``--rate-rounds`` times.

    .ci/rabbitmq cluster start && .ci/rabbitmq start 4.3
    python bench/cluster.py [--rounds 3] [--pause-s 60] [--events 3000] [--only faults|rate]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from common import TZ
from figures import best_line, round_ratios

from bridge.logs import setup_logging
from tests.cluster_tools import ROOT, Cluster, Scenario, SingleNode
from tests.patchwork_cost import MEASURED, CostedPatchwork

LOG = Path(tempfile.gettempdir()) / "bench-cluster-bridge.log"
"""The bridge's log of the fault run, kept after the run."""


def cluster_urls() -> str:
    return subprocess.run(
        [str(ROOT / ".ci/rabbitmq"), "cluster", "urls"], capture_output=True, text=True, check=True
    ).stdout.strip()


async def pause_target(scenario: Scenario, round_: int) -> int:
    """The producer's node, then the main queues', then one of neither, round after round."""
    producer, queues = await scenario.producer_node(), await scenario.main_queues_node()
    others = [n for n in range(1, len(scenario.cluster.urls) + 1) if n not in (producer, queues)]
    return [producer, queues, *others][round_ % 3] if others else [producer, queues][round_ % 2]


async def faults(args: argparse.Namespace, tmp: Path) -> None:
    cluster = Cluster(cluster_urls())
    scenario = Scenario(
        cluster,
        tmp,
        uuid.uuid4().hex[:8],
        patchwork=CostedPatchwork(tz=TZ, cost=MEASURED),
        subscriptions=3,
        stream_clients=20,
    )
    print("faults: run, 3 subscriptions, 20 stream clients, a CI queue; measured cost; 5 events/s")
    try:
        await scenario.start()
        await asyncio.sleep(5)
        for round_ in range(args.rounds):
            for kind in ("kill producer's node", "kill main queues' node", "pause"):
                if kind == "pause":
                    node = await pause_target(scenario, round_)
                    fault = await scenario.fault("pause", node, pause_s=args.pause_s)
                else:
                    if kind == "kill producer's node":
                        node = await scenario.producer_node()
                    else:
                        node = await scenario.main_queues_node()
                    fault = await scenario.fault("kill", node)
                after = "-" if fault.first_after_s is None else f"{fault.first_after_s:.1f} s"
                print(f"  round {round_ + 1}: {kind:<24} node {node}: first delivery after {after}",
                      flush=True)  # fmt: skip
                await asyncio.sleep(5)
        await scenario.settle()
    finally:
        await scenario.stop()
        missing, duplicates = scenario.missing(), scenario.duplicates()
        LOG.write_text(scenario.log())
        await scenario.clean()
    by_kind: dict[str, list[float]] = {}
    for fault in scenario.faults:
        by_kind.setdefault(fault.kind, []).append(fault.first_after_s or float("inf"))
    for kind, times in by_kind.items():
        print(f"  {kind}: first delivery after the fault: median {statistics.median(times):.1f} s,"
              f" worst {max(times):.1f} s over {len(times)}")  # fmt: skip
    print(f"  events: {len(scenario.added)}; missing: {missing}")
    print(f"  repeats: {duplicates}")
    print(f"  bridge log: {LOG}")
    if any(missing.values()):
        sys.exit("FAIL: events missing")


async def rate_on(cluster: Cluster, tmp: Path, events: int) -> tuple[float, float]:
    """Deliveries/s at the receivers draining a backlog: (rate, seconds to first delivery)."""
    scenario = Scenario(
        cluster,
        tmp,
        uuid.uuid4().hex[:8],
        patchwork=CostedPatchwork(tz=TZ, cost=None),
        subscriptions=3,
        stream_clients=0,
    )
    started = time.monotonic()
    for event in scenario.patchwork.add_events(events):
        scenario.added.append(event["id"])
    try:
        await scenario.start(feeding=False)
        await scenario.settle(timeout_s=300)
    finally:
        await scenario.stop()
        await scenario.clean()
    missing = scenario.missing()
    if any(v for k, v in missing.items() if k.startswith("webhook")):
        sys.exit(f"FAIL: events missing on {cluster.urls}: {missing}")
    times = sorted(t for t, _ in scenario.readers.arrivals)
    return (len(times) - 1) / (times[-1] - times[0]), times[0] - started


async def rate(args: argparse.Namespace, tmp: Path) -> None:
    print(f"rate: run, {args.events} events to 3 receivers, quorum queues, no serving cost")
    clustered, single = [], []
    for round_ in range(args.rate_rounds):
        order = [("cluster", Cluster(cluster_urls())), ("single", SingleNode("4.3"))]
        for name, target in order if round_ % 2 == 0 else order[::-1]:
            value, first = await rate_on(target, tmp / f"{name}-{round_}", args.events)
            (clustered if name == "cluster" else single).append(value)
            print(f"  round {round_ + 1}: {name:<8} {value:7.0f} deliveries/s "
                  f"(first delivery {first:.1f} s after start)", flush=True)  # fmt: skip
    print(best_line("three-node 4.3 cluster", clustered))
    print(best_line("single 4.3 node", single))
    print(f"  cluster / single: {round_ratios(clustered, single)}")


def main() -> None:
    setup_logging(level="WARNING")  # the bridge's own quieting of aiormq's reconnect noise
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="fault rounds (3 faults each)")
    parser.add_argument("--pause-s", type=float, default=60.0, help="how long a node hangs")
    parser.add_argument("--events", type=int, default=3000, help="backlog for the rate")
    parser.add_argument("--rate-rounds", type=int, default=2)
    parser.add_argument("--only", choices=("faults", "rate"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as name:
        tmp = Path(name)
        if args.only != "rate":
            (tmp / "faults").mkdir()
            asyncio.run(faults(args, tmp / "faults"))
        if args.only != "faults":
            for round_ in range(args.rate_rounds):
                for side in ("cluster", "single"):
                    (tmp / f"{side}-{round_}").mkdir()
            asyncio.run(rate(args, tmp))


if __name__ == "__main__":
    main()
