#!/usr/bin/env bash
# Set everything up (scripts/setup.sh) and run the main job: the training comparison benchmark on an
# emulated cluster of 4 hosts at 100 Mbit/s (local processes without shaping where network namespaces
# cannot be created), under 10 minutes on 2 cores. Prints the tables and the targets, writes the
# JSON and plots under results/, and rewrites docs/results.md (and docs/results.png) and the README's
# headline table with this run.
# Extra arguments go to `python -m benchmarks.run` (see --help), e.g. `--results-md '' --readme ''` to
# leave docs/ and the README alone, `--methods all` for every method.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
exec .venv/bin/python -m benchmarks.run --results-md docs/results.md --readme README.md "$@"
