"""rosbag2 bags (MCAP storage, metadata.yaml) holding the contract topics, written and read with `rosbags`.

Writing: `ArchiveRecorder` takes decoded message values as they arrive (the adaptation node) and starts a
new bag at every episode end, so a writer killed with SIGKILL loses at most the episode in progress;
`EpisodeArchiveWriter` turns Episodes (meta-training, `mql-ros train --archive`) into the message stream
the ROS graph would have produced for them: an arm family's through its RobotSpec, any other family's
through its BoxSpec (observation values as joints obs_i, the normalized action as the arm command).
Reading: every bag's messages in log-time order go through the shared step rule (mql_ros.core.transitions),
so recorded robot data, `ros2 bag record` output and archived meta-training data come back as the same
Episodes.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from struct import error as struct_error

import numpy as np
import numpy.typing as npt
from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime
from rosbags.rosbag2 import Reader, StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

from mql_ros.archive import columnar
from mql_ros.core.episode import Episode
from mql_ros.core.errors import AdaptationCancelled, ArchiveError, IncompleteStep, InputError
from mql_ros.core.paths import unused_path
from mql_ros.core.robot import BagEncoding, RobotSpec
from mql_ros.core.transitions import TransitionBuilder, parse_episode_event

TYPESTORE = get_typestore(Stores.ROS2_KILTED)
JOINT_STATE, FLOAT64_ARRAY = "sensor_msgs/msg/JointState", "std_msgs/msg/Float64MultiArray"
FLOAT64, STRING = "std_msgs/msg/Float64", "std_msgs/msg/String"
TOPICS = {
    "/joint_states": JOINT_STATE,
    "/gripper/joint_states": JOINT_STATE,
    "/arm_controller/commands": FLOAT64_ARRAY,
    "/gripper_controller/commands": FLOAT64_ARRAY,
    "/mql/reward": FLOAT64,
    "/mql/episode": STRING,
}
_M = TYPESTORE.types


def _offered_qos(durability: QosDurability) -> Qos:
    """The QoS the graph's publishers offer, as `ros2 bag record` stores it (history and depth are not seen
    on the wire; the rest is infinite/automatic). `ros2 bag play` republishes with it, so the latched
    /mql/episode reaches subscribers that ask for transient-local durability."""
    forever = QosTime(9223372036, 854775807)
    return Qos(QosHistory.UNKNOWN, 0, QosReliability.RELIABLE, durability, forever, forever, QosLiveliness.AUTOMATIC,
               forever, False)


OFFERED_QOS = {topic: [_offered_qos(QosDurability.TRANSIENT_LOCAL if topic == "/mql/episode"
                                    else QosDurability.VOLATILE)] for topic in TOPICS}


def _stamp(ns: int):
    return _M["builtin_interfaces/msg/Time"](sec=int(ns // 1_000_000_000), nanosec=int(ns % 1_000_000_000))


def _header(ns: int):
    return _M["std_msgs/msg/Header"](stamp=_stamp(ns), frame_id="")


def _float_array(values) -> object:
    layout = _M["std_msgs/msg/MultiArrayLayout"](dim=[], data_offset=0)
    return _M[FLOAT64_ARRAY](layout=layout, data=np.asarray(values, dtype=np.float64))


class BagWriter:
    """One bag: MCAP storage, the contract topics, CDR-serialized standard messages."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.exists():
            raise ArchiveError(f"bag {self.path} already exists")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = Writer(self.path, version=9, storage_plugin=StoragePlugin.MCAP)
            self._writer.open()
        except (OSError, Exception) as exc:  # rosbags wraps OS errors in its own types
            raise ArchiveError(f"cannot create bag {self.path}: {exc}") from exc
        self._connections = {topic: self._writer.add_connection(topic, msgtype, typestore=TYPESTORE,
                                                                offered_qos_profiles=OFFERED_QOS[topic])
                             for topic, msgtype in TOPICS.items()}
        self.messages = 0

    def write(self, topic: str, stamp_ns: int, msg: object) -> None:
        try:
            self._writer.write(self._connections[topic], int(stamp_ns),
                               TYPESTORE.serialize_cdr(msg, TOPICS[topic]))
        except OSError as exc:
            raise ArchiveError(f"cannot write to bag {self.path}: {exc}") from exc
        self.messages += 1

    def joint_state(self, topic: str, stamp_ns: int, names: Sequence[str], positions: npt.ArrayLike,
                    velocities: npt.ArrayLike) -> None:
        self.write(topic, stamp_ns, _M[JOINT_STATE](
            header=_header(stamp_ns), name=list(names), position=np.asarray(positions, dtype=np.float64),
            velocity=np.asarray(velocities, dtype=np.float64), effort=np.zeros(0, dtype=np.float64)))

    def command(self, topic: str, stamp_ns: int, values: npt.ArrayLike) -> None:
        self.write(topic, stamp_ns, _float_array(values))

    def reward(self, stamp_ns: int, value: float) -> None:
        self.write("/mql/reward", stamp_ns, _M[FLOAT64](data=float(value)))

    def episode(self, stamp_ns: int, event_json: str) -> None:
        self.write("/mql/episode", stamp_ns, _M[STRING](data=event_json))

    def close(self) -> None:
        try:
            self._writer.close()
        except OSError as exc:
            raise ArchiveError(f"cannot finish bag {self.path}: {exc}") from exc
        finally:  # rosbags' Writer and its Connections refer to each other: freed now, not at a full collection
            self._writer.connections.clear()


