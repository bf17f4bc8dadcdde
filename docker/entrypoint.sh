#!/bin/sh
# Entry point of the streamkv image: run the command given to `docker run` as it is, `make help` by
# default (the image's CMD). `docker run --gpus all streamkv make sweeps` runs `make sweeps` in /app.
set -eu

# `docker run --user "$(id -u):$(id -g)"` (how docker/docker.mk runs it, so that results belong to the host
# user) gives a uid without a passwd entry: HOME is then / and not writable, and matplotlib and TeX, which
# keep caches under HOME, would fail. Give such a user a fresh home.
if [ ! -w "${HOME:-/}" ]; then
  HOME=$(mktemp -d /tmp/home.XXXXXX)
  export HOME
fi

exec "$@"
