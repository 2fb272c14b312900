#!/usr/bin/env bash
# Build dlserve's image from a Bento with `bentoml containerize`, with no registry reached
# from inside the build: the base image is made here with debootstrap (unless BASE_IMAGE
# names one), the Bento's locked packages are downloaded as wheels on this host, and the
# build installs them from a folder served on 127.0.0.1 (pip --no-index).
#
#   deploy/docker/build-image.sh [cpu|gpu] [IMAGE_TAG] [BENTO_TAG]
#
# Defaults: cpu, dlserve:<variant>, dlserve:latest. With a registry at hand, plain
# `bentoml containerize dlserve:latest` builds the same image from python:3.11-slim-bookworm
# and PyPI (docs/deployment.md).
#
# Environment: BASE_IMAGE (default dlserve-base:bookworm, made here when missing),
# WHEELHOUSE (default ~/.cache/dlserve/wheels), DEBIAN_MIRROR, PYTHON (the Python with
# bentoml: default .venv/bin/python). Needs a Docker engine; making the base image needs
# root and debootstrap.
set -euo pipefail

VARIANT=${1:-cpu}
IMAGE_TAG=${2:-dlserve:$VARIANT}
BENTO_TAG=${3:-dlserve:latest}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
BENTOML=$(dirname "$PYTHON")/bentoml
BASE_IMAGE=${BASE_IMAGE:-dlserve-base:bookworm}
WHEELHOUSE=${WHEELHOUSE:-$HOME/.cache/dlserve/wheels}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# BentoML drives the docker client; the classic builder needs no buildx plugin.
export DOCKER_BUILDKIT=0

log() { echo "build-image: $*" >&2; }

case $VARIANT in cpu|gpu) ;; *) log "variant must be cpu or gpu, not $VARIANT"; exit 2;; esac

# 1. The base image: Debian bookworm, whose Python is 3.11, with venv, CA certificates and
#    jemalloc (the server's allocator: dlserve/allocator.py).
if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    [ "$BASE_IMAGE" = dlserve-base:bookworm ] || { log "base image $BASE_IMAGE not found"; exit 1; }
    command -v debootstrap >/dev/null || { log "debootstrap is needed to make $BASE_IMAGE"; exit 1; }
    rootfs=$(mktemp -d /var/tmp/dlserve-rootfs.XXXXXX)
    trap 'rm -rf "$rootfs"' EXIT
    log "making $BASE_IMAGE with debootstrap (about 2 minutes)"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,libjemalloc2 \
        bookworm "$rootfs" "$DEBIAN_MIRROR" >&2
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
        "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/*
    tar -C "$rootfs" -c . | docker import -c 'ENV LANG=C.UTF-8' -c 'CMD ["/bin/bash"]' \
        - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
    trap - EXIT
fi

# 2. The wheels: every package of the Bento's lock file (and the CUDA libraries for gpu),
#    built or downloaded on this host. A wheelhouse that has them all needs no network.
bento_dir=$("$BENTOML" get "$BENTO_TAG" -o path)
lock=$bento_dir/env/python/requirements.lock.txt
wanted=(-r "$lock")
[ "$VARIANT" = gpu ] && wanted+=(-c "$lock" -r "$bento_dir/src/service/requirements-gpu.txt")
mkdir -p "$WHEELHOUSE"
pip_wheel() { "$PYTHON" -m pip wheel --quiet --disable-pip-version-check -w "$WHEELHOUSE" "$@"; }
if ! pip_wheel --no-index --find-links "$WHEELHOUSE" "${wanted[@]}" 2>/dev/null; then
    log "downloading the Bento's packages into $WHEELHOUSE"
    pip_wheel "${wanted[@]}"
fi

# 3. The build: the wheelhouse served on a free port of 127.0.0.1, which the build reaches
#    through the host's network; pip inside installs from it and from nothing else.
#    The same port every time when it is free: the build arguments are part of Docker's
#    cache key, so a new port would reinstall every package.
port=$("$PYTHON" - <<'PY'
import socket
s = socket.socket()
try:
    s.bind(("127.0.0.1", 38517))
except OSError:
    s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
PY
)
"$PYTHON" -m http.server --bind 127.0.0.1 --directory "$WHEELHOUSE" "$port" >/dev/null 2>&1 &
server=$!
until "$PYTHON" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/')" \
        2>/dev/null; do
    kill -0 $server || { log "could not serve $WHEELHOUSE on port $port"; exit 1; }
    sleep 0.2
done
# BentoML 1.4 copies the Bento into a temporary build context and then refuses to read
# the Dockerfile template there unless that folder lies under the working directory:
# so the build runs in a folder of its own that holds its temporary files too.
work=$(mktemp -d /var/tmp/dlserve-build.XXXXXX)
trap 'kill $server; rm -rf "$work"' EXIT
log "building $IMAGE_TAG ($VARIANT) from $BENTO_TAG on $BASE_IMAGE"
cd "$work"
TMPDIR=$work "$BENTOML" containerize "$BENTO_TAG" --backend docker -t "$IMAGE_TAG" \
    --opt network=host \
    --opt build-arg=BASE_IMAGE="$BASE_IMAGE" \
    --opt build-arg=VARIANT="$VARIANT" \
    --opt build-arg=PIP_NO_INDEX=1 \
    --opt build-arg=PIP_FIND_LINKS="http://127.0.0.1:$port/"
docker image inspect "$IMAGE_TAG" >/dev/null  # containerize logs a failure but exits 0
log "built $IMAGE_TAG"
