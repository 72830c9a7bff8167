#!/usr/bin/env bash
# Build the server image and check it the way a locked-down platform runs it: read-only root filesystem,
# every capability dropped, no privilege escalation, a tmpfs /tmp, a loopback port. Checks: /ready within a
# bounded time, the image's own HEALTHCHECK (run on a non-default REFORMER_PORT, so it must follow it), a
# streamed completion, an embedding, the user (uid 10001), the read-only root, no capabilities, and the
# SIGTERM drain (a streamed request in flight ends cleanly, the container exits 0 within the drain timeout
# plus 10 s). Writes a JSON result to --result FILE (default: standard output); exits 1 if a check failed.
#
#   deploy/check_image.sh [--variant cpu|gpu] [--base IMAGE] [--torch-index URL] [--build-arg K=V]...
#                         [--build-opt OPT]... [--run-opt OPT]... [--image TAG] [--no-build]
#                         [--drain-timeout S] [--ready-timeout S] [--result FILE]
#
# The engine: CONTAINER_ENGINE (docker or podman), else the first of docker, podman that answers `info`.
# Needs curl and python3 on the host. BASE and TORCH_INDEX may also come from the environment.
# shellcheck disable=SC2317  # the checks are functions called through `check`
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VARIANT=cpu
BASE=${BASE:-}
TORCH_INDEX=${TORCH_INDEX:-}
IMAGE=""
RESULT=""
BUILD=1
DRAIN_TIMEOUT=20
READY_TIMEOUT=300
CONTAINER_PORT=8080  # not the image's 8000: the health check has to follow REFORMER_PORT
build_args=()
build_opts=()
run_opts=()

usage() { sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "check_image: $*" >&2; exit 2; }
log() { echo "check_image: $*" >&2; }

while (($#)); do
    case $1 in
        --variant) VARIANT=${2:?}; shift 2 ;;
        --base) BASE=${2:?}; shift 2 ;;
        --torch-index) TORCH_INDEX=${2:?}; shift 2 ;;
        --build-arg) build_args+=(--build-arg "${2:?}"); shift 2 ;;
        --build-opt) build_opts+=("${2:?}"); shift 2 ;;
        --run-opt) run_opts+=("${2:?}"); shift 2 ;;
        --image) IMAGE=${2:?}; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --drain-timeout) DRAIN_TIMEOUT=${2:?}; shift 2 ;;
        --ready-timeout) READY_TIMEOUT=${2:?}; shift 2 ;;
        --result) RESULT=${2:?}; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

case $VARIANT in
    cpu)
        BASE=${BASE:-ubuntu:24.04}
        TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
        IMAGE=${IMAGE:-reformer-server:cpu-check} ;;
    gpu)
        IMAGE=${IMAGE:-reformer-server:gpu-check}
        run_opts+=(--gpus all) ;;
    *) die "--variant is cpu or gpu, not $VARIANT" ;;
esac
[[ -n $BASE ]] && build_args+=(--build-arg "BASE=$BASE")
[[ -n $TORCH_INDEX ]] && build_args+=(--build-arg "TORCH_INDEX=$TORCH_INDEX")
# What the image is built on: the BASE given, else the Dockerfile's default.
BASE_USED=${BASE:-$(sed -n 's/^ARG BASE=//p' "$ROOT/Dockerfile")}

command -v curl >/dev/null || die "curl is needed on the host"
command -v python3 >/dev/null || die "python3 is needed on the host"

engine_works() { command -v "$1" >/dev/null && timeout 60 "$1" info >/dev/null 2>&1; }
if [[ -n ${CONTAINER_ENGINE:-} ]]; then
    ENGINE=$CONTAINER_ENGINE
    engine_works "$ENGINE" || die "CONTAINER_ENGINE=$ENGINE does not answer '$ENGINE info'"
elif engine_works docker; then
    ENGINE=docker
elif engine_works podman; then
    ENGINE=podman
else
    die "neither docker nor podman works here (no daemon?); set CONTAINER_ENGINE"
fi
ENGINE_VERSION=$("$ENGINE" version --format '{{.Server.Version}}' 2>/dev/null ||
                 "$ENGINE" version --format '{{.Client.Version}}')
log "engine: $ENGINE $ENGINE_VERSION; image: $IMAGE; base: $BASE_USED"

