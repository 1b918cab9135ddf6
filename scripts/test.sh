#!/usr/bin/env bash
# README command 2: the whole test suite (installs what it needs first). Extra args go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/env.sh" >/dev/null
cd "$ROOT"
# .venv/bin/pytest, not `python -m pytest`: the latter puts the repo root on sys.path, where
# kernels/ would be importable as a top-level `kernels` module.
exec .venv/bin/pytest "$@"
