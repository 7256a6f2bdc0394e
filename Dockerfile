# pipeguard: one image for the coordinator, the nodes and the CLI.
#
#   docker build -t pipeguard .
#   docker compose up            (or docker-compose up: see compose.yaml)
#
# First version. It works with the classic builder and with BuildKit, and it has not been
# tuned for size.
#
# Build arguments:
#   BASE_IMAGE      any Debian-like image with python3 >= 3.11 and its venv module
#                   (default python:3.11-slim; a plain Debian 12 image with python3-venv works too).
#                   Without Docker Hub, tests/docker/prepare-engine.sh builds one with debootstrap
#                   (pipeguard-base:bookworm); when the machine has a CPU torch wheel it goes into
#                   that image with PIP_FIND_LINKS pointing at it, so the torch step below takes it.
#   EXTRA_CA_CERT   PEM text of extra CA certificate(s), for builds whose registries sit behind a
#                   TLS-intercepting proxy:
#                     docker build --build-arg EXTRA_CA_CERT="$(cat corp-ca.pem)" .
#                   Each certificate is added to the system bundle and pip is pointed at that
#                   bundle. They stay in the image (a CA certificate is public).
#   TORCH_SPEC      the torch requirement (default torch==2.13.0, the version the tests use).
#   TORCH_PIP_ARGS  extra pip arguments for the torch install only. By default torch comes from
#                   PyPI, which on x86-64 Linux is the CUDA build and pulls several GB of nvidia-*
#                   wheels. Where PyTorch's CPU-only index is reachable, use it instead:
#                     --build-arg TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
#                   (that index could not be reached where this file was written, so it is not the
#                   default).

ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG EXTRA_CA_CERT=""
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_PIP_ARGS=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONWARNINGS="ignore:Failed to initialize NumPy" \
    VIRTUAL_ENV=/opt/pipeguard \
    PATH=/opt/pipeguard/bin:$PATH

# Extra CA first, so that every later download trusts it.
RUN set -eu; \
    if [ -n "$EXTRA_CA_CERT" ]; then \
        mkdir -p /usr/local/share/ca-certificates /etc/ssl/certs; \
        printf '%s\n' "$EXTRA_CA_CERT" | awk '/-----BEGIN CERTIFICATE-----/ { n++ }; \
            n { print > ("/usr/local/share/ca-certificates/pipeguard-extra-ca-" n ".crt") }'; \
        ls /usr/local/share/ca-certificates/pipeguard-extra-ca-*.crt >/dev/null 2>&1 \
            || { echo "EXTRA_CA_CERT holds no PEM certificate (-----BEGIN CERTIFICATE-----)" >&2; exit 1; }; \
        if command -v update-ca-certificates >/dev/null 2>&1; then \
            update-ca-certificates; \
        else \
            cat /usr/local/share/ca-certificates/pipeguard-extra-ca-*.crt >> /etc/ssl/certs/ca-certificates.crt; \
        fi; \
        printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > /etc/pip.conf; \
    fi

# A virtual environment: works the same on python:*-slim and on Debian's own python3
# (which refuses system-wide pip installs).
RUN python3 -m venv "$VIRTUAL_ENV" && python -m pip install --upgrade pip

# torch on its own layer: by far the largest download, and it changes least often.
# shellcheck disable=SC2086  (TORCH_PIP_ARGS is meant to split into words)
RUN pip install $TORCH_PIP_ARGS "$TORCH_SPEC"

# The project (pyproject.toml pulls in grpcio, grpcio-health-checking, grpcio-reflection, protobuf,
# cryptography, uvloop). The generated protobuf code is committed, so no protoc step is needed.
WORKDIR /src
COPY . /src
RUN pip install /src \
    && python -c "import torch, grpc, grpc_health.v1, grpc_reflection.v1alpha, pipeguard, node, coordinator, pipeguard.app.cli; print('torch', torch.__version__)"

# An unprivileged user. Keys and run state live under /var/lib/pipeguard; compose mounts named
# volumes there, which start with this ownership and mode, so key files stay 0600 in 0700 dirs.
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /var/lib/pipeguard --shell /usr/sbin/nologin pipeguard \
    && mkdir -p /var/lib/pipeguard/node /var/lib/pipeguard/coordinator \
    && chown -R pipeguard:pipeguard /var/lib/pipeguard \
    && chmod 0700 /var/lib/pipeguard/node /var/lib/pipeguard/coordinator
USER pipeguard
WORKDIR /var/lib/pipeguard

# 7000: coordinator; 7001: node (any port works: see --bind/--advertise).
EXPOSE 7000 7001

CMD ["pipeguard", "--help"]
