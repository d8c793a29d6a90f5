"""Shared fixtures. The ROS ones start real node processes over DDS; the rest of the suite never needs rclpy.

AMENT_PREFIX_PATH defaults to the venv so an installed (pip) package is found like `ros2 run` finds it
(shared/ROS_NOTES.md); setting a default does not affect tests that do not use ROS.
"""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # test helper modules
from rosgraph_helpers import TEST_DOMAINS, claim_domain  # noqa: E402

os.environ.setdefault("AMENT_PREFIX_PATH", sys.prefix)

_next_domain = itertools.count(os.getpid())  # each test of a run starts at the next id: none inherits the last's


@pytest.fixture
def ros_domain():
    """A ROS_DOMAIN_ID for this test alone: an exclusive lock on one id is held for the test's duration, so
    concurrently running pytest processes (other checkouts, benchmarks) never share a domain, and consecutive
    tests of one run use different ids, so nothing a test left behind in DDS (a late-exiting process, shared
    memory of a SIGKILLed one) is discovered by the next."""
    domain, lock = claim_domain(TEST_DOMAINS, next(_next_domain))
    try:
        yield domain
    finally:
        lock.close()


@pytest.fixture
def ros_graph(ros_domain, tmp_path):
    """Start node processes and a probe node on this test's domain; everything is stopped at teardown."""
    pytest.importorskip("rclpy")
    from rosgraph_helpers import NodeProcess, Probe

    class Graph:
        def __init__(self) -> None:
            self.domain = ros_domain
            self.dir = tmp_path
            self.nodes: dict[str, NodeProcess] = {}
            self.probe = Probe(ros_domain, logs=self.logs)

        def start(self, node: str, name: str | None = None, params_files=(), **params) -> NodeProcess:
            proc = NodeProcess(node, params, ros_domain, tmp_path, name, params_files)
            self.nodes[proc.name] = proc
            return proc

        def logs(self) -> str:
            return "\n".join(f"=== {n} (exit {p.proc.poll()}) ===\n{p.log()[-4000:]}"
                             for n, p in self.nodes.items())

    graph = Graph()
    yield graph
    graph.probe.close()
    for proc in graph.nodes.values():  # signal all first, so they shut down in parallel
        proc.interrupt()
    for proc in graph.nodes.values():
        proc.stop()


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    """An untrained, small checkpoint for the package's arm: enough to test the plumbing, fast to load."""
    torch = pytest.importorskip("torch")
    from mql_ros.core.checkpoint import save_checkpoint
    from mql_ros.core.config import load_config
    from mql_ros.core.robot import RobotSpec
    from mql_ros.core.td3 import TD3Context

    torch.set_num_threads(1)
    robot = RobotSpec.from_urdf()
    cfg = load_config(overrides={"hidden_sizes": [32, 32], "context_dim": 8, "history_len": 50,
                                 "batch_size": 32, "adapt": {"archive_iters": 5, "new_task_iters": 5}})
    agent = TD3Context(cfg, robot.obs_dim, robot.act_dim, seed=0)
    path = tmp_path / "tiny.pt"
    save_checkpoint(path, agent, "arm_reach", robot)
    return path


@pytest.fixture
def ros_context():
    """An rclpy context of its own (domain 0, no DDS traffic expected) for building nodes in-process."""
    rclpy = pytest.importorskip("rclpy")
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=0)
    yield context
    rclpy.try_shutdown(context=context)
