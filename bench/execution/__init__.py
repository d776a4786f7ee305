"""Running sweeps: the runner, its workers, the executors, the pre-run duration forecast, dataset kernels in tiles."""
