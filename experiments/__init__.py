"""Runnable experiments: one module per config, each with `Config` and `run`."""
