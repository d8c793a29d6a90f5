"""A stand-in for `ros2 bag play` (ros2cli and rosbag2_py cannot be installed here), used by the tests.

It does what `ros2 bag play BAG` does for our purpose: one publisher per recorded topic with the QoS recorded
in metadata.yaml (offered_qos_profiles), and every message's raw CDR bytes published unchanged, in log-time
order at the recorded relative times. Before playing it waits until every topic has a subscriber (a bag
played into nobody is lost) and then `--delay` seconds, as `ros2 bag play --delay` does: a best-effort
subscriber (sensor-data QoS) that has not yet matched a writer drops its first samples, which nothing resends,
and the latched /mql/episode start would arrive after them. At the end it waits until every reliable sample is
acknowledged (`ros2 bag play --wait-for-all-acked`).
`--min-gap` spaces consecutive messages at least that far apart: ROS 2 does not order messages across topics,
so two messages published close together may be taken by a busy subscriber's executor in either order.

    python test/bag_player.py BAG [--delay 1.0] [--min-gap 0.003] [--timeout 30]
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

import rclpy
from rclpy.duration import Duration
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rosbags.interfaces import QosDurability, QosReliability
from rosbags.rosbag2 import Reader


def message_class(msgtype: str):
    package, _, name = msgtype.split("/")
    return getattr(importlib.import_module(f"{package}.msg"), name)


def qos_of(connection) -> QoSProfile:
    """The recorded offered QoS (reliable/volatile when none was recorded, like ros2 bag play)."""
    profiles = getattr(connection.ext, "offered_qos_profiles", None) or []
    reliable = not profiles or profiles[0].reliability != QosReliability.BEST_EFFORT
    latched = bool(profiles) and profiles[0].durability == QosDurability.TRANSIENT_LOCAL
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100,
                      reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT,
                      durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE)


def play(bag: str, delay: float, min_gap: float, timeout: float) -> int:
    rclpy.init()
    node = rclpy.create_node("bag_player")
    with Reader(bag) as reader:
        publishers = {c.id: node.create_publisher(message_class(c.msgtype), c.topic.lstrip("/"), qos_of(c))
                      for c in reader.connections}
        deadline = time.monotonic() + timeout
        while any(p.get_subscription_count() == 0 for p in publishers.values()):
            if time.monotonic() > deadline:
                missing = [p.topic_name for p in publishers.values() if p.get_subscription_count() == 0]
                print(f"no subscriber on {missing} after {timeout} s", file=sys.stderr)
                return 1
            rclpy.spin_once(node, timeout_sec=0.05)
        time.sleep(delay)
        start_wall, start_log, last = time.monotonic(), None, 0.0
        sent = 0
        for connection, stamp, raw in reader.messages():
            start_log = stamp if start_log is None else start_log
            due = max(start_wall + (stamp - start_log) * 1e-9, last + min_gap)
            while (now := time.monotonic()) < due:
                time.sleep(min(due - now, 0.01))
            publishers[connection.id].publish(bytes(raw))
            last, sent = time.monotonic(), sent + 1
    print(f"played {sent} messages", flush=True)
    for publisher in publishers.values():
        publisher.wait_for_all_acked(Duration(seconds=timeout))
    node.destroy_node()
    rclpy.shutdown()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bag")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--min-gap", type=float, default=0.0)
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args()
    return play(args.bag, args.delay, args.min_gap, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
