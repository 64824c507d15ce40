#!/usr/bin/env bash
# make images (and images-test): build the role images with this host's pip settings.
#
#   deploy/docker/build.sh TAG [TARGET...]     targets: aggregator coordinator client (default: all three)
#
# What pip on this host is set to use (PIP_INDEX_URL / PIP_FIND_LINKS / PIP_CERT, else `pip config`) becomes the
# Dockerfile's build arguments: the index, a find-links folder (served over HTTP on loopback for the build,
# which then uses the host network), the CA bundle (copied into extra-ca.d/ for the build, removed after).
# BASE_IMAGE overrides the Dockerfile's base; BUILD_LOGS=DIR writes each build's output to DIR/build-TARGET.log
# instead of the terminal. Torch comes from the same indexes when a local wheel folder may hold the CPU build
# (the Dockerfile's check refuses a CUDA one), else from PyTorch's CPU index, the Dockerfile's default.
#
# The legacy builder (DOCKER_BUILDKIT=0) is used because it is what Debian's docker.io has without buildx; the
# Dockerfile uses no BuildKit feature, so `docker build` with BuildKit builds the same images.
set -euo pipefail
cd "$(dirname "$0")/../.."
TAG="${1:?usage: deploy/docker/build.sh TAG [aggregator|coordinator|client ...]}"
shift
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(aggregator coordinator client)
INDEX_PID=""
CA_COPY=deploy/docker/extra-ca.d/build-host.pem  # a bundle is too long for a build argument; git-ignored
cleanup() { [ -n "$INDEX_PID" ] && kill "$INDEX_PID" 2>/dev/null; rm -f "$CA_COPY"; }
trap cleanup EXIT
command -v docker >/dev/null || { echo "build: docker is not on PATH (Debian: apt-get install docker.io)" >&2; exit 1; }
docker info >/dev/null 2>&1 || { echo "build: no Docker engine answers (start dockerd, or run make images-test, which starts one)" >&2; exit 1; }

pipconf() { python3 -m pip config get "global.$1" 2>/dev/null || true; }
build_args=()
[ -n "${BASE_IMAGE:-}" ] && build_args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
[ -n "${OCI_SOURCE:-}" ] && build_args+=(--build-arg "OCI_SOURCE=$OCI_SOURCE")
index="${PIP_INDEX_URL:-$(pipconf index-url)}"
[ -n "$index" ] && build_args+=(--build-arg "PIP_INDEX_URL=$index")
extra="${PIP_EXTRA_INDEX_URL:-$(pipconf extra-index-url)}"
case "$extra" in file://*) extra="" ;; esac  # a folder of this host: not reachable from the build
[ -n "$extra" ] && build_args+=(--build-arg "PIP_EXTRA_INDEX_URL=$extra")
links="${PIP_FIND_LINKS:-$(pipconf find-links)}"
if [ -n "$links" ] && [ -d "$links" ]; then
    port=$(python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
    python3 -m http.server --bind 127.0.0.1 --directory "$links" "$port" >/dev/null 2>&1 &
    INDEX_PID=$!
    links="http://127.0.0.1:$port/"
    build_args+=(--build-arg "PIP_TRUSTED_HOST=127.0.0.1" --build-arg "TORCH_INDEX_URL=")
fi
[ -n "$links" ] && build_args+=(--build-arg "PIP_FIND_LINKS=$links")
ca="${PIP_CERT:-$(pipconf cert)}"
[ -n "$ca" ] && [ -f "$ca" ] && cp -p "$ca" "$CA_COPY"  # -p: the same file for the layer cache

for target in "${targets[@]}"; do
    case "$target" in aggregator|coordinator|client) ;; *) echo "build: no target '$target'" >&2; exit 2 ;; esac
    start=$(date +%s)
    cmd=(docker build --network host -f deploy/docker/Dockerfile --target "$target" "${build_args[@]}"
         -t "fedprompt-$target:$TAG" .)
    if [ -n "${BUILD_LOGS:-}" ]; then
        DOCKER_BUILDKIT=0 "${cmd[@]}" >"$BUILD_LOGS/build-$target.log" 2>&1 \
            || { tail -30 "$BUILD_LOGS/build-$target.log" >&2; echo "build: the $target image did not build" >&2; exit 1; }
    else
        DOCKER_BUILDKIT=0 "${cmd[@]}" || { echo "build: the $target image did not build" >&2; exit 1; }
    fi
    size=$(docker image inspect -f '{{.Size}}' "fedprompt-$target:$TAG")
    echo "built fedprompt-$target:$TAG in $(( $(date +%s) - start )) s, $(( size / 1000000 )) MB"
done
