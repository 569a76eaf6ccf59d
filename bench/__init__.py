"""Reproducible benchmarks of samvad, side by side with a bare aiohttp ceiling and a naive baseline.

`python -m bench` (or `make bench`) runs every workload, writes bench/results/latest.json and
regenerates BENCHMARKS.md and bench/plots/*.png from it. See bench/run.py for the options.
"""
