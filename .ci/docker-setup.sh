#!/usr/bin/env bash
# Make the docker executor usable on a fresh Debian CI machine (run as root, after .venv exists):
# install Docker, debootstrap and bubblewrap if missing, start dockerd if it does not answer,
# and build the sandbox image (offline via debootstrap when no registry answers).
# Idempotent: a second run finds everything in place and returns in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."

DOCKERD_LOG=${DOCKERD_LOG:-/var/log/tirforge-dockerd.log}
DOCKERD_WAIT=${DOCKERD_WAIT:-60}

missing=()
command -v dockerd >/dev/null || missing+=(docker.io)  # also docker, docker-init (--init)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v bwrap >/dev/null || missing+=(bubblewrap)
if ((${#missing[@]})); then
    echo ">> installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Refresh the package lists only if installing without them fails (fresh images ship none).
    if ! apt-get install -y --no-install-recommends "${missing[@]}"; then
        apt-get update
        apt-get install -y --no-install-recommends "${missing[@]}"
    fi
fi

if ! docker info >/dev/null 2>&1; then
    echo ">> starting dockerd (log: $DOCKERD_LOG)"
    # setsid: dockerd must outlive this script and not get the CI step's signals.
    setsid dockerd >"$DOCKERD_LOG" 2>&1 </dev/null &
    dockerd_pid=$!
    for ((i = 0; i < DOCKERD_WAIT; i++)); do
        docker info >/dev/null 2>&1 && break
        kill -0 "$dockerd_pid" 2>/dev/null || break  # it exited: no point waiting
        sleep 1
    done
    if ! docker info >/dev/null 2>&1; then
        echo "error: dockerd is not answering (waited up to ${DOCKERD_WAIT}s); its log ends:" >&2
        tail -n 30 "$DOCKERD_LOG" >&2
        exit 1
    fi
fi
echo ">> docker $(docker version --format '{{.Server.Version}}') is running"

# The CLI's `sandbox build` once it is mounted; the library call otherwise.
if .venv/bin/tirforge sandbox --help >/dev/null 2>&1; then
    .venv/bin/tirforge sandbox build
else
    .venv/bin/python -c 'from tirforge.executors.sandbox_image import build_image; build_image()'
fi
