#!/usr/bin/env bash
# README command 2: the whole test suite (installs what it needs first). Extra args go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/env.sh" >/dev/null
cd "$ROOT"
# tests/test_explain_browser.py opens the explain report in Debian's chromium: install it if
# missing (as root; elsewhere install it yourself, or that test fails and says so).
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null \
    || echo "scripts/test.sh: could not install chromium; tests/test_explain_browser.py will fail" >&2
fi
# .venv/bin/pytest, not `python -m pytest`: the latter puts the repo root on sys.path, where
# kernels/ would be importable as a top-level `kernels` module.
exec .venv/bin/pytest "$@"
