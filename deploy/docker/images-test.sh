#!/usr/bin/env bash
# make images-test: build the three images and run a federation in containers, the way the manifests do.
#
# 1. A Docker engine: the running one, else dockerd started here (Debian's docker.io, installed when missing
#    and this runs as root); none: one line that says so, and exit 1.
# 2. The base image: python:3.11.14-slim-bookworm if a registry serves it, else one made without a registry:
#    debootstrap --variant=minbase bookworm + Python 3.11, imported as fedprompt-base:bookworm-py311.
# 3. The three targets, with the host's pip settings passed as build arguments (a local wheel folder is
#    served over HTTP on loopback; the build uses the host network for it).
# 4. A smoke federation on a private network: certificates made from the coordinator image into a named
#    volume, the aggregation server, the SuperLink, three holders (a secure round needs three), one secure
#    round from the federation job; every container read-only, UID 10001, no capabilities, no new privileges;
#    the health checks pass; the holders are recreated on their named volumes and their ledgers still hold
#    the round's spend. Everything it started is removed at the end, whatever happens.
set -euo pipefail
cd "$(dirname "$0")/../.."
TAG="${IMAGE_TAG:-images-test}"
P="fedprompt-it"                       # prefix of every container, volume and network made here
WORK="$(mktemp -d /tmp/fedprompt-images-test.XXXXXX)"
LOGS="${IMAGES_TEST_LOGS:-$WORK}"  # where the build and container logs go (kept when given)
mkdir -p "$LOGS"
DOCKERD_PID="" INDEX_PID=""
t0=$(date +%s)
say() { echo "images-test [$(( $(date +%s) - t0 )) s]: $*"; }
die() { echo "images-test: $*" >&2; exit 1; }

cleanup() {
    set +e
    docker ps -aq --filter "name=^${P}-" | xargs -r docker rm -f >/dev/null 2>&1
    docker volume ls -q --filter "name=^${P}-" | xargs -r docker volume rm >/dev/null 2>&1
    docker network rm "${P}-net" >/dev/null 2>&1
    [ -n "$INDEX_PID" ] && kill "$INDEX_PID" 2>/dev/null
    [ -n "$DOCKERD_PID" ] && kill "$DOCKERD_PID" 2>/dev/null && wait "$DOCKERD_PID" 2>/dev/null
    rm -f deploy/docker/extra-ca.d/images-test-host.pem
    rm -rf "$WORK"
}
trap cleanup EXIT

# ------------------------------------------------------------------ 1. the engine
if ! docker info >/dev/null 2>&1; then
    if ! command -v dockerd >/dev/null; then
        [ "$(id -u)" -eq 0 ] || die "no Docker engine runs and dockerd is not installed (apt-get install docker.io)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends docker.io >"$WORK/apt.log" 2>&1 \
            || die "no Docker engine, and docker.io could not be installed: $(tail -1 "$WORK/apt.log")"
    fi
    dockerd >"$WORK/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || die "a Docker engine could not be started here: $(tail -1 "$WORK/dockerd.log")"
    say "started dockerd"
fi

