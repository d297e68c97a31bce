#!/usr/bin/env bash
# Set everything up (scripts/setup.sh) and run the main job: the training comparison benchmark on an
# emulated cluster of 4 hosts at 100 Mbit/s (local processes without shaping where network namespaces
# cannot be created). Prints the comparison table and where the JSON and plots were written.
# Extra arguments go to `python -m benchmarks.run` (see --help).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
exec .venv/bin/python -m benchmarks.run "$@"
