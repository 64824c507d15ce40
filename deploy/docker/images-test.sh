#!/usr/bin/env bash
# make images-test: build the three images and run a federation in containers, by the compose files.
#
# 1. A Docker engine: the running one, else dockerd started here (Debian's docker.io, installed when missing
#    and this runs as root); none: one line that says so, and exit 1.
# 2. The base image: python:3.11.14-slim-bookworm if a registry serves it, else one made without a registry:
#    debootstrap --variant=minbase bookworm + Python 3.11, imported as fedprompt-base:bookworm-py311.
# 3. The three targets, by deploy/docker/build.sh: the host's pip settings passed as build arguments (a local
#    wheel folder served over HTTP on loopback; the build uses the host network for it).
# 4. A smoke federation from deploy/compose: the certificates and each party's bundle made from the coordinator
#    image; the coordinator side (aggregation server, SuperLink) as one compose project publishing its ports on
#    the Docker bridge's gateway; three holders (a secure round needs three), each its own project on its own
#    split, its policy written into its state volume first; one secure round from the federation service.
#    Every container read-only, UID 10001, no capabilities, no new privileges (checked); the health checks
#    pass; the holders are recreated on their named volumes and their ledgers still hold the round's spend.
#    Everything it started is removed at the end, whatever happens.
set -euo pipefail
cd "$(dirname "$0")/../.."
TAG="${IMAGE_TAG:-images-test}"
P="fedprompt-it"                       # prefix of every compose project, container, volume and network made here
WORK="$(mktemp -d /tmp/fedprompt-images-test.XXXXXX)"
LOGS="${IMAGES_TEST_LOGS:-$WORK}"  # where the build and container logs go (kept when given)
mkdir -p "$LOGS"
DOCKERD_PID=""
t0=$(date +%s)
say() { echo "images-test [$(( $(date +%s) - t0 )) s]: $*"; }
die() { echo "images-test: $*" >&2; exit 1; }
APT_UPDATED=""
apt_install() {  # apt_install PACKAGE...: from Debian's packages, as root; apt's lists fetched once when missing
    [ "$(id -u)" -eq 0 ] || die "$* not installed, and installing it needs root (apt-get install $*)"
    if [ -z "$APT_UPDATED" ]; then
        apt-get update >"$WORK/apt.log" 2>&1 || die "apt-get update failed: $(tail -1 "$WORK/apt.log")"
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >>"$WORK/apt.log" 2>&1 \
        || die "$* could not be installed: $(tail -1 "$WORK/apt.log")"
}

