"""The rosbag2 (MCAP) replay archive: writing, reading, indexing and verifying bags."""