# ------------------------------------------------------------------ 2. the base image
BASE="python:3.11.14-slim-bookworm"
if ! docker image inspect "$BASE" >/dev/null 2>&1 && ! timeout 60 docker pull -q "$BASE" >/dev/null 2>&1; then
    BASE="fedprompt-base:bookworm-py311"
    if ! docker image inspect "$BASE" >/dev/null 2>&1; then
        command -v debootstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y debootstrap >/dev/null
        say "no registry: making $BASE with debootstrap"
        # the recipe known to work (python3.11-venv alone misses dependencies debootstrap does not resolve)
        debootstrap --variant=minbase --include=python3.11,python3.11-venv,python3-pip,python-is-python3,ca-certificates \
            bookworm "$WORK/rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$WORK/debootstrap.log" 2>&1 \
            || die "debootstrap failed: $(tail -1 "$WORK/debootstrap.log")"
        # what a running container never reads: the downloaded packages, apt's lists, documentation
        rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/* \
            "$WORK"/rootfs/usr/share/doc/* "$WORK"/rootfs/usr/share/man/* "$WORK"/rootfs/usr/share/info/*
        tar -C "$WORK/rootfs" -c . | docker import \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' - "$BASE" >/dev/null
        rm -rf "$WORK/rootfs"
    fi
fi
say "base image $BASE"

# ------------------------------------------------------------------ 3. the builds
# The host's pip settings (a mirror, a local wheel folder, its CA bundle) become build arguments.
pipconf() { python3 -m pip config get "global.$1" 2>/dev/null || true; }
build_args=(--build-arg "BASE_IMAGE=$BASE" --build-arg "OCI_SOURCE=images-test")
index="${PIP_INDEX_URL:-$(pipconf index-url)}"
[ -n "$index" ] && build_args+=(--build-arg "PIP_INDEX_URL=$index")
links="${PIP_FIND_LINKS:-$(pipconf find-links)}"
if [ -n "$links" ] && [ -d "$links" ]; then  # a local folder: served on loopback for the build
    port=$(python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
    python3 -m http.server --bind 127.0.0.1 --directory "$links" "$port" >"$WORK/index.log" 2>&1 &
    INDEX_PID=$!
    links="http://127.0.0.1:$port/"
    build_args+=(--build-arg "PIP_TRUSTED_HOST=127.0.0.1")
fi
[ -n "$links" ] && build_args+=(--build-arg "PIP_FIND_LINKS=$links")
ca="${PIP_CERT:-$(pipconf cert)}"
CA_COPY=deploy/docker/extra-ca.d/images-test-host.pem  # a bundle is too long for a build argument
[ -n "$ca" ] && [ -f "$ca" ] && cp "$ca" "$CA_COPY"
# torch from the same indexes when a local wheel folder may hold the CPU build (the check in the Dockerfile
# refuses a CUDA one); else PyTorch's CPU index, the Dockerfile's default
[ -n "$INDEX_PID" ] && build_args+=(--build-arg "TORCH_INDEX_URL=")
for target in aggregator coordinator client; do
    start=$(date +%s)
    DOCKER_BUILDKIT=0 docker build -q --network host -f deploy/docker/Dockerfile --target "$target" \
        "${build_args[@]}" -t "fedprompt-$target:$TAG" . >"$LOGS/build-$target.log" 2>&1 \
        || { tail -30 "$LOGS/build-$target.log"; die "the $target image did not build"; }
    size=$(docker image inspect -f '{{.Size}}' "fedprompt-$target:$TAG")
    say "built fedprompt-$target:$TAG in $(( $(date +%s) - start )) s, $(( size / 1000000 )) MB"
    [ "$target" != aggregator ] || [ "$size" -lt 400000000 ] || die "the aggregator image is $size bytes (target < 400 MB)"
done

# ------------------------------------------------------------------ 4. a federation in containers
HARDENED=(--read-only --tmpfs /tmp:rw,size=512m --user 10001:10001 --cap-drop ALL --security-opt no-new-privileges)
docker network create "${P}-net" >/dev/null
run() {  # run NAME IMAGE ARGS...: a hardened container on the test network, named as the manifests' services
    local name=$1 image=$2; shift 2
    docker run -d --name "$name" --hostname "${name#"${P}-"}" --network "${P}-net" --network-alias "${name#"${P}-"}" \
        "${HARDENED[@]}" "$image" "$@" >/dev/null
}
healthy() {  # healthy NAME...: wait until Docker reports each one healthy
    for name in "$@"; do
        for _ in $(seq 90); do
            [ "$(docker inspect -f '{{.State.Health.Status}}' "$name" 2>/dev/null)" = healthy ] && continue 2
            [ "$(docker inspect -f '{{.State.Running}}' "$name")" = true ] || { docker logs --tail 20 "$name"; die "$name exited"; }
            sleep 2
        done
        docker logs --tail 20 "$name"; die "$name did not become healthy"
    done
}
holders=(holder-1 holder-2 holder-3)
# the certificates, made from the coordinator image into a named volume (its root is the image's writable
# /var/lib/fedprompt, owned by UID 10001), mounted read-only everywhere else
docker run --rm "${HARDENED[@]}" -v "${P}-certs:/var/lib/fedprompt" "fedprompt-coordinator:$TAG" certs \
    --out /var/lib/fedprompt/certs --host fedprompt-superlink --host fedprompt-aggregator \
    $(printf -- '--node %s ' "${holders[@]}") >/dev/null
CERTS=(-v "${P}-certs:/etc/fedprompt:ro")
# the aggregation server: its image's defaults bind 0.0.0.0 and serve health on 9095
docker run -d --name "${P}-aggregator" --network "${P}-net" --network-alias fedprompt-aggregator "${HARDENED[@]}" \
    "${CERTS[@]}" -v "${P}-registry:/var/lib/fedprompt" "fedprompt-aggregator:$TAG" \
    --certs /etc/fedprompt/certs --store /var/lib/fedprompt/registry.sqlite >/dev/null
# the SuperLink behind its front, with the operator listener the federation job submits through
docker run -d --name "${P}-superlink" --network "${P}-net" --network-alias fedprompt-superlink "${HARDENED[@]}" \
    "${CERTS[@]}" -v "${P}-superlink:/var/lib/fedprompt" \
    --health-cmd "python -m fedprompt.health grpc 127.0.0.1:9096" --health-interval 5s --health-retries 30 \
    "fedprompt-coordinator:$TAG" superlink --certs /etc/fedprompt/certs --state /var/lib/fedprompt \
    --port 9093 --operator-listen 0.0.0.0:9092 >/dev/null
healthy "${P}-aggregator" "${P}-superlink"
say "aggregation server and SuperLink healthy"
start_holder() {
    local h=$1
    docker run -d --name "${P}-$h" --network "${P}-net" "${HARDENED[@]}" -v "${P}-certs:/etc/fedprompt:ro" \
        -v "${P}-$h:/var/lib/fedprompt" "fedprompt-client:$TAG" --superlink fedprompt-superlink:9093 \
        --aggregator fedprompt-aggregator:9094 --certs /etc/fedprompt/certs --name "$h" --dataset rotten-tomatoes \
        --state /var/lib/fedprompt --budget-epsilon 10 --allow-model smollm2-135m >/dev/null
}
for h in "${holders[@]}"; do start_holder "$h"; done
healthy $(printf "${P}-%s " "${holders[@]}")
say "three holders healthy"
start=$(date +%s)
docker run --name "${P}-federation" --network "${P}-net" "${HARDENED[@]}" "${CERTS[@]}" \
    -v "${P}-checkpoints:/var/lib/fedprompt" "fedprompt-coordinator:$TAG" server \
    --superlink fedprompt-superlink:9092 --aggregator fedprompt-aggregator:9094 --certs /etc/fedprompt/certs \
    --state /tmp/federation --checkpoint-dir /var/lib/fedprompt/checkpoints --task rotten-tomatoes \
    --model smollm2-135m --num-rounds 1 --local-steps 1 --batch-size 8 --prompt-length 1 --target-epsilon 8 \
    --min-available-nodes 3 --min-train-nodes 3 --secure-aggregation --round-timeout-s 900 \
    >"$LOGS/federation.log" 2>&1 || { tail -40 "$LOGS/federation.log"; die "the federation job failed"; }
# the job follows a SuperLink elsewhere through the prompt registry: each merged round is a version there
grep -q "^round 1/1: version" "$LOGS/federation.log" && grep -q "^federation complete" "$LOGS/federation.log" \
    || { cat "$LOGS/federation.log"; die "no merged round"; }
say "a secure round of 3 holders in $(( $(date +%s) - start )) s"

# the holders recreated on the same volumes: the ledgers still hold the round
spent() {
    docker run --rm "${HARDENED[@]}" -v "${P}-$1:/var/lib/fedprompt" --entrypoint fedprompt "fedprompt-client:$TAG" \
        budget show --state /var/lib/fedprompt | sed -n 's/^total: epsilon = \([0-9.]*\).*/\1/p'
}
for h in "${holders[@]}"; do
    before=$(spent "$h")
    docker rm -f "${P}-$h" >/dev/null
    start_holder "$h"
    healthy "${P}-$h"
    after=$(spent "$h")
    [ -n "$before" ] && [ "$before" = "$after" ] && python3 -c "import sys; sys.exit(float('$after') <= 0)" \
        || die "$h: the ledger's spend was '$before' before its container was recreated, '$after' after"
done
say "holders recreated: their ledgers kept the spend ($(spent holder-1) for holder-1)"
say "passed"
