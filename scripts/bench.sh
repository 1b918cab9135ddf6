#!/usr/bin/env bash
# Benchmarks (pytest-benchmark). Args: bench files (default: all of bench/) and pytest options.
# YAPO_BENCH_THREADS (default 1) sets torch and numba threads; see bench/conftest.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ "$#" -eq 0 ]; then set -- bench/bench_sparse_steer.py bench/bench_topk_threshold.py; fi
# bench files are named bench_*.py (not collected by the test suite); .venv/bin/pytest, never
# python -m pytest (which would put kernels/ on sys.path as a top-level module).
exec .venv/bin/pytest -p no:cacheprovider -o python_files="bench_*.py" -o testpaths=bench -q \
    --benchmark-columns=min,median,max,rounds --benchmark-sort=name "$@"
