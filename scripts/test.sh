#!/usr/bin/env bash
# Set up (venv, deps, embedded model), make sure PostgreSQL and Redis run, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/services.sh
. .venv/bin/activate
python -m pytest -q -p no:cacheprovider "$@"
