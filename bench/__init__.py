"""The harness behind ``ntk-bench``: the model zoo, sweeps, their execution (locally or on a cluster), the
measurement, stored runs and reports; ``cli`` is the command line."""
