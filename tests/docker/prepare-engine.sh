#!/usr/bin/env bash
# Prepare a Docker engine and a base image for pipeguard's Dockerfile on a Debian-like machine
# that reaches Debian's and PyPI's package servers but not Docker Hub.
#
#   tests/docker/prepare-engine.sh             install, start and build what is missing (idempotent)
#   tests/docker/prepare-engine.sh --rebuild   build the base image again even if it exists
#   tests/docker/prepare-engine.sh --stop      stop the dockerd this script started (nothing else)
#
# Run as root. What it does, each step skipped when already done:
#   1. apt-get installs docker.io, docker-compose and debootstrap if a command is missing.
#   2. Starts dockerd in the background if `docker info` fails (log: /var/log/pipeguard-dockerd.log,
#      pid: /run/pipeguard-dockerd.pid, so --stop ends only that process).
#   3. Builds a Debian 12 root file system with debootstrap (python3, python3-venv,
#      ca-certificates) and imports it as $PIPEGUARD_BASE_IMAGE (default pipeguard-base:bookworm).
#      CPU-only torch wheels for Python 3.11 found in $PIPEGUARD_WHEELS (default /opt/wheels) are
#      copied to /opt/wheels in the image with PIP_FIND_LINKS pointing there, so the Dockerfile's
#      `pip install torch==...` takes the ~200 MB CPU wheel instead of PyPI's CUDA build (several GB).
#   4. Prints the build arguments to use; the last line is BASE_IMAGE=<tag> for scripts.
#
# Starting dockerd sets the iptables FORWARD policy to DROP, which also drops traffic between
# network namespaces joined by a Linux bridge (tests/test_multihost.py adds its own ACCEPT rule).
set -euo pipefail

BASE_IMAGE=${PIPEGUARD_BASE_IMAGE:-pipeguard-base:bookworm}
SUITE=${PIPEGUARD_DEBIAN_SUITE:-bookworm}
MIRROR=${PIPEGUARD_DEBIAN_MIRROR:-http://deb.debian.org/debian}
WHEELS=${PIPEGUARD_WHEELS:-/opt/wheels}
PIDFILE=/run/pipeguard-dockerd.pid
LOG=/var/log/pipeguard-dockerd.log
ENGINE_WAIT_S=90

say() { printf 'prepare-engine: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

rebuild=0
case "${1:-}" in
    "") ;;
    --rebuild) rebuild=1 ;;
    --stop)
        if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
            pid=$(cat "$PIDFILE")
            say "stopping dockerd (pid $pid)"
            kill -TERM "$pid"
            for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
            if kill -0 "$pid" 2>/dev/null; then die "dockerd (pid $pid) still running after 30 s"; fi
        else
            say "no dockerd started by this script is running"
        fi
        rm -f "$PIDFILE"
        exit 0 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) die "unknown argument $1 (use --rebuild, --stop or nothing)" ;;
esac

[ "$(id -u)" = 0 ] || die "run as root (it installs packages, starts dockerd and runs debootstrap)"

# 1. Packages.
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# 2. The engine.
if ! docker info >/dev/null 2>&1; then
    say "starting dockerd (log $LOG)"
    setsid dockerd >>"$LOG" 2>&1 < /dev/null &
    echo $! > "$PIDFILE"
    for _ in $(seq $((ENGINE_WAIT_S * 2))); do
        docker info >/dev/null 2>&1 && break
        kill -0 "$(cat "$PIDFILE")" 2>/dev/null || { tail -n 30 "$LOG" >&2; die "dockerd exited"; }
        sleep 0.5
    done
    docker info >/dev/null 2>&1 || { tail -n 30 "$LOG" >&2; die "dockerd not answering after ${ENGINE_WAIT_S} s"; }
fi
say "engine: $(docker version --format 'client {{.Client.Version}}, server {{.Server.Version}}')"

# 3. The base image.
if [ "$rebuild" = 0 ] && docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    say "base image $BASE_IMAGE exists (--rebuild to build it again)"
else
    rootfs=$(mktemp -d /var/tmp/pipeguard-rootfs.XXXXXX)
    trap 'rm -rf "$rootfs"' EXIT
    say "debootstrap $SUITE from $MIRROR into $rootfs (a few minutes)"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        "$SUITE" "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1 || { tail -n 30 "$rootfs.log" >&2; die "debootstrap failed"; }
    rm -f "$rootfs.log"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    changes=(--change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
             --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]')
    shopt -s nullglob
    wheels=("$WHEELS"/torch-*+cpu-cp311-*.whl)
    shopt -u nullglob
    if [ ${#wheels[@]} -gt 0 ]; then
        mkdir -p "$rootfs/opt/wheels"
        cp "${wheels[@]}" "$rootfs/opt/wheels/"
        changes+=(--change 'ENV PIP_FIND_LINKS=/opt/wheels')
        say "local wheels in the image: $(cd "$rootfs/opt/wheels" && echo *)"
    else
        say "no CPU torch wheel for Python 3.11 in $WHEELS: the image build will download torch from PyPI"
    fi
    tar -C "$rootfs" --numeric-owner -c . | docker import "${changes[@]}" - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
    trap - EXIT
    say "imported $BASE_IMAGE"
fi
docker run --rm "$BASE_IMAGE" python3 -c 'import sys, venv; assert sys.version_info >= (3, 11), sys.version' \
    || die "$BASE_IMAGE has no usable python3 >= 3.11 with venv (try --rebuild)"

# 4. How to use it.
ca_files=(/usr/local/share/ca-certificates/*.crt)
cat >&2 <<EOF
prepare-engine: ready. Build the image with
    docker build --build-arg BASE_IMAGE=$BASE_IMAGE -t pipeguard:dev .
or for docker-compose:
    export PIPEGUARD_BASE_IMAGE=$BASE_IMAGE
EOF
if [ -e "${ca_files[0]}" ]; then
    cat >&2 <<EOF
This machine trusts extra CA certificates (${ca_files[*]}); if its registry traffic passes a
TLS-intercepting proxy, pass them too:
    --build-arg EXTRA_CA_CERT="\$(cat /usr/local/share/ca-certificates/*.crt)"
    export PIPEGUARD_EXTRA_CA_CERT="\$(cat /usr/local/share/ca-certificates/*.crt)"
EOF
fi
echo "BASE_IMAGE=$BASE_IMAGE"
