"""The rosbag2 (MCAP) replay archive: writing, reading and verifying bags of the contract topics.

An archive is a directory of bags; each bag holds /joint_states, /gripper/joint_states, the two command
topics, /mql/reward and /mql/episode with standard message types, so `ros2 bag info/play` accept it.
An arm family's observations are its joint states (RobotSpec); any other family with Box spaces is encoded
on the same topics by its BoxSpec (mql_ros.core.robot), so every family is archived and read back alike.
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
