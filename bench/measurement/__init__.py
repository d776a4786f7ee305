"""Measuring one case: timers, paired rounds, the machine and environment, correctness checks, the gate."""
