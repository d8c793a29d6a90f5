"""The rosbag2 (MCAP) replay archive: writing, reading and verifying bags of the contract topics.

An archive is a directory of bags; each bag holds /joint_states, /gripper/joint_states, the two command
topics, /mql/reward and /mql/episode with standard message types, so `ros2 bag info/play` accept it.
Only arm families (with a RobotSpec) are archived for now: their observations are joint states.
"""

from mql_ros.archive.bags import (
    ArchiveRecorder,
    BagReport,
    EpisodeArchiveWriter,
    bag_dirs,
    load_episodes,
    read_bag,
)
from mql_ros.archive.inspect import archive_info, export_archive, verify_archive

__all__ = ["ArchiveRecorder", "BagReport", "EpisodeArchiveWriter", "archive_info", "bag_dirs",
           "export_archive", "load_episodes", "read_bag", "verify_archive"]
