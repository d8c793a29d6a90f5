"""mql_ros: meta-Q-learning (MQL) for robot arms, as a ROS 2 package with a ROS-free core."""

__version__ = "0.1.0"
