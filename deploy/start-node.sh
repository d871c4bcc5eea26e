#!/usr/bin/env bash
# Start (or stop, or probe) one specserve node: Ray with this node's role resources and, on the
# head, the scheduler (`specserve serve --address auto`: gRPC and the OpenAI HTTP API). One
# script for every way of deploying, so they all run the same commands:
#   ray up deploy/cluster.yaml / deploy/cluster-aws.yaml   (head_/worker_start_ray_commands)
#   KubeRay deploy/kuberay/raycluster.yaml                  (container command, foreground)
#   tests/integration/test_deploy_cluster.py                (head + one node per role on one machine)
#
# Usage: start-node.sh [start|stop|serve|probe live|probe ready]      (default: start)
#
# The role (first match wins):
#   1. $SPECSERVE_ROLE                        e.g. head | verify | prefill,draft | verify:2 | head,all
#   2. /etc/specserve/role                    one line, written on each machine by its admin
#   3. $SPECSERVE_CONFIG_DIR/roles            a map shared by all nodes (ray up syncs it): lines
#                                             "<ip-or-hostname> <role>", '#' comments; the line
#                                             naming one of this machine's addresses or names wins
#   4. $RAY_OVERRIDE_RESOURCES                set by `ray up` on cloud providers from the node
#                                             type's `resources` (which carry the role resources)
# A role is `head` and/or worker roles `prefill`, `draft`, `verify` (`all` = the three); `:N`
# offers N units of that role's resource (N actors of the role), default 1. Worker roles become
# Ray custom resources: verify:2 -> --resources='{"specserve_verify": 2}'.
#
# Settings (environment, or KEY=VALUE lines in /etc/specserve/specserve.env and
# $SPECSERVE_CONFIG_DIR/specserve.env, read in that order; the environment wins):
#   SPECSERVE_CONFIG_DIR     default ~/.config/specserve
#   SPECSERVE_HEAD_ADDRESS   worker: the head's GCS HOST:PORT (default $RAY_HEAD_IP:$SPECSERVE_RAY_PORT)
#   SPECSERVE_RAY_PORT       head GCS port (default 6379)
#   SPECSERVE_RAY_ARGS       extra `ray start` arguments (word-split; no quoting)
#   SPECSERVE_RAY_HEAD_ARGS  head: more `ray start` arguments (head-only flags: --include-dashboard=false)
#   SPECSERVE_AUTOSCALING_CONFIG  head: the autoscaler's config (`ray up`: ~/ray_bootstrap_config.yaml)
#   SPECSERVE_HOST / SPECSERVE_PORT / SPECSERVE_HTTP_PORT / SPECSERVE_METRICS_PORT
#                            serve listen address and ports: gRPC, OpenAI HTTP API, Prometheus
#                            (0.0.0.0 / 50051 / 8000 / 9464; `--no-http` in SPECSERVE_SERVE_ARGS: no HTTP)
#   SPECSERVE_TOKEN          bearer token of gRPC and HTTP (read by `specserve serve`); required beyond loopback
#   SPECSERVE_TLS_CERT / SPECSERVE_TLS_KEY                     PEM files for TLS (gRPC and HTTP)
#   SPECSERVE_MODEL          model name or path on every node (default: the embedded smollm2-135m)
#   SPECSERVE_DEVICE         --device of the engines (cpu, cuda, cuda:N; default cpu)
#   SPECSERVE_ACTOR_GPUS     GPUs each prefill/draft/verify actor takes (--<role>-gpus; default 0)
#   SPECSERVE_REDIS          redis://[:password@]host:port/db of the shared prefix cache (read by
#                            `specserve serve` itself), or `local`: start redis-server on the head
#                            (port $SPECSERVE_REDIS_PORT, default 6380; password
#                            $SPECSERVE_REDIS_PASSWORD, default random; $SPECSERVE_REDIS_MAXMEMORY, 2gb)
#   SPECSERVE_SERVE_ARGS     extra `specserve serve` arguments (word-split; no quoting)
#   SPECSERVE_WAIT_FOR_ROLES head: start the server once nodes offer these roles (e.g. prefill,draft,verify)
#   SPECSERVE_FOREGROUND=1   stay in the foreground until Ray or the server exits (containers);
#                            implied when KubeRay sets KUBERAY_GEN_RAY_START_CMD
#   SPECSERVE_LOG_DIR        head: serve.log, serve.pid, redis files (default /tmp/specserve)
#   RAY_AUTH_TOKEN           Ray's own token authentication (every node, the same value; or a file
#                            in RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token): with a token the script
#                            sets RAY_AUTH_MODE=token, so head, workers and the server agree
set -euo pipefail