WORK=$(mktemp -d)
NAME=reformer-check-$$
cleanup() {
    "$ENGINE" rm -f "$NAME" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

now() { date +%s.%N; }
seconds_since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# ---- build --------------------------------------------------------------------------------------------
if ((BUILD)); then
    format=()
    [[ $ENGINE == podman ]] && format=(--format docker)  # the OCI format has no HEALTHCHECK
    log "building ($ENGINE build ${build_args[*]} ${build_opts[*]})"
    started=$(now)
    "$ENGINE" build "${format[@]}" "${build_args[@]}" "${build_opts[@]}" -t "$IMAGE" -f "$ROOT/Dockerfile" "$ROOT"
    BUILD_SECONDS=$(seconds_since "$started")
else
    BUILD_SECONDS=None
fi
SIZE_BYTES=$("$ENGINE" image inspect --format '{{.Size}}' "$IMAGE")
HEALTHCHECK_JSON=$("$ENGINE" image inspect --format '{{json .Config.Healthcheck}}' "$IMAGE")

# ---- run ----------------------------------------------------------------------------------------------
HOST_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL=http://127.0.0.1:$HOST_PORT
"$ENGINE" run -d --name "$NAME" --read-only --cap-drop ALL --security-opt no-new-privileges \
    --tmpfs /tmp:rw,exec,nosuid,nodev,mode=1777,size=2g \
    -e REFORMER_PORT="$CONTAINER_PORT" -e REFORMER_DRAIN_TIMEOUT="$DRAIN_TIMEOUT" \
    -p "127.0.0.1:$HOST_PORT:$CONTAINER_PORT" "${run_opts[@]}" "$IMAGE" >/dev/null

declare -A checks=()
order=()
check() {  # check NAME COMMAND...: records whether COMMAND succeeded
    local name=$1
    shift
    order+=("$name")
    if "$@"; then checks[$name]=true; log "pass: $name"; else checks[$name]=false; log "FAIL: $name"; fi
}
running() { [[ $("$ENGINE" inspect --format '{{.State.Running}}' "$NAME" 2>/dev/null) == true ]]; }

wait_ready() {
    local deadline=$((SECONDS + READY_TIMEOUT))
    while ((SECONDS < deadline)) && running; do
        [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 3 "$URL/ready") == 200 ]] && return 0
        sleep 2
    done
    return 1
}
started=$(now)
check ready wait_ready
READY_SECONDS=$(seconds_since "$started")

post() {  # post PATH JSON: the response body on stdout
    curl -sS -N --max-time "${MAX_TIME:-120}" -H 'Content-Type: application/json' -d "$2" "$URL$1"
}

# The SSE stream: `data:` events with choices, no error, `data: [DONE]` last.
stream_ok() {
    python3 - "$1" <<'EOF'
import json, sys
events = [line[6:] for line in open(sys.argv[1]).read().splitlines() if line.startswith("data: ")]
chunks = [json.loads(e) for e in events[:-1]]
sys.exit(not (events and events[-1] == "[DONE]" and chunks and all("error" not in c for c in chunks)
              and any(c.get("choices") for c in chunks)))
EOF
}

healthcheck() {  # the image's HEALTHCHECK command, run as the engine would run it
    local command
    mapfile -t command < <(python3 -c '
import json, sys
test = json.loads(sys.argv[1])["Test"]
print("\n".join(test[1:] if test[0] == "CMD" else ["sh", "-c", test[1]]))' "$HEALTHCHECK_JSON")
    "$ENGINE" exec "$NAME" "${command[@]}"
}

stream_completion() {
    local started
    started=$(now)
    post /v1/completions '{"prompt": "def fibonacci(n):", "max_tokens": 32, "temperature": 0, "ignore_eos": true,
                           "stream": true}' >"$WORK/stream.sse" || return 1
    STREAM_SECONDS=$(seconds_since "$started")
    stream_ok "$WORK/stream.sse"
}

embedding() {
    post /v1/embeddings '{"input": ["a long document", "another"]}' >"$WORK/embedding.json" || return 1
    python3 - "$WORK/embedding.json" <<'EOF'
import json, sys
data = json.load(open(sys.argv[1]))["data"]
sys.exit(not (len(data) == 2 and all(len(d["embedding"]) > 0 and all(isinstance(x, float) for x in d["embedding"])
                                     for d in data)))
EOF
}

uid_10001() { [[ $("$ENGINE" exec "$NAME" id -u) == 10001 ]]; }
read_only_root() { ! "$ENGINE" exec "$NAME" touch /app/.write-probe 2>/dev/null; }
no_capabilities() { [[ $("$ENGINE" exec "$NAME" sed -n 's/^CapBnd:\s*//p' /proc/1/status) =~ ^0+$ ]]; }

VERSIONS=$("$ENGINE" exec "$NAME" python -c \
    'import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda)' 2>/dev/null ||
    echo "? ? ?")
read -r PYTHON TORCH TORCH_CUDA <<<"$VERSIONS"
torch_matches_variant() {
    if [[ $VARIANT == cpu ]]; then [[ $TORCH_CUDA == None ]]; else [[ $TORCH_CUDA != None && $TORCH_CUDA != "?" ]]; fi
}

STREAM_SECONDS=None
check healthcheck_follows_reformer_port healthcheck
check stream_completion stream_completion
check embedding embedding
check uid_10001 uid_10001
check read_only_root read_only_root
check no_capabilities no_capabilities
check torch_matches_variant torch_matches_variant

