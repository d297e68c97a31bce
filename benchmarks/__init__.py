"""commcomp's benchmarks: training comparison (train.py, driven by run.py) and collective bandwidth
(collectives.py). See the README, "Benchmarks"."""