cleanup() {
    set +e
    # every compose project here is named $P or $P-NAME, and compose prefixes what it makes with the project
    docker ps -aq --filter "name=^${P}" | xargs -r docker rm -f >/dev/null 2>&1
    docker volume ls -q --filter "name=^${P}" | xargs -r docker volume rm >/dev/null 2>&1
    docker network ls -q --filter "name=^${P}" | xargs -r docker network rm >/dev/null 2>&1
    [ -n "$DOCKERD_PID" ] && kill "$DOCKERD_PID" 2>/dev/null && wait "$DOCKERD_PID" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

# ------------------------------------------------------------------ 1. the engine
if ! docker info >/dev/null 2>&1; then
    command -v dockerd >/dev/null || apt_install docker.io
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
        command -v debootstrap >/dev/null || apt_install debootstrap
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
# with the host's pip settings as build arguments (deploy/docker/build.sh, which make images runs too)
BASE_IMAGE="$BASE" OCI_SOURCE=images-test BUILD_LOGS="$LOGS" bash deploy/docker/build.sh "$TAG" \
    | while read -r line; do say "$line"; done
size=$(docker image inspect -f '{{.Size}}' "fedprompt-aggregator:$TAG")
[ "$size" -lt 400000000 ] || die "the aggregator image is $size bytes (target < 400 MB)"

# ------------------------------------------------------------------ 4. a federation in containers
# deploy/compose/coordinator.yml and holder.yml as an operator and three holders would run them (a secure round
# needs three), on docker-compose (Debian's) or `docker compose`
if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
else
    command -v docker-compose >/dev/null || apt_install docker-compose
    COMPOSE=(docker-compose)
fi
export FEDPROMPT_TAG="$TAG"
HARDENED=(--read-only --tmpfs "/tmp:rw,size=512m" --user 10001:10001 --cap-drop ALL --security-opt no-new-privileges)
holders=(holder-1 holder-2 holder-3)
node_args=()
for h in "${holders[@]}"; do node_args+=(--node "$h"); done
# what the operator makes from the coordinator image, as UID 10001 (so the containers can read the keys):
# the CA and every party's bundle; and each holder's data, a label-skewed split of rotten-tomatoes
PKI="$WORK/pki" DATA="$WORK/data"
install -d -o 10001 -g 10001 -m 0700 "$PKI" "$DATA"
docker run --rm "${HARDENED[@]}" -v "$PKI:/pki" "fedprompt-coordinator:$TAG" certs --out /pki/ca \
    --bundles /pki/bundles --host fedprompt-superlink --host fedprompt-aggregator \
    "${node_args[@]}" >/dev/null
docker run --rm "${HARDENED[@]}" -v "$DATA:/data" "fedprompt-coordinator:$TAG" datasets split \
    --dataset rotten-tomatoes --holders 3 --alpha 2 --seed 0 --out /data/split >/dev/null
# the coordinator side publishes its two ports on the Docker bridge's gateway only, at free host ports; the
# holders reach them there by the names in the server certificate (as a holder elsewhere reaches a public name)
free_port() { python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
export FEDPROMPT_CERTS="$PKI/bundles/coordinator"
export FEDPROMPT_PUBLISH_ADDRESS
FEDPROMPT_PUBLISH_ADDRESS=$(docker network inspect bridge -f '{{(index .IPAM.Config 0).Gateway}}')
export FEDPROMPT_FLEET_PORT FEDPROMPT_AGGREGATOR_PORT
FEDPROMPT_FLEET_PORT=$(free_port) FEDPROMPT_AGGREGATOR_PORT=$(free_port)
coordinator() { "${COMPOSE[@]}" --ansi never -f deploy/compose/coordinator.yml -p "$P" "$@"; }
cat >"$WORK/holder-here.yml" <<YAML
services:
  holder:
    extra_hosts: ["fedprompt-superlink:host-gateway", "fedprompt-aggregator:host-gateway"]
YAML
holder() {  # holder NAME COMPOSE-ARGS...: that holder's own compose project
    local h=$1; shift
    FEDPROMPT_NAME="$h" FEDPROMPT_NODE_DIR="$PKI/bundles/nodes/$h" FEDPROMPT_DATA_DIR="$DATA" \
        FEDPROMPT_DATA_FILE="split/$h.jsonl" FEDPROMPT_THREADS=1 \
        FEDPROMPT_SUPERLINK="fedprompt-superlink:$FEDPROMPT_FLEET_PORT" \
        FEDPROMPT_AGGREGATOR="fedprompt-aggregator:$FEDPROMPT_AGGREGATOR_PORT" \
        "${COMPOSE[@]}" --ansi never -f deploy/compose/holder.yml -f "$WORK/holder-here.yml" -p "$P-$h" "$@"
}
healthy() {  # healthy CONTAINER...: wait until Docker reports each one healthy
    for c in "$@"; do
        for _ in $(seq 90); do
            [ "$(docker inspect -f '{{.State.Health.Status}}' "$c" 2>/dev/null)" = healthy ] && continue 2
            [ "$(docker inspect -f '{{.State.Running}}' "$c")" = true ] || { docker logs --tail 20 "$c"; die "$c exited"; }
            sleep 2
        done
        docker logs --tail 20 "$c"; die "$c did not become healthy"
    done
}
hardened() {  # hardened CONTAINER: read-only, UID 10001, no capabilities, no new privileges
    local got
    got=$(docker inspect -f '{{.HostConfig.ReadonlyRootfs}} {{.Config.User}} {{.HostConfig.CapDrop}} {{.HostConfig.SecurityOpt}}' "$1")
    [ "$got" = "true 10001:10001 [ALL] [no-new-privileges:true]" ] ||
        die "$(docker inspect -f "{{.Name}}" "$1") is not hardened (read-only, user, dropped capabilities, options): $got"
}
coordinator up -d >"$LOGS/compose-coordinator.log" 2>&1 || { cat "$LOGS/compose-coordinator.log"; die "the coordinator side did not start"; }
for service in aggregator superlink; do
    c=$(coordinator ps -q "$service"); hardened "$c"; healthy "$c"
done
say "coordinator side up (compose): aggregation server and SuperLink healthy"
# each holder's own policy, written into its state volume before its daemon first starts
printf 'require_secure_aggregation = true\nmax_run_epsilon = 9.0\n' >"$WORK/policy.toml"
for h in "${holders[@]}"; do
    holder "$h" run --rm -T --entrypoint sh holder -c 'cat > /var/lib/fedprompt/policy.toml' <"$WORK/policy.toml" \
        >>"$LOGS/compose-$h.log" 2>&1 || die "$h: could not write its policy into its state volume"
    holder "$h" up -d >>"$LOGS/compose-$h.log" 2>&1 || { cat "$LOGS/compose-$h.log"; die "$h did not start"; }
done
for h in "${holders[@]}"; do c=$(holder "$h" ps -q holder); hardened "$c"; healthy "$c"; done
for h in "${holders[@]}"; do
    log=$(docker logs "$(holder "$h" ps -q holder)" 2>&1)  # a here-string: `docker logs | grep -q` trips pipefail
    grep -q "policy: .*epsilon per run <= 9; .*secure aggregation required" <<<"$log" \
        || { echo "$log" | tail -20; die "$h does not run on the policy in its volume"; }
done
say "three holders healthy, each on the policy in its own volume"
start=$(date +%s)
RUN_NUM_ROUNDS=1 RUN_LOCAL_STEPS=1 RUN_BATCH_SIZE=8 RUN_MIN_AVAILABLE_NODES=3 RUN_MIN_TRAIN_NODES=3 \
    coordinator run --rm -T federation >"$LOGS/federation.log" 2>&1 \
    || { tail -40 "$LOGS/federation.log"; die "the federation job failed"; }
# the job follows a SuperLink elsewhere through the prompt registry: each merged round is a version there
if ! grep -q "^round 1/1: version" "$LOGS/federation.log" || ! grep -q "^federation complete" "$LOGS/federation.log"; then
    cat "$LOGS/federation.log"; die "no merged round"
fi
say "a secure round of 3 holders in $(( $(date +%s) - start )) s"

# the holders recreated on the same volumes: the ledgers still hold the round
spent() {  # what the running holder container's ledger (on its volume) says it has spent
    holder "$1" exec -T holder fedprompt budget show --state /var/lib/fedprompt 2>>"$LOGS/compose-$1.log" \
        | sed -n 's/^total: epsilon = \([0-9.]*\).*/\1/p'
}
declare -A before old
for h in "${holders[@]}"; do before[$h]=$(spent "$h"); old[$h]=$(holder "$h" ps -q holder); done
for h in "${holders[@]}"; do
    holder "$h" up -d --force-recreate >>"$LOGS/compose-$h.log" 2>&1 || die "$h could not be recreated"
done
for h in "${holders[@]}"; do
    new=$(holder "$h" ps -q holder)
    [ "$new" != "${old[$h]}" ] || die "$h: compose kept the old container"
    healthy "$new"
    after=$(spent "$h")
    if [ -z "${before[$h]}" ] || [ "${before[$h]}" != "$after" ] || ! python3 -c "import sys; sys.exit(float('$after') <= 0)"; then
        die "$h: the ledger's spend was '${before[$h]}' before its container was recreated, '$after' after"
    fi
done
say "holders recreated: their ledgers kept the spend ($(spent holder-1) for holder-1)"
# the backups deploy/README.md shows, through compose
holder holder-1 exec -T holder fedprompt budget backup /var/lib/fedprompt/backup/ledger.sqlite3 \
    --state /var/lib/fedprompt >>"$LOGS/compose-holder-1.log" 2>&1 || die "the ledger backup failed"
docker cp "$(holder holder-1 ps -q holder):/var/lib/fedprompt/backup/ledger.sqlite3" "$WORK/ledger.sqlite3"
coordinator exec -T aggregator fedprompt registry backup /var/lib/fedprompt/backup/registry.sqlite \
    --store /var/lib/fedprompt/registry.sqlite >>"$LOGS/compose-coordinator.log" 2>&1 || die "the registry backup failed"
docker cp "$(coordinator ps -q aggregator):/var/lib/fedprompt/backup/registry.sqlite" "$WORK/registry.sqlite"
[ -s "$WORK/ledger.sqlite3" ] && [ -s "$WORK/registry.sqlite" ] || die "a backup came out empty"
say "ledger and registry backed up through compose"
say "passed"
