"""The architecture zoo: the models sweeps run on (small built-ins and real models)."""
