"""rclpy plumbing shared by every node: parameters, QoS, /diagnostics, JointState decoding, main().

Keeping it in one place means every node refuses bad parameters the same way, reports health the same way
and shuts down the same way on SIGINT/SIGTERM.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.clock import Clock, ClockType
from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException
from rclpy.executors import Executor, ExternalShutdownException
from rclpy.experimental import EventsExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import (
    DurabilityPolicy,
    HistoryPolicy,
    QoSProfile,
    ReliabilityPolicy,
    qos_profile_sensor_data,
)

from mql_ros.core.errors import CheckpointError, ConfigError, InputError, MQLError
from mql_ros.core.paths import share_file
from mql_ros.core.robot import RobotSpec

if TYPE_CHECKING:
    from rclpy.parameter import AllowableParameterValue
    from sensor_msgs.msg import JointState

# High-rate state: best effort, keep the latest few (a late sample is worth less than a fresh one).
SENSOR_QOS = qos_profile_sensor_data
# Commands and rewards: every message matters.
RELIABLE_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE,
                          durability=DurabilityPolicy.VOLATILE)
# Episode events and policy updates: a late joiner must still see the latest one.
LATCHED_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)

# Topic and service names, relative so a launch namespace moves the whole graph.
JOINT_STATES = "joint_states"
GRIPPER_STATES = "gripper/joint_states"
ARM_COMMANDS = "arm_controller/commands"
GRIPPER_COMMANDS = "gripper_controller/commands"
REWARD = "mql/reward"
EPISODE = "mql/episode"
CONTEXT = "mql/context"
POLICY_UPDATE = "mql/policy_update"
DIAGNOSTICS = "/diagnostics"

DEFAULT_CHECKPOINT = "checkpoints/arm_reach.pt"


def declare(node: Node, name: str, default: AllowableParameterValue | Parameter.Type, description: str,
            lo: float | None = None, hi: float | None = None, choices: Sequence[str] | None = None,
            read_only: bool = True) -> AllowableParameterValue:
    """Declare a parameter with a description and range; a refused value is a ConfigError naming the range.

    `default` may be a Parameter.Type for parameters without a default (e.g. an optional string list).
    Read-only unless the node applies changes at run time: a `ros2 param set` the node would ignore is refused.
    """
    desc = ParameterDescriptor(description=description, read_only=read_only)
    if lo is not None or hi is not None:
        if isinstance(default, bool) or not isinstance(default, (int, float)):
            raise TypeError(f"parameter {name}: a range needs a numeric default")
        if isinstance(default, int):
            desc.integer_range = [IntegerRange(from_value=int(lo), to_value=int(hi), step=0)]
        else:
            desc.floating_point_range = [FloatingPointRange(from_value=float(lo), to_value=float(hi),
                                                            step=0.0)]
        desc.additional_constraints = f"in [{lo}, {hi}]"
    if choices is not None:
        desc.additional_constraints = f"one of {list(choices)}"
    try:
        value = node.declare_parameter(name, default, desc).value
    except InvalidParameterValueException as exc:
        raise ConfigError(f"{node.get_name()}: parameter {name} is out of range [{lo}, {hi}]: {exc}") from exc
    except InvalidParameterTypeException as exc:
        raise ConfigError(f"{node.get_name()}: parameter {name} has the wrong type: {exc}") from exc
    # An empty list in YAML or on the command line reaches rclpy as "not set": refuse it rather than
    # silently falling back to the default (rclpy has no public accessor for the overrides).
    if value is None and name in node._parameter_overrides:
        raise ConfigError(f"{node.get_name()}: parameter {name} is set but empty; give at least one value "
                          f"or leave it unset")
    if isinstance(value, float) and not np.isfinite(value):
        raise ConfigError(f"{node.get_name()}: parameter {name} must be finite, got {value}")
    if choices is not None and value not in choices:
        raise ConfigError(f"{node.get_name()}: parameter {name}={value!r} is not one of {list(choices)}")
    return value


def unknown_parameters(node: Node) -> list[str]:
    """Parameters given to the node (command line, params file) that it does not declare: most likely a typo,
    which rclpy ignores without a word. Reported as a warning, not refused: a params file's `/**` section may
    hold other nodes' parameters."""
    return sorted(n for n in set(node._parameter_overrides) - set(node._parameters)
                  if not n.startswith("qos_overrides."))