# ---- SIGTERM drain ------------------------------------------------------------------------------------
# A request long enough to be in flight when TERM comes (a quarter of the drain at the rate just measured),
# short enough to finish inside it: its stream must end normally, then the container exit 0.
DRAIN_TOKENS=$(awk -v s="$STREAM_SECONDS" -v d="$DRAIN_TIMEOUT" \
    'BEGIN { t = (s == "None" || s <= 0) ? 32 : 32 / s * d / 4; if (t < 8) t = 8; if (t > 4000) t = 4000;
             printf "%d", t }')
DRAIN_SECONDS=None
DRAIN_STREAM_SECONDS=None
DRAIN_FINISH=none
EXIT_CODE=none
drain() {
    MAX_TIME=$((DRAIN_TIMEOUT + 60)) post /v1/completions "{\"prompt\": \"import os\", \"max_tokens\": $DRAIN_TOKENS,
        \"temperature\": 0, \"ignore_eos\": true, \"stream\": true}" >"$WORK/drain.sse" &
    local client=$! deadline=$((SECONDS + 60)) started status
    until grep -q '^data: {' "$WORK/drain.sse" 2>/dev/null; do
        ((SECONDS < deadline)) || { kill "$client"; return 1; }
        sleep 0.2
    done
    started=$(now)
    "$ENGINE" kill --signal TERM "$NAME" >/dev/null
    sleep 0.5
    DRAINING_READY=$(curl -s -o /dev/null -w '%{http_code}' --max-time 3 "$URL/ready" || true)
    status=0
    wait "$client" || status=$?
    DRAIN_STREAM_SECONDS=$(seconds_since "$started")
    DRAIN_FINISH=$(python3 -c '
import json, sys
reasons = [c["finish_reason"] for line in open(sys.argv[1]) if line.startswith("data: {")
           for c in json.loads(line[6:]).get("choices", []) if c.get("finish_reason")]
print(reasons[-1] if reasons else "none")' "$WORK/drain.sse" 2>/dev/null || echo none)
    EXIT_CODE=$(timeout $((DRAIN_TIMEOUT + 15)) "$ENGINE" wait "$NAME" || echo timeout)
    DRAIN_SECONDS=$(seconds_since "$started")
    log "drain: $DRAIN_TOKENS tokens, the stream ended ${DRAIN_STREAM_SECONDS} s after TERM" \
        "(finish_reason $DRAIN_FINISH, client exit $status), the container exited $EXIT_CODE after ${DRAIN_SECONDS} s"
    ((status == 0)) && stream_ok "$WORK/drain.sse" && [[ $EXIT_CODE == 0 ]] &&
        awk -v s="$DRAIN_SECONDS" -v limit=$((DRAIN_TIMEOUT + 10)) 'BEGIN { exit !(s <= limit) }'
}
DRAINING_READY=none
check sigterm_drain drain
draining_ready_503() { [[ $DRAINING_READY == 503 ]]; }
check ready_503_while_draining draining_ready_503

failed=0
for name in "${order[@]}"; do [[ ${checks[$name]} == true ]] || failed=1; done
if ((failed)); then
    log "the container's last log lines:"
    "$ENGINE" logs --tail 40 "$NAME" >&2 2>&1 || true
fi

# ---- result -------------------------------------------------------------------------------------------
checks_json=$(for name in "${order[@]}"; do printf '%s=%s\n' "$name" "${checks[$name]}"; done)
json=$(python3 - "$checks_json" <<EOF
import datetime, json, sys
checks = dict(line.split("=") for line in sys.argv[1].splitlines())
size = int("$SIZE_BYTES")
print(json.dumps({
    "benchmark": "image",
    "variant": "$VARIANT",
    "image": "$IMAGE",
    "engine": "$ENGINE",
    "engine_version": "$ENGINE_VERSION",
    "base": "$BASE_USED",
    "torch_index": "$TORCH_INDEX" or None,
    "python": "$PYTHON",
    "torch": "$TORCH",
    "size_bytes": size,
    "size_mb": round(size / 1e6, 1),
    "build_seconds": $BUILD_SECONDS,
    "ready_seconds": $READY_SECONDS,
    "stream_seconds_32_tokens": $STREAM_SECONDS,
    "drain_timeout_seconds": $DRAIN_TIMEOUT,
    "drain_request_tokens": $DRAIN_TOKENS,
    "drain_stream_seconds": $DRAIN_STREAM_SECONDS,
    "drain_stream_finish_reason": "$DRAIN_FINISH",
    "drain_seconds": $DRAIN_SECONDS,
    "exit_code_after_sigterm": "$EXIT_CODE",
    "run": "read-only root, --cap-drop ALL, no-new-privileges, tmpfs /tmp, REFORMER_PORT=$CONTAINER_PORT",
    "checks": {name: value == "true" for name, value in checks.items()},
    "passed": all(value == "true" for value in checks.values()),
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
}, indent=2))
EOF
)
if [[ -n $RESULT ]]; then
    mkdir -p "$(dirname "$RESULT")"
    printf '%s\n' "$json" >"$RESULT"
    log "result: $RESULT"
else
    printf '%s\n' "$json"
fi
exit "$failed"