say() { echo "start-node: $*" >&2; }
die() { say "error: $*"; exit 2; }

# KEY=VALUE lines (no shell code is run; quotes around VALUE are dropped); a variable already in
# the environment keeps its value.
load_env_files() {
    local file line key value
    for file in /etc/specserve/specserve.env "$CONFIG_DIR/specserve.env"; do
        [[ -r $file ]] || continue
        while IFS= read -r line || [[ -n $line ]]; do
            line=${line#"${line%%[![:space:]]*}"}
            [[ $line =~ ^(export[[:space:]]+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$ ]] || continue
            key=${BASH_REMATCH[2]}
            value=${BASH_REMATCH[3]}
            [[ $value =~ ^\"(.*)\"$ || $value =~ ^\'(.*)\'$ ]] && value=${BASH_REMATCH[1]}
            [[ -n ${!key+set} ]] || export "$key=$value"
        done <"$file"
    done
}

this_hosts() {
    hostname 2>/dev/null || true
    hostname -f 2>/dev/null || true
    hostname -I 2>/dev/null | tr ' ' '\n' || true
}

role_from_map() {
    local map=$1 names key role
    names=$(this_hosts | sed '/^$/d')
    while read -r key role _; do
        [[ -z $key || $key == \#* ]] && continue
        if grep -Fxq -- "$key" <<<"$names"; then
            echo "$role"
            return
        fi
    done <"$map"
}

resolve_role() {
    if [[ -n ${SPECSERVE_ROLE:-} ]]; then
        echo "$SPECSERVE_ROLE"
    elif [[ -r /etc/specserve/role ]]; then
        sed -e 's/#.*//' -e '/^[[:space:]]*$/d' /etc/specserve/role | head -n 1 | tr -d '[:space:]'
    elif [[ -r $CONFIG_DIR/roles ]] && [[ -n $(role_from_map "$CONFIG_DIR/roles") ]]; then
        role_from_map "$CONFIG_DIR/roles"
    elif [[ ${RAY_OVERRIDE_RESOURCES:-} == *specserve_* ]]; then
        echo "from-ray-up"
    fi
}

# Parses ROLE into IS_HEAD (0/1) and RESOURCES (JSON of role resources, "" when none).
parse_role() {
    local part name count entries=()
    IS_HEAD=0
    RESOURCES=""
    [[ $1 == from-ray-up ]] && return
    IFS=',' read -ra parts <<<"$1"
    for part in "${parts[@]}"; do
        name=${part%%:*}
        count=1
        [[ $part == *:* ]] && count=${part#*:}
        [[ $count =~ ^[1-9][0-9]*$ ]] || die "role '$part': the count after ':' must be a positive integer"
        case $name in
            head) IS_HEAD=1 ;;
            all) entries+=("\"specserve_prefill\": $count" "\"specserve_draft\": $count" "\"specserve_verify\": $count") ;;
            prefill | draft | verify) entries+=("\"specserve_$name\": $count") ;;
            *) die "unknown role '$name' in '$1' (head, prefill, draft, verify, all)" ;;
        esac
    done
    if ((${#entries[@]})); then
        RESOURCES="{$(IFS=','; echo "${entries[*]}" | sed 's/,/, /g')}"
    fi
}

# `ray start --head` turns token auth on by itself when it finds a token, `ray start --address`
# does not: say it for both, and for the server's driver.
ray_auth_mode() {
    if [[ -z ${RAY_AUTH_MODE:-} ]] && [[ -n ${RAY_AUTH_TOKEN:-} || -n ${RAY_AUTH_TOKEN_PATH:-} || -r $HOME/.ray/auth_token ]]; then
        export RAY_AUTH_MODE=token
    fi
    say "Ray token authentication: ${RAY_AUTH_MODE:-disabled}"
    # Ray starts worker processes at nice 15: on a loaded node the actors then get a fraction of a
    # core against any ordinary process (measured: the draft step 3x slower).
    export RAY_worker_niceness="${RAY_worker_niceness:-0}"
}

node_ip() {
    if [[ -n ${SPECSERVE_NODE_IP:-} ]]; then
        echo "$SPECSERVE_NODE_IP"
    else
        hostname -I 2>/dev/null | awk '{print $1}'
    fi
}

# The `ray start` command line of this node, in RAY_CMD (an array).
ray_command() {
    local block=$1
    # shellcheck disable=SC2206
    local extra=(${SPECSERVE_RAY_ARGS:-})
    if ((IS_HEAD)); then
        # shellcheck disable=SC2206
        extra+=(${SPECSERVE_RAY_HEAD_ARGS:-})
        [[ -n ${SPECSERVE_AUTOSCALING_CONFIG:-} ]] && extra+=(--autoscaling-config="$SPECSERVE_AUTOSCALING_CONFIG")
        RAY_CMD=(ray start --head --port="${SPECSERVE_RAY_PORT:-6379}")
    else
        local head=${SPECSERVE_HEAD_ADDRESS:-}
        if [[ -z $head ]]; then
            [[ -n ${RAY_HEAD_IP:-} ]] || die "worker: set SPECSERVE_HEAD_ADDRESS=HOST:PORT (or RAY_HEAD_IP)"
            head="$RAY_HEAD_IP:${SPECSERVE_RAY_PORT:-6379}"
        fi
        RAY_CMD=(ray start --address="$head")
    fi
    [[ -n $RESOURCES ]] && RAY_CMD+=(--resources="$RESOURCES")
    ((block)) && RAY_CMD+=(--block)
    RAY_CMD+=("${extra[@]}")
}

# Redis on the head, reachable by every node, with a password (a random one unless given): the
# server hands the URL to its workers.
start_local_redis() {
    local port=${SPECSERVE_REDIS_PORT:-6380} password=${SPECSERVE_REDIS_PASSWORD:-}
    command -v redis-server >/dev/null || die "SPECSERVE_REDIS=local but redis-server is not installed"
    [[ -n $password ]] || password=$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')
    stop_pidfile "$LOG_DIR/redis.pid"
    # The password goes in through stdin, not the command line (ps shows that to every user).
    printf 'requirepass %s\n' "$password" | redis-server - --port "$port" --bind 0.0.0.0 \
        --maxmemory "${SPECSERVE_REDIS_MAXMEMORY:-2gb}" --maxmemory-policy allkeys-lru \
        --save "" --appendonly no --dir "$LOG_DIR" --daemonize yes \
        --pidfile "$LOG_DIR/redis.pid" --logfile "$LOG_DIR/redis.log"
    export SPECSERVE_REDIS="redis://:$password@$(node_ip):$port/0"
    say "redis-server on port $port (log $LOG_DIR/redis.log)"
}

# The `specserve serve` command line of the head, in SERVE_CMD (an array).
serve_command() {
    # shellcheck disable=SC2206
    local extra=(${SPECSERVE_SERVE_ARGS:-})
    SERVE_CMD=(specserve serve --address auto
        --host "${SPECSERVE_HOST:-0.0.0.0}" --port "${SPECSERVE_PORT:-50051}"
        --http-port "${SPECSERVE_HTTP_PORT:-8000}" --metrics-port "${SPECSERVE_METRICS_PORT:-9464}")
    [[ -n ${SPECSERVE_MODEL:-} ]] && SERVE_CMD+=(--model "$SPECSERVE_MODEL")
    [[ -n ${SPECSERVE_DEVICE:-} ]] && SERVE_CMD+=(--device "$SPECSERVE_DEVICE")
    if [[ -n ${SPECSERVE_ACTOR_GPUS:-} ]]; then
        local role
        for role in prefill draft verify; do SERVE_CMD+=("--$role-gpus" "$SPECSERVE_ACTOR_GPUS"); done
    fi
    [[ -n ${SPECSERVE_TLS_CERT:-} ]] && SERVE_CMD+=(--tls-cert "$SPECSERVE_TLS_CERT" --tls-key "${SPECSERVE_TLS_KEY:?SPECSERVE_TLS_KEY must go with SPECSERVE_TLS_CERT}")
    SERVE_CMD+=("${extra[@]}")  # SPECSERVE_TOKEN and SPECSERVE_REDIS reach it as environment
}

wait_for_ray() {
    local address=$1 deadline=$((SECONDS + ${SPECSERVE_RAY_WAIT_S:-180}))
    until ray health-check --address "$address" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "Ray at $address not healthy after ${SPECSERVE_RAY_WAIT_S:-180}s"
        sleep 1  # poll interval
    done
}

start_daemons() {
    ray_command 0
    say "${RAY_CMD[*]}"
    "${RAY_CMD[@]}"
    ((IS_HEAD)) || return 0
    [[ ${SPECSERVE_REDIS:-} == local ]] && start_local_redis
    serve_command
    stop_pidfile "$LOG_DIR/serve.pid"
    say "${SERVE_CMD[*]} (log $LOG_DIR/serve.log)"
    setsid nohup bash "$SELF" serve </dev/null >"$LOG_DIR/serve.log" 2>&1 &
    echo $! >"$LOG_DIR/serve.pid"
}

# `start-node.sh serve` (the head): waits until the cluster offers every role in
# $SPECSERVE_WAIT_FOR_ROLES (at most $SPECSERVE_WAIT_FOR_ROLES_S seconds, default 900), then
# becomes `specserve serve`. Static clusters set it so the server places its actors with every
# role's node present.
run_server() {
    serve_command
    if [[ -n ${SPECSERVE_WAIT_FOR_ROLES:-} ]]; then
        local python
        python=$(dirname "$(command -v specserve)")/python
        [[ -x $python ]] || python=python3
        say "waiting for nodes offering: $SPECSERVE_WAIT_FOR_ROLES"
        "$python" - "$SPECSERVE_WAIT_FOR_ROLES" "${SPECSERVE_WAIT_FOR_ROLES_S:-900}" <<'EOF'
import sys, time
import ray

roles = [r.strip() for r in sys.argv[1].split(",") if r.strip()]
deadline = time.monotonic() + float(sys.argv[2])
ray.init(address="auto", namespace="specserve-start", logging_level="ERROR", log_to_driver=False)
while missing := [r for r in roles if ray.cluster_resources().get(f"specserve_{r}", 0) <= 0]:
    if time.monotonic() > deadline:
        print(f"start-node: no node offers {missing} after {sys.argv[2]}s; starting anyway", file=sys.stderr)
        break
    time.sleep(2)  # poll interval while nodes join
ray.shutdown()
EOF
    fi
    say "${SERVE_CMD[*]}"
    exec "${SERVE_CMD[@]}"
}

# Containers: Ray (blocking) and, on the head, the server; the first to exit ends the other.
start_foreground() {
    local pids=()
    if [[ -n ${KUBERAY_GEN_RAY_START_CMD:-} ]]; then
        # KubeRay's command carries the group's `resources`: they must be this pod's role.
        local key
        for key in $(grep -o 'specserve_[a-z]*' <<<"$RESOURCES" || true); do
            [[ $KUBERAY_GEN_RAY_START_CMD == *$key* ]] \
                || die "role '$ROLE' needs resource $key in the worker group's \`resources\`; KubeRay's command: $KUBERAY_GEN_RAY_START_CMD"
        done
        say "KubeRay: $KUBERAY_GEN_RAY_START_CMD"
        bash -c "ulimit -n 65536 2>/dev/null; $KUBERAY_GEN_RAY_START_CMD" &
    else
        ray_command 1
        say "${RAY_CMD[*]}"
        "${RAY_CMD[@]}" &
    fi
    pids+=($!)
    if ((IS_HEAD)); then
        wait_for_ray "127.0.0.1:${SPECSERVE_RAY_PORT:-6379}"
        [[ ${SPECSERVE_REDIS:-} == local ]] && start_local_redis
        serve_command
        say "${SERVE_CMD[*]}"
        bash "$SELF" serve &
        pids+=($!)
    fi
    trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' TERM INT
    local rc=0
    wait -n "${pids[@]}" || rc=$?
    say "a process exited ($rc); stopping the rest"
    kill -TERM "${pids[@]}" 2>/dev/null || true
    wait || true
    exit "$rc"
}

stop_pidfile() {
    local file=$1 pid
    [[ -r $file ]] || return 0
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 "${SPECSERVE_STOP_WAIT_S:-40}"); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 1  # poll interval while the server drains (--shutdown-grace-s)
        done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
}

stop_node() {
    stop_pidfile "$LOG_DIR/serve.pid"
    stop_pidfile "$LOG_DIR/redis.pid"
    ray stop  # a dedicated node: this stops every Ray process of this machine
}

# Liveness: the server answers grpc.health.v1 (SERVING or NOT_SERVING: loading or waiting for
# workers is alive). Readiness: it answers SERVING.
probe() {
    local want=${1:-ready} python
    python=$(dirname "$(command -v specserve)")/python
    [[ -x $python ]] || python=python3
    SPECSERVE_PROBE_WANT=$want "$python" - <<'EOF'
import os, sys
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

target = f"127.0.0.1:{os.environ.get('SPECSERVE_PORT', '50051')}"
cert = os.environ.get("SPECSERVE_TLS_CERT")
if cert:
    creds = grpc.ssl_channel_credentials(open(cert, "rb").read())
    channel = grpc.secure_channel(target, creds, options=[("grpc.ssl_target_name_override", "localhost")])
else:
    channel = grpc.insecure_channel(target)
try:
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
except grpc.RpcError as e:
    sys.exit(f"health check failed: {e.code().name}")
name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
if os.environ["SPECSERVE_PROBE_WANT"] == "ready" and name != "SERVING":
    sys.exit(f"not ready: {name}")
print(name)
EOF
}

main() {
    SELF=$(readlink -f "${BASH_SOURCE[0]}")
    CONFIG_DIR=${SPECSERVE_CONFIG_DIR:-$HOME/.config/specserve}
    load_env_files
    LOG_DIR=${SPECSERVE_LOG_DIR:-/tmp/specserve}
    local command=${1:-start}
    case $command in
        stop) stop_node; return ;;
        probe) probe "${2:-ready}"; return ;;
        serve) ray_auth_mode; run_server; return ;;
        start) ;;
        *) die "unknown command '$command' (start, stop, serve, probe live|ready)" ;;
    esac
    local role
    role=$(resolve_role)
    ROLE=$role
    [[ -n $role ]] || die "no role for this node: set SPECSERVE_ROLE, write /etc/specserve/role, or list $(hostname) in $CONFIG_DIR/roles"
    parse_role "$role"
    say "role '$role'${RESOURCES:+: resources $RESOURCES}"
    mkdir -p "$LOG_DIR"
    ray_auth_mode
    if [[ ${SPECSERVE_FOREGROUND:-0} == 1 || -n ${KUBERAY_GEN_RAY_START_CMD:-} ]]; then
        start_foreground
    else
        start_daemons
    fi
}

main "$@"
