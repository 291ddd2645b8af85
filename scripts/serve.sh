#!/usr/bin/env bash
# Set up everything, then serve on the embedded default (SQLite file, in-process selector memory).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec factpatch serve "$@"
