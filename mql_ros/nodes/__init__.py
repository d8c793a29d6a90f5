"""rclpy nodes: thin wrappers over mql_ros.core, mql_ros.sim and mql_ros.archive."""