def declare_robot(node: Node) -> RobotSpec:
    """The robot from `robot_description` (URDF XML) or the package URDF; joints may be named explicitly."""
    urdf = declare(node, "robot_description", "",
                   "URDF XML of the arm; empty: the package's urdf/mql_arm.urdf")
    arm = declare(node, "arm_joints", Parameter.Type.STRING_ARRAY,
                  "arm joint names in command order; unset: the URDF's non-finger movable joints")
    grip = declare(node, "gripper_joints", Parameter.Type.STRING_ARRAY,
                   "gripper joint names; unset: the URDF's movable joints named *finger*")
    try:
        return RobotSpec.from_urdf(urdf or None, tuple(arm) if arm else None, tuple(grip) if grip else None)
    except InputError as exc:
        raise ConfigError(f"{node.get_name()}: {exc}") from exc


def checkpoint_path(value: str) -> str:
    """The `checkpoint` parameter, empty meaning the checkpoint shipped with the package."""
    return value if value else str(share_file(DEFAULT_CHECKPOINT))


def stamp_ns(msg: JointState) -> int:
    """A header stamp in integer nanoseconds."""
    return int(msg.header.stamp.sec) * 1_000_000_000 + int(msg.header.stamp.nanosec)


def set_realtime_priority(priority: int) -> str:
    """Run every thread of this process (executor, DDS, timers) under SCHED_FIFO at `priority`, as
    ros2_control's controller_manager does for its loop, so a busy machine delays control ticks less.
    Returns what was done, or why not (no CAP_SYS_NICE or rtprio limit): the node then runs on."""
    if priority <= 0:
        return "normal scheduling"
    tids = [int(t) for t in os.listdir("/proc/self/task")] if os.path.isdir("/proc/self/task") else [0]
    moved = 0
    for tid in tids:
        try:
            os.sched_setscheduler(tid, os.SCHED_FIFO, os.sched_param(priority))
        except ProcessLookupError:
            continue  # the thread ended since it was listed
        except (OSError, AttributeError) as exc:
            return f"SCHED_FIFO {priority} refused ({exc}); normal scheduling"
        moved += 1
    return f"SCHED_FIFO {priority} on {moved} threads"


class CommandPair:
    """Joins the arm and gripper command topics into one control step, whichever arrives first.

    The policy publishes both once per tick, but DDS does not order messages across topics, so a step is
    complete when one of each has arrived; its stamp is the earlier arrival. A repeated arm (or gripper)
    command before its partner replaces the pending one (its partner was lost).
    """

    def __init__(self) -> None:
        self._arm: tuple[int, np.ndarray] | None = None
        self._grip: tuple[int, np.ndarray] | None = None

    def add(self, which: str, stamp: int, values: npt.ArrayLike) -> tuple[int, np.ndarray, np.ndarray] | None:
        """Add an 'arm' or 'gripper' command; return (stamp, arm, gripper) when the step is complete."""
        entry = (stamp, np.asarray(values, dtype=np.float64))
        if which == "arm":
            self._arm = entry
        else:
            self._grip = entry
        if self._arm is None or self._grip is None:
            return None
        (t_arm, arm), (t_grip, grip) = self._arm, self._grip
        self._arm = self._grip = None
        return min(t_arm, t_grip), arm, grip


class Diagnostics:
    """Publishes one DiagnosticStatus for the node on /diagnostics at about 1 Hz of real time.

    The timer counts steady seconds, not the node's clock: under use_sim_time a paused simulator would
    otherwise silence it, and a monitor takes a silent node for a dead one. The stamps are the node's clock.

    The node updates `values` (shown as key/value pairs) and calls `warn`/`ok`; counters of rejected inputs
    live here so every node reports them the same way.
    """

    def __init__(self, node: Node, period: float = 1.0) -> None:
        self._node = node
        self._pub = node.create_publisher(DiagnosticArray, DIAGNOSTICS, 10)
        self.level = DiagnosticStatus.OK
        self.message = "starting"
        self.values: dict[str, object] = {}
        self.rejected: dict[str, int] = {}
        self.last_rejection = ""
        self._last_publish = 0.0
        self._timer = node.create_timer(period, self.publish, clock=Clock(clock_type=ClockType.STEADY_TIME))

    def ok(self, message: str) -> None:
        self.level, self.message = DiagnosticStatus.OK, message

    def warn(self, message: str) -> None:
        self.level, self.message = DiagnosticStatus.WARN, message

    def error(self, message: str) -> None:
        self.level, self.message = DiagnosticStatus.ERROR, message

    def reject(self, what: str, reason: str) -> None:
        """Count and log a rejected input (throttled log; the count and reason go on /diagnostics)."""
        self.rejected[what] = self.rejected.get(what, 0) + 1
        self.last_rejection = f"{what}: {reason}"
        self._node.get_logger().warning(f"rejected {self.last_rejection}", throttle_duration_sec=1.0)
        if time.monotonic() - self._last_publish > 0.1:  # report at once, but a flood stays at 10 Hz
            self.publish()

    def publish(self) -> None:
        status = DiagnosticStatus(level=self.level, name=self._node.get_fully_qualified_name(),
                                  message=self.message, hardware_id="mql_ros")
        items = dict(self.values)
        items.update({f"rejected_{k}": v for k, v in self.rejected.items()})
        if self.last_rejection:
            items["last_rejection"] = self.last_rejection
        status.values = [KeyValue(key=str(k), value=v if isinstance(v, str) else json.dumps(v))
                         for k, v in items.items()]
        self._last_publish = time.monotonic()
        msg = DiagnosticArray(status=[status])
        msg.header.stamp = self._node.get_clock().now().to_msg()
        self._pub.publish(msg)


