"""mql_ros: meta-Q-learning (MQL) for robot arms, as a ROS 2 package with a ROS-free core."""

import os

# In a process that has imported torch, OpenBLAS's own thread pool makes small numpy matmuls (the
# propensity fit, the numpy control-loop policy) ~50x slower on these 2-core machines. One BLAS thread is
# also what a control loop wants. Set before numpy loads; an explicit user setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"