class ArchiveRecorder:
    """Records the contract topics as they arrive; a new bag starts after every `episodes_per_bag`
    episode end events (default 1, so a SIGKILL loses at most the episode in progress).

    Any write error is raised as ArchiveError and the recorder stops (`failed` says why); the caller's
    control loop carries on. Bags already closed are never touched again.
    """

    def __init__(self, directory: str | Path, robot: BagEncoding | None = None, stem: str = "recording",
                 episodes_per_bag: int = 1) -> None:
        if episodes_per_bag < 1:
            raise ArchiveError(f"episodes_per_bag must be >= 1, got {episodes_per_bag}")
        self.directory = Path(directory).expanduser()
        self.stem = stem
        self.episodes_per_bag = episodes_per_bag
        self._ended_in_bag = 0
        self.failed: str | None = None
        self._bag: BagWriter | None = None
        if _is_bag(self.directory):  # a bag nested in a bag is found by no reader (bag_dirs looks one level down)
            raise ArchiveError(f"archive directory {self.directory} is itself a bag (it holds metadata.yaml or an "
                               ".mcap file): record into its parent or into a new directory")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ArchiveError(f"cannot create archive directory {self.directory}: {exc}") from exc

    def _current(self) -> BagWriter:
        if self.failed:
            raise ArchiveError(f"recording stopped: {self.failed}")
        if self._bag is None:
            try:
                # a fresh, sortable name: <stem>_<UTC time>_<n>
                stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
                self._bag = BagWriter(unused_path(self.directory, f"{self.stem}_{stamp}"))
            except ArchiveError as exc:
                self.failed = str(exc)
                raise
        return self._bag

    def _do(self, write) -> None:
        bag = self._current()
        try:
            write(bag)
        except ArchiveError as exc:
            self.failed = str(exc)
            raise

    def record_joint_state(self, topic: str, stamp_ns: int, names: Sequence[str], positions: npt.ArrayLike,
                           velocities: npt.ArrayLike) -> None:
        self._do(lambda bag: bag.joint_state(topic, stamp_ns, names, positions, velocities))

    def record_command(self, topic: str, stamp_ns: int, values: npt.ArrayLike) -> None:
        self._do(lambda bag: bag.command(topic, stamp_ns, values))

    def record_reward(self, stamp_ns: int, value: float) -> None:
        self._do(lambda bag: bag.reward(stamp_ns, value))

    def record_episode(self, stamp_ns: int, event_json: str) -> None:
        self._do(lambda bag: bag.episode(stamp_ns, event_json))
        try:
            ended = parse_episode_event(event_json)["event"] == "end"
        except InputError:
            ended = False
        if ended:
            self._ended_in_bag += 1
            if self._ended_in_bag >= self.episodes_per_bag:
                self.close()

    def close(self) -> None:
        """Finish the bag in progress (metadata.yaml written); the next message starts a new one."""
        self._ended_in_bag = 0
        if self._bag is not None:
            bag, self._bag = self._bag, None
            try:
                bag.close()
            except ArchiveError as exc:
                self.failed = str(exc)
                raise