def autostarted(node_class: Callable[[], Node], name: str) -> Callable[[], Node]:
    """A factory for main_for: builds a lifecycle node and, when its `autostart` parameter is true (plain
    `ros2 run`), configures and activates it; a failed configure is a ConfigError (exit 2)."""
    from rclpy.lifecycle import TransitionCallbackReturn

    def make() -> Node:
        node = node_class()
        if node.autostart:
            if node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
                if not rclpy.ok():  # a signal arrived while configuring: a shutdown, not a bad configuration
                    return node
                raise ConfigError(f"{name} failed to configure: {node.diag.message}")
            node.trigger_activate()
        return node

    return make


def freeze_startup_heap() -> None:
    """Move what start-up made (torch, the checkpoint, rclpy: ~200k objects) out of the cyclic collector's
    sight. Otherwise a full collection scans them all (~100 ms, a stall of the control loop) and, being
    scheduled by the heap's size, is so rare that cyclic garbage of a long run (a recorder's closed bags)
    stays for many minutes: the adaptation node grew ~60 kB/min in the soak. The second collect() resets
    the collector's long-lived count, so full collections become frequent and cheap."""
    gc.collect()
    gc.freeze()
    gc.collect()


def main_for(make_node: Callable[[], Node], args: list[str] | None = None,
             make_executor: Callable[[], Executor] = EventsExecutor) -> int:
    """Run a node until SIGINT/SIGTERM; exit 2 with a one-line reason if its parameters or files are bad.

    The node may define `close()` (flush files, stop workers); it is called once on the way out. The default,
    rclpy's C++ EventsExecutor, spends about a quarter of the CPU per message of the Python
    SingleThreadedExecutor (1 kHz JointState: 5.7% vs 23%). Its limits in rclpy 9.1: it cannot deliver
    MessageInfo to a callback; behind a burst it runs each topic's queued messages together, so the order
    across topics is lost; and its spin() never runs timers, hence this loop of spin_once.
    """
    # SIGINT and SIGTERM: rclpy's handler shuts the context down, which ends the loop below. For SIGINT it then
    # calls Python's handler too, whose default raises KeyboardInterrupt at whatever bytecode runs next, e.g.
    # inside pybind11 converting a message for a callback, where it surfaces as "Unable to convert call
    # argument" and exit status 1 (seen once in CI). Installed before rclpy.init, so rclpy chains to it.
    signal.signal(signal.SIGINT, lambda *_: None)
    rclpy.init(args=args)
    node = None
    try:
        node = make_node()
        unknown = unknown_parameters(node)
        if unknown:
            node.get_logger().warning(f"ignoring parameters {unknown}: {node.get_name()} has no such parameters "
                                      f"(it has {sorted(node._parameters)})")
        executor = make_executor()
        executor.add_node(node)
        freeze_startup_heap()
        while rclpy.ok():
            executor.spin_once(timeout_sec=0.5)
    except ExternalShutdownException:
        pass
    except (ConfigError, InputError, CheckpointError, FileNotFoundError, MQLError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception:
        # SIGINT/SIGTERM shut the context down from the signal handler; a callback already running then
        # fails to publish ("publisher's context is invalid"). That is the shutdown, not an error.
        if rclpy.ok():
            raise
    finally:
        # From here a second SIGINT/SIGTERM (a terminal's Ctrl-C reaches a launch's whole process group, and launch
        # sends its own) would kill the process mid-cleanup with the signal's status: ignored, also after rclpy's
        # shutdown puts back the handlers it found. A cleanup that hangs still ends with launch's SIGKILL.
        _ignore_stop_signals()
        if node is not None:
            if hasattr(node, "close"):
                node.close()
            node.destroy_node()
        rclpy.try_shutdown()
        _ignore_stop_signals()
    return 0


def _ignore_stop_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
