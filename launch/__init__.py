"""Launchers for commcomp jobs: an emulated multi-host cluster and multi-node torchrun / mpirun.

    from launch import Cluster, launch_torchrun
    with Cluster(hosts=4, rate_mbit=100) as c:            # 4 namespaces, 100 Mbit/s links
        launch_torchrun(c, "train.py", ["--epochs", "1"], nproc_per_node=1, timeout=600)

In the training script, `launch.dist.init_from_env()` picks NCCL + GPU or gloo + CPU and names
ranks that stop answering. Command line: `python -m launch --help`.

Names are imported on first use, so the cluster and the command line do not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "Cluster": "launch.cluster",
    "ClusterError": "launch.cluster",
    "list_clusters": "launch.cluster",
    "remove_clusters": "launch.cluster",
    "LocalCluster": "launch.local",
    "DistInfo": "launch.dist",
    "finish": "launch.dist",
    "init_from_env": "launch.dist",
    "Job": "launch.job",
    "LaunchError": "launch.job",
    "LaunchResult": "launch.job",
    "launch_mpirun": "launch.mpi",
    "start_mpirun": "launch.mpi",
    "launch_torchrun": "launch.torchrun",
    "start_torchrun": "launch.torchrun",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'launch' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)


def __dir__() -> list[str]:
    return __all__
