"""Baselines for benchmarks/compare.py: (b) a minimal forwarder, the ceiling, and (c) a typical
hand-rolled gateway, the peer. Each module builds its ASGI app from the environment and can be run
on its own: `python -m benchmarks.baselines.<name> --port 8001` (see `run` in common.py)."""
