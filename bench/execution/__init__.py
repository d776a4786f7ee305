"""Running sweeps: the runner, its workers, the executors, the run plan, dataset kernels in tiles."""
