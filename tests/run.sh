#!/usr/bin/env bash
# README, command 2: install what the tests need beyond the project's Python packages, then
# run the whole suite. Debian's headless Chromium drives the MLflow UI test; it is a system
# package, so `pip install -e ".[dev]"` cannot bring it. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null; then
    echo "tests/run.sh: installing Debian's chromium for the MLflow UI test" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
# the glyph dataset tests render the CI set of Debian CJK fonts (a no-op when installed)
bash workers/data/install_fonts.sh --ci
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
    . .venv/bin/activate
fi
exec pytest "$@"