class EpisodeArchiveWriter:
    """Writes Episodes as the message stream the ROS graph produces, `episodes_per_bag` per bag.

    Time is synthetic: step t at t * control_dt. A SIGKILL loses at most the bag being filled.
    """

    def __init__(self, directory: str | Path, robot: BagEncoding, family: str = "train",
                 episodes_per_bag: int = 20, control_dt: float = 0.04) -> None:
        if robot is None:
            raise ArchiveError("archiving episodes needs their encoding on the topics: a RobotSpec (arm) or "
                               "a BoxSpec (any family with Box spaces)")
        self.recorder = ArchiveRecorder(directory, robot, stem=family.replace("/", "_"),
                                        episodes_per_bag=episodes_per_bag)
        self.robot = robot
        self.dt_ns = int(round(control_dt * 1e9))
        self._clock = 0

    def add(self, episode: Episode) -> None:
        r, rec = self.robot, self.recorder
        if (episode.obs_dim, episode.act_dim) != (r.obs_dim, r.act_dim):
            raise ArchiveError(f"episode {episode.task_id!r} has obs/act dims {episode.obs_dim}/{episode.act_dim}, "
                               f"the archive's encoding {r.obs_dim}/{r.act_dim}")

        def state(t_ns: int, obs: np.ndarray) -> None:
            arm_pos, arm_vel, grip_pos, grip_vel = r.split_observation(obs.astype(np.float64))
            rec.record_joint_state("/joint_states", t_ns, r.arm_joints, arm_pos, arm_vel)
            rec.record_joint_state("/gripper/joint_states", t_ns, r.gripper_joints, grip_pos, grip_vel)

        t0 = self._clock
        rec.record_episode(t0, json.dumps({"event": "start", "task_id": episode.task_id, "task": {}}))
        for t in range(len(episode)):
            stamp = t0 + (t + 1) * self.dt_ns
            state(stamp, episode.observations[t])
            arm, grip = r.action_to_commands(episode.actions[t].astype(np.float64))
            rec.record_command("/arm_controller/commands", stamp + 1000, arm)
            rec.record_command("/gripper_controller/commands", stamp + 1000, grip)
            rec.record_reward(stamp + 2000, float(episode.rewards[t]))
        end = t0 + (len(episode) + 1) * self.dt_ns
        state(end, episode.observations[-1])
        rec.record_episode(end + 1000, json.dumps({"event": "end", "task_id": episode.task_id}))
        self._clock = end + self.dt_ns

    def close(self) -> None:
        self.recorder.close()


@dataclass
class BagReport:
    """What one bag holds, and what was wrong with it."""

    path: str
    messages: dict[str, int] = field(default_factory=dict)
    episodes: int = 0
    transitions: int = 0
    tasks: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # damage or malformed data: the bag is not ok
    dropped: list[str] = field(default_factory=list)  # steps cut at an episode or recording boundary


def _is_bag(path: Path) -> bool:
    return path.is_dir() and ((path / "metadata.yaml").is_file() or any(path.glob("*.mcap")))


