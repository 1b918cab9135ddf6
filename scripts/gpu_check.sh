#!/usr/bin/env bash
# The GPU check (docs/serving.md, "Under CUDA graphs"): under 8 minutes on an H100/H200.
#   bash scripts/gpu_check.sh [out.json]      (default: bench/results/gpu_check.json on a GPU, runs/ without)
# 1. the compiled Triton kernel tests (pytest -m gpu; deselected, with the reason, without CUDA);
# 2. scripts/gpu_check.py: a steered decoder layer captured in a CUDA graph, replayed while vectors
#    and slot maps change (equal to eager), and the table step per decode step at Gemma-2-2B shapes
#    against the HBM bound. Without CUDA, part 2 runs its CPU form (torch.compile fullgraph).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-.venv/bin/python}"
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    OUT="${1:-bench/results/gpu_check.json}"
    "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_sparse_steer_triton.py \
        tests/test_kernels_sparse_steer_triton_backward.py
else
    OUT="${1:-runs/gpu_check.json}"
    echo "gpu_check: no CUDA GPU here; the compiled Triton tests and the benchmark need one (CPU parts only)"
fi
"$PY" scripts/gpu_check.py "$OUT"
