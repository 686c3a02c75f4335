# viowire in a container: the `viowire` command, as server or client.
#
#   docker build -t viowire:local .
#   docker run --rm -p 7000:7000 viowire:local serve --listen tcp://0.0.0.0:7000
#   docker run --rm viowire:local probe --memory proxied tcp://HOST:7000
#
# docker-compose.yml runs a server and clients from this image; docs/containers.md explains it.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only what `pip install .` reads (.dockerignore keeps the rest of the tree out). uvloop is a
# dependency of the package on Linux and comes as a wheel: no compiler needed.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY viowire ./viowire
RUN pip install . && rm -rf /src

# ip and ping: for `viowire net-attach` users (the compose file's netpeer service).
RUN apt-get update && apt-get install -y --no-install-recommends iproute2 iputils-ping \
    && rm -rf /var/lib/apt/lists/*

# /results: where `viowire load --histogram-out /results/` writes (docker-compose.yml mounts a
# volume there; a new volume takes the directory's owner from the image).
RUN useradd --create-home --uid 10001 --user-group viowire \
    && mkdir /results && chown viowire:viowire /results
USER viowire
WORKDIR /home/viowire

EXPOSE 7000
ENTRYPOINT ["viowire"]
CMD ["serve", "--listen", "tcp://0.0.0.0:7000", "--no-shm"]
