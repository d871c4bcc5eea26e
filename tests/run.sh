#!/usr/bin/env bash
# The test command (CI runs it via .ci/run). Extra args go to pytest, e.g.
#   bash tests/run.sh tests/integration -x
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash deploy/setup.sh

# Default to the whole tests/ tree unless a test path was passed (pytest would
# otherwise collect all of tests/ as well as the path given).
paths=(tests)
for arg in "$@"; do
    [[ $arg != -* && -e ${arg%%::*} ]] && paths=() && break
done

echo "==> running pytest"
rc=0
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest "${paths[@]}" -m "unit or integration or e2e" -q -rs "$@" || rc=$?
if [[ $rc -eq 5 ]]; then
    echo "ERROR: pytest collected no tests; a run with no tests must not pass." >&2
fi
exit "$rc"
