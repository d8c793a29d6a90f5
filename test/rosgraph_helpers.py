"""Helpers for the node integration tests: start node processes, and a probe node inside the test process.

Every graph runs on its own ROS_DOMAIN_ID and only on loopback, so tests never see each other's traffic.
Waiting is always on a condition with a timeout; a timeout failure shows the nodes' logs.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
INSTALLED_LIB = Path(sys.prefix) / "lib" / "mql_ros"


# ROS 2's safe domain ids are 0-101 (About-Domain-ID; domain_coordinator takes 1-100): higher ids put the DDS
# ports in Linux's ephemeral range, where another socket can hold them. 0 is left to what runs outside tests.
TEST_DOMAINS = range(1, 91)
BENCHMARK_DOMAINS = range(91, 102)
DOMAIN_LOCKS = Path(tempfile.gettempdir()) / "mql_ros_test_domains"


def claim_domain(domains: range, start: int):
    """(domain, open lock file): the first id of `domains` from `start` on (cyclically) that no concurrent test
    or benchmark holds; it stays this process's while the file is open."""
    DOMAIN_LOCKS.mkdir(exist_ok=True)
    for i in range(len(domains)):
        domain = domains[(start + i) % len(domains)]
        lock = open(DOMAIN_LOCKS / f"{domain}.lock", "w")  # noqa: SIM115 - the caller holds it
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        return domain, lock
    raise RuntimeError(f"all ROS domains {domains.start}..{domains.stop - 1} are locked under {DOMAIN_LOCKS}")


def ros_env(domain_id: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"ROS_DOMAIN_ID": str(domain_id), "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST",
                "AMENT_PREFIX_PATH": env.get("AMENT_PREFIX_PATH", sys.prefix), "PYTHONUNBUFFERED": "1",
                "OMP_NUM_THREADS": "1", "RCUTILS_LOGGING_BUFFERED_STREAM": "0"})
    return env


def node_command(node: str) -> list[str]:
    """The installed executable (`ros2 run` layout) when this process runs the installed package too, else
    the source tree's module: the nodes always run the same code as the test."""
    import mql_ros

    exe = INSTALLED_LIB / node
    installed = Path(mql_ros.__file__).resolve().is_relative_to(Path(sys.prefix).resolve())
    if installed and exe.is_file() and os.access(exe, os.X_OK):
        return [sys.executable, str(exe)]
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
            f"from mql_ros.nodes.entry import run; sys.exit(run({node!r}))"]


