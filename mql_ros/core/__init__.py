"""The ROS-free MQL core: context encoder, TD3, replay, propensity-weighted adaptation.

Importing this package never imports rclpy.
"""
