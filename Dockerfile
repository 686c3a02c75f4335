# viowire in a container: the `viowire` command, as server or client.
#
#   docker build -t viowire:local .
#   docker run --rm --init -p 127.0.0.1:7000:7000 -v "$PWD/viowire.token:/run/secrets/viowire_token:ro" \
#       -e VIOWIRE_TOKEN_FILE=/run/secrets/viowire_token viowire:local
#   docker run --rm viowire:local probe --memory proxied tcp://HOST:7000
#
# docker-compose.yml runs a server and clients from this image; docs/containers.md explains it.
#
# BASE: any Debian-like image with Python 3.11+ (python3 -m venv) works; the default needs Docker
# Hub. Without a registry, make one from the apt mirror (scripts/compose-test does):
#   mmdebstrap --variant=apt --include=python3,python3-venv,ca-certificates,iproute2,iputils-ping \
#       bookworm - MIRROR | docker import - viowire-base:bookworm
#   docker build --build-arg BASE=viowire-base:bookworm -t viowire:local .
ARG BASE=python:3.11-slim
FROM ${BASE}

# pip's configuration for this build, when the default index is not the one to use (a local
# index, wheels served to the build, no index at all). No defaults: unset means pip's own. They
# are recorded in `docker history`, so no credentials here.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ARG PIP_FIND_LINKS
ARG PIP_NO_INDEX

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# ip and ping: for `viowire net-attach` users (the compose file's netpeer service). Installed only
# where the base lacks them (a base made with them needs no package mirror at build time).
RUN if ! command -v ip >/dev/null || ! command -v ping >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends iproute2 iputils-ping \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# A virtual environment: Debian's own python3 refuses `pip install` outside one (PEP 668).
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Only what `pip install .` reads (.dockerignore keeps the rest of the tree out). uvloop is a
# dependency of the package on Linux and comes as a wheel: no compiler needed.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY viowire ./viowire
RUN pip install . && rm -rf /src

# /results: where `viowire load --histogram-out /results/` writes (docker-compose.yml mounts a
# volume there; a new volume takes the directory's owner from the image).
RUN useradd --create-home --uid 10001 --user-group viowire \
    && mkdir /results && chown viowire:viowire /results
USER viowire
WORKDIR /home/viowire

# Run it with an init as PID 1 (`docker run --init`, `init: true` in compose): a process that is
# PID 1 gets no default action for SIGTERM, so a client (which installs no handler) would ignore
# `docker stop` for 10 s, until SIGKILL.
EXPOSE 7000
ENTRYPOINT ["viowire"]
CMD ["serve", "--listen", "tcp://0.0.0.0:7000", "--no-shm"]