class NodeProcess:
    """One node in its own process group, with its output in a log file."""

    def __init__(self, node: str, params: dict, domain_id: int, workdir: Path, name: str | None = None,
                 params_files: tuple[Path, ...] = ()):
        self.node = node
        self.name = name or node
        self.log_path = workdir / f"{self.name}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        cmd = node_command(node) + ["--ros-args"]
        for f in params_files:
            cmd += ["--params-file", str(f)]
        if params:
            params_file = workdir / f"{self.name}.params.yaml"
            params_file.write_text(yaml.safe_dump({"/**": {"ros__parameters": params}}))
            cmd += ["--params-file", str(params_file)]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=ros_env(domain_id),
                                     cwd=workdir, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def interrupt(self, sig: int = signal.SIGINT) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, sig: int = signal.SIGINT, timeout: float = 10.0) -> int:
        """Signal the process group and wait; kill it if it does not exit in time. Returns the exit code."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
            except ProcessLookupError:
                pass
        self._log.close()
        return self.proc.returncode


class Probe:
    """An rclpy node in the test process, on the graph's domain, spinning in a background thread."""

    def __init__(self, domain_id: int, logs: Callable[[], str] = lambda: ""):
        import rclpy
        from rclpy.executors import SingleThreadedExecutor

        self._rclpy = rclpy
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node("test_probe", context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.lock = threading.Lock()
        self.messages: dict[str, list[tuple[float, object]]] = {}
        self._sources: dict[str, list[int]] = {}
        self._logs = logs
        self._clients: dict[str, object] = {}
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        while self.context.ok():
            try:
                self.executor.spin_once(timeout_sec=0.05)
            except Exception:  # shutdown while spinning
                if self.context.ok():
                    raise

    def subscribe(self, msg_type, topic: str, qos) -> list[tuple[float, object]]:
        """Record (monotonic receive time, message) of a topic; returns the live list. The DDS source
        timestamp of each (when the publisher wrote it, system clock ns) goes to `published_ns(topic)`."""
        store = self.messages.setdefault(topic, [])
        sources = self._sources.setdefault(topic, [])

        def on_msg(msg, info) -> None:
            with self.lock:
                store.append((time.monotonic(), msg))
                sources.append(info["source_timestamp"])

        self.node.create_subscription(msg_type, topic, on_msg, qos)
        return store

    def received(self, topic: str) -> list:
        with self.lock:
            return [m for _, m in self.messages.get(topic, [])]

    def stamped(self, topic: str) -> list[tuple[float, object]]:
        with self.lock:
            return list(self.messages.get(topic, []))

    def published_ns(self, topic: str) -> list[int]:
        """Source timestamps (system clock ns, set by the publishing process) of a topic's messages."""
        with self.lock:
            return list(self._sources.get(topic, []))

    def wait_for(self, predicate: Callable[[], object], timeout: float, what: str | Callable[[], str]) -> object:
        """Poll a condition until it is truthy; on timeout fail with `what` (or what it returns then) and the
        nodes' logs."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.02)
        what = what() if callable(what) else what
        raise AssertionError(f"timed out after {timeout} s waiting for {what}\n"
                             f"--- node logs ---\n{self._logs()}")

    def call(self, srv_type, name: str, request, timeout: float = 20.0):
        if name not in self._clients:  # reused: a second call goes out at once, without rediscovery
            self._clients[name] = self.node.create_client(srv_type, name)
        client = self._clients[name]
        self.wait_for(lambda: client.wait_for_service(timeout_sec=0.1), timeout, f"service {name}")
        future = client.call_async(request)
        self.wait_for(future.done, timeout, f"the response of {name}")
        return future.result()

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()
        self._rclpy.try_shutdown(context=self.context)
        self._thread.join(2.0)


def diagnostic_values(probe: Probe, node_name: str) -> list[dict[str, str]]:
    """Key/value dicts of every /diagnostics status of one node received so far, oldest first."""
    out = []
    for array in probe.received("/diagnostics"):
        for status in array.status:
            if status.name.rstrip("/").endswith(node_name):
                d = {kv.key: kv.value for kv in status.values}
                d["_message"] = status.message
                d["_level"] = int.from_bytes(status.level, "little") if isinstance(status.level, bytes) \
                    else int(status.level)
                out.append(d)
    return out


def wait_collecting(probe: Probe, node_name: str, steps: int = 20, timeout: float = 60.0) -> None:
    """Wait until a node that builds steps (adaptation, context_encoder) reports on /diagnostics (statuses
    received from now on) that it has built `steps` steps of the episode in progress: its subscriptions are
    matched and it hears what the graph publishes. Commands seen by the probe do not show that (discovery is
    per subscriber)."""
    since = len(diagnostic_values(probe, node_name))
    probe.wait_for(lambda: any(int(d.get("episode_steps", 0)) >= steps
                               for d in diagnostic_values(probe, node_name)[since:]),
                   timeout, f"{node_name} collecting {steps} steps of the episode in progress")


def wait_control_loop_connected(probe: Probe, timeout: float = 90.0) -> None:
    """Wait until sim_arm -> context_encoder -> policy is connected end to end, as far as a test can see it:
    the encoder builds steps (it hears the sim's state, the policy's commands and the reward) and the probe
    receives joint states and arm commands (it must subscribe to both). DDS discovery is per pair of
    processes and can lag by seconds on a loaded machine, so one of these does not imply the others; a
    policy acting on the encoder's episode-start zero context shows none of them."""
    wait_collecting(probe, "context_encoder", steps=5, timeout=timeout)
    probe.wait_for(lambda: probe.received("joint_states") and probe.received("arm_controller/commands"), timeout,
                   "the probe receiving joint states and arm commands")


def assert_holds_once_the_last_state_is_stale(probe: Probe, stopped_ns: int, state_timeout: float = 0.2) -> None:
    """After the sim stopped publishing at `stopped_ns` (system clock): every arm command the policy published
    (DDS source time) more than state_timeout + 0.1 s (a tick's clock read to its publish) after the last
    state's header stamp is one hold, at one of the last positions the sim measured. The probe must subscribe
    to joint_states reliably (as the sim writes them), so that it has every state whichever the policy drops;
    times are the publishers' own, so the probe's delivery delays do not count."""
    topic = "arm_controller/commands"
    probe.wait_for(lambda: any(t > stopped_ns + 3 * 10**8 for t in probe.published_ns(topic)), 5.0,
                   "the policy still commanding 0.3 s after the state stopped (by then the last states are in)")
    states = probe.received("joint_states")
    last = states[-1].header.stamp
    stale_ns = last.sec * 10**9 + last.nanosec + int((state_timeout + 0.1) * 1e9)
    probe.wait_for(lambda: any(t > stale_ns for t in probe.published_ns(topic)), 5.0,
                   "a command published after the last state went stale")
    n = next(i for i, t in enumerate(probe.published_ns(topic)) if t > stale_ns)
    probe.wait_for(lambda: len(probe.received(topic)) > n + 25, 5.0, "half a second of holding")
    held = probe.received(topic)[n:]
    hold = held[0].data
    recent = [list(m.position) for m in states[-5:]]
    assert list(hold) in recent, f"the hold {list(hold)} is none of the last measured positions {recent}"
    assert all(m.data == hold for m in held), (
        f"once the state is stale every command is the hold {list(hold)}; also sent "
        f"{[list(m.data) for m in held if m.data != hold][:3]}")
