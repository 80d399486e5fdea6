"""headstart's benchmarks: speed and accuracy targets, each measured against its baseline in the same run.

Run them with `python -m bench all` (or `python -m bench NAME`); results land in `bench/results/`.
Nothing here is imported by the product, and nothing here runs at import time.
"""
