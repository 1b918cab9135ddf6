#!/usr/bin/env bash
# README command 1: the main job on the embedded default model (installs what it needs first).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/env.sh" >/dev/null
cd "$ROOT"
exec .venv/bin/yapo-fast main "$@"