def bag_dirs(path: str | Path) -> list[Path]:
    """A bag directory itself, or every bag directory (with metadata.yaml or an .mcap) below `path`."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ArchiveError(f"archive {path} does not exist")
    if not path.is_dir():
        raise ArchiveError(f"{path} is a file: give the bag directory that holds it ({path.parent}) or an archive "
                           "directory of bags")
    if _is_bag(path):
        return [path]
    return sorted(p for p in path.iterdir() if _is_bag(p))


def read_bag(path: str | Path, robot: BagEncoding, task_id: str | None = None,
             episode_gap_s: float = 1.0, cache: bool = True) -> tuple[list[Episode], BagReport]:
    """Episodes of one bag by the shared step rule, and a report of every problem met on the way.

    A message the step rule rejects (bad joint names, NaN, wrong length) is a problem, reported and skipped;
    a step cut at a boundary (a command before the episode's first state or reward: the start of a recording,
    or a bag that begins at an episode start) is counted in `dropped`, as the online node drops it; a bag
    with the right topic names but other message types, or that cannot be opened, is an ArchiveError.

    With `cache` (the default) the result comes from the bag's columnar cache when it is current, and is
    decoded in bulk otherwise (mql_ros.archive.columnar), falling back to per-message decoding for
    irregular bags; the Episodes are then views of memory-mapped arrays. The result is the same either way.
    """
    path = Path(path)
    if not cache:
        return read_bag_per_message(path, robot, task_id, episode_gap_s)
    entry = columnar.cache_root(path) / f"{path.name}-{columnar.cache_key(path, robot, task_id, episode_gap_s)}"
    hit = columnar.read_cache(entry)
    if hit is not None:
        episodes, report = hit
        return episodes, BagReport(**{**report, "path": str(path)})  # the bag may have been moved since
    try:
        if not isinstance(robot, RobotSpec):  # the bulk decoder knows the arm's layout only
            raise columnar.Irregular(f"{type(robot).__name__} encoding")
        decoded, counts = columnar.decode_bag(path, robot, TYPESTORE, TOPICS)
    except columnar.Irregular:
        episodes, report = read_bag_per_message(path, robot, task_id, episode_gap_s)
    else:
        report = BagReport(str(path), messages=counts)
        episodes = columnar.run_rule(decoded, robot, task_id or path.name, episode_gap_s, report)
        _summarize(report, episodes)
    try:
        columnar.drop_stale(entry)
        columnar.write_cache(entry, episodes, report, robot.obs_dim, robot.act_dim)
    except OSError:  # a read-only archive or a full disk: reading works without a cache
        return episodes, report
    hit = columnar.read_cache(entry)  # the mapped copy, so a cold load holds no more memory than a warm one
    return (hit[0], report) if hit is not None else (episodes, report)


def read_bag_per_message(path: str | Path, robot: BagEncoding, task_id: str | None = None,
                         episode_gap_s: float = 1.0) -> tuple[list[Episode], BagReport]:
    """read_bag decoding every message with rosbags (or the mcap stream reader): the reference path."""
    path = Path(path)
    report = BagReport(str(path))
    builder = TransitionBuilder(robot, task_id=task_id or path.name, episode_gap_s=episode_gap_s)
    episodes: list[Episode] = []
    pending: dict[str, tuple[int, np.ndarray]] = {}
    reader = _rosbag2_reader(path, report) if (path / "metadata.yaml").is_file() else None
    messages = _rosbag2_messages(path, reader) if reader is not None else _mcap_messages(path)
    try:
        for topic, stamp, msg in messages:
            report.messages[topic] = report.messages.get(topic, 0) + 1
            try:
                _feed(builder, topic, stamp, msg, pending, episodes)
            except IncompleteStep as exc:
                report.dropped.append(f"{topic} at {stamp} ns: {exc}")
            except InputError as exc:
                report.problems.append(f"{topic} at {stamp} ns: {exc}")
    except _Truncated as exc:  # keep what was read before the damage
        report.problems.append(f"stopped reading after {sum(report.messages.values())} messages: {exc}")
    episodes += builder.finished
    last = builder.finish_episode()
    if last is not None:
        episodes.append(last)
    _summarize(report, episodes)
    return episodes, report


def _summarize(report: BagReport, episodes: list[Episode]) -> None:
    report.episodes = len(episodes)
    report.transitions = sum(len(e) for e in episodes)
    report.tasks = sorted({e.task_id for e in episodes})


class _Truncated(Exception):
    """The file ends or breaks in the middle: what came before it is kept."""


def _check_type(path: Path, topic: str, msgtype: str) -> None:
    if topic in TOPICS and msgtype != TOPICS[topic]:
        raise ArchiveError(f"bag {path}: topic {topic} has type {msgtype}, expected {TOPICS[topic]}")


def _rosbag2_reader(path: Path, report: BagReport) -> Reader | None:
    """rosbags' Reader of a bag with metadata.yaml, opened. If rosbags cannot open it (an .mcap cut short, so
    without its summary; metadata.yaml naming other files or storage) but it has .mcap files, that is a problem
    in `report` and None: the files are then read as a stream. Otherwise ArchiveError."""
    try:
        reader = Reader(path)
        reader.open()
        return reader
    except Exception as exc:  # noqa: BLE001 -- rosbags raises many types for an unreadable bag
        if not any(path.glob("*.mcap")):
            raise ArchiveError(f"bag {path} cannot be opened: {exc}") from exc
        report.problems.append(f"rosbags (so `ros2 bag info` and `ros2 bag play` too) cannot open it: "
                               f"{str(exc).rstrip('.')}; its .mcap read as a stream")
        return None


def _rosbag2_messages(path: Path, reader: Reader):
    """(topic, log time, message) of a bag rosbags opened (MCAP or SQLite3)."""
    try:
        for conn in reader.connections:
            _check_type(path, conn.topic, conn.msgtype)
        wanted = [c for c in reader.connections if c.topic in TOPICS]
        try:
            for conn, stamp, raw in reader.messages(connections=wanted):
                yield conn.topic, stamp, TYPESTORE.deserialize_cdr(raw, conn.msgtype)
        except Exception as exc:  # noqa: BLE001 -- a truncated or corrupt file
            raise _Truncated(f"{type(exc).__name__}: {exc}") from exc
    finally:
        reader.close()


def _mcap_messages(path: Path):
    """(topic, log time, message) of .mcap files read as a stream (no metadata.yaml, as a killed writer
    leaves it, or one rosbags cannot open), so that a file cut short gives every message before the cut.

    The records are gathered in file order and then sorted stably by log time, the order rosbags gives."""
    from mcap.exceptions import McapError
    from mcap.reader import NonSeekingReader
    from mcap_ros2.decoder import DecoderFactory

    files = sorted(path.glob("*.mcap")) if path.is_dir() else [path]
    if not files:
        raise ArchiveError(f"bag {path} has neither metadata.yaml nor an .mcap file")
    for file in files:
        with open(file, "rb") as f:
            magic = f.read(8)
            if len(magic) < 8:
                raise _Truncated(f"{file.name} ends before its MCAP header ({len(magic)} bytes)")
            if magic != b"\x89MCAP0\r\n":
                raise ArchiveError(f"bag {path}: {file.name} is not an MCAP file")
            f.seek(0)
            records, damage = [], None
            try:  # not the reader's own log-time order: it sorts a generator, so a cut loses everything
                for schema, channel, message in NonSeekingReader(f).iter_messages(log_time_order=False):
                    _check_type(path, channel.topic, schema.name if schema is not None else "")
                    if channel.topic in TOPICS:
                        records.append((schema, channel, message))
            except (McapError, EOFError, ValueError, struct_error) as exc:
                damage = f"{file.name}: {type(exc).__name__}" + (f": {exc}" if str(exc) else "")
        factory, decoders = DecoderFactory(), {}
        for schema, channel, message in sorted(records, key=lambda r: r[2].log_time):
            if channel.id not in decoders:
                decoders[channel.id] = factory.decoder_for(channel.message_encoding, schema)
            if decoders[channel.id] is None:
                raise ArchiveError(f"bag {path}: {file.name} channel {channel.topic} is in "
                                   f"{channel.message_encoding!r}, not CDR")
            try:
                decoded = decoders[channel.id](message.data)
            except (ValueError, IndexError, struct_error) as exc:  # a record intact, its payload not
                raise _Truncated(f"{file.name}: message at {message.log_time} ns cannot be decoded: {exc}") from exc
            yield channel.topic, message.log_time, decoded
        if damage is not None:
            raise _Truncated(damage)


def _feed(builder: TransitionBuilder, topic: str, stamp: int, msg, pending: dict, episodes: list) -> None:
    if topic == "/joint_states":
        builder.on_joint_state(stamp, msg.name, msg.position, msg.velocity)
    elif topic == "/gripper/joint_states":
        builder.on_gripper_state(stamp, msg.name, msg.position, msg.velocity)
    elif topic == "/mql/reward":
        builder.on_reward(stamp, msg.data)
    elif topic == "/mql/episode":
        builder.on_episode(stamp, msg.data)  # InputError if malformed: then it is not an end either
        if parse_episode_event(msg.data)["event"] == "end":
            episode = builder.finish_episode()
            if episode is not None:
                episodes.append(episode)
    else:  # a command: the arm and gripper commands of one tick are joined before the rule sees them
        which = "arm" if topic == "/arm_controller/commands" else "gripper"
        pending[which] = (stamp, np.asarray(msg.data, dtype=np.float64))
        if "arm" in pending and "gripper" in pending:
            (t_arm, arm), (t_grip, grip) = pending.pop("arm"), pending.pop("gripper")
            builder.on_command(max(t_arm, t_grip), arm, grip)


def load_episodes(paths: str | Path | Iterable[str | Path], robot: BagEncoding, task_id: str | None = None,
                  episode_gap_s: float = 1.0, cache: bool = True, warn: Callable[[str], None] | None = None,
                  stop: Callable[[], bool] | None = None) -> list[Episode]:
    """Episodes of every bag under `paths` (a directory, a bag, or a list of them). Problems in a bag are not
    silent: an unreadable bag raises ArchiveError naming it; a bag read with problems (messages the step rule
    rejected, a file cut short) is named to `warn` (default: warnings.warn) with what was kept from it, and
    `mql-ros archive verify` lists every problem. `stop` is asked before each bag (a node shutting down while
    it loads a large archive): True raises AdaptationCancelled."""
    if robot is None:
        raise ArchiveError("reading bags needs their encoding: a RobotSpec (arm joint names) or a BoxSpec "
                           "(a generic family's dims), e.g. mql_ros.core.checkpoint.bag_encoding(checkpoint)")
    warn = warn or (lambda message: warnings.warn(message, stacklevel=3))
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    out: list[Episode] = []
    for p in paths:
        for bag in bag_dirs(p):
            if stop is not None and stop():
                raise AdaptationCancelled(f"loading the archive stopped before {bag} ({len(out)} episodes read)")
            episodes, report = read_bag(bag, robot, task_id, episode_gap_s, cache)
            if report.problems:
                warn(f"bag {report.path}: {len(report.problems)} problem(s), the first: {report.problems[0]}; "
                     f"kept {report.episodes} episodes, {report.transitions} transitions (`mql-ros archive "
                     "verify` lists every problem)")
            out += episodes
    return out
