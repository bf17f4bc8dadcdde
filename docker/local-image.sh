#!/usr/bin/env bash
# Build and run the project's Dockerfile on a machine with no GPU, no Docker daemon and no image registry
# (CI): buildah builds it, `buildah run` runs it. The Dockerfile is the CUDA image's; only build args differ:
# a Debian bookworm base made here with debootstrap instead of nvidia/cuda, the CPU lock instead of the
# CUDA lock (with the CPU torch wheel this machine has on disk), the demo assets instead of the paper's.
#
#   docker/local-image.sh base     make (or reuse) the local base image
#   docker/local-image.sh build    base, then the image (extra arguments go to `buildah bud`)
#   docker/local-image.sh smoke    build, then make paper, verify-assets, smoke.sh and status inside it,
#                                  as uid 10001 without network, with checks on what they wrote
#   docker/local-image.sh container                   a new working container of the image (name on stdout)
#   docker/local-image.sh volumes OUT                 OUT/app/results, OUT/app/NeurIPS/{generated,build}, OUT/tmp
#   docker/local-image.sh exec CONTAINER OUT USER CMD...   CMD in it as USER, offline, OUT's volumes mounted
#   docker/local-image.sh writes CONTAINER STAMP      fail, listing them, if files newer than STAMP are outside the volumes
#
# Knobs (environment): LOCAL_IMAGE (default localhost/streamkv:cpu-smoke), BASE_IMAGE
# (localhost/streamkv-base:bookworm), DEBIAN_MIRROR, TORCH_WHEEL (default: found through pip's find-links),
# STREAMKV_IMAGE_CACHE (default /var/cache/streamkv-image: holds wheels/, the build context with that wheel).
# Run as root (buildah and debootstrap need it here). Needs: apt-get install buildah podman debootstrap.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_IMAGE=${BASE_IMAGE:-localhost/streamkv-base:bookworm}
LOCAL_IMAGE=${LOCAL_IMAGE:-localhost/streamkv:cpu-smoke}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
HOST_CA=/etc/ssl/certs/ca-certificates.crt
TORCH_VERSION=${TORCH_VERSION:-$(sed -n 's/^TORCH_VERSION *?= *//p' docker/docker.mk)}
UID_IN_IMAGE=10001

say() { echo "image-smoke: $*" >&2; }
die() { say "error: $*"; exit 1; }
# Seconds since the epoch with decimals, for the per-step times.
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.0f", b - a }'; }

# ------------------------------------------------------------------------------------------------ base

# The base is cached as an image in buildah's storage (/var/lib/containers/storage), labelled with what it
# was made from: a host whose CA bundle changed gets a new base, since pip in the build must trust it.
base_key() { echo "bookworm-minbase $(sha256sum "$HOST_CA" | cut -c1-16)"; }

make_base() {
  local key; key=$(base_key)
  if [ "$(buildah inspect --type image --format '{{index .OCIv1.Config.Labels "streamkv.base"}}' "$BASE_IMAGE" 2>/dev/null)" = "$key" ]; then
    say "base: $BASE_IMAGE is cached ($key)"
    return
  fi
  command -v debootstrap >/dev/null || die "debootstrap not found: apt-get install debootstrap buildah podman"
  local root; root=$(mktemp -d /var/tmp/streamkv-base.XXXXXX)
  say "base: debootstrap --variant=minbase bookworm from $DEBIAN_MIRROR"
  debootstrap --variant=minbase bookworm "$root" "$DEBIAN_MIRROR" >/dev/null \
    || { rm -rf "$root"; die "debootstrap failed (mirror $DEBIAN_MIRROR; set DEBIAN_MIRROR)"; }
  # Outbound TLS here may be re-signed by a CA that Debian's stock bundle lacks: the local base trusts what
  # this host trusts (update-ca-certificates keeps files under /usr/local/share/ca-certificates when the
  # Dockerfile's base stage installs ca-certificates). Only this local base; never the Dockerfile.
  mkdir -p "$root/usr/local/share/ca-certificates" "$root/etc/ssl/certs"
  cp "$HOST_CA" "$root/usr/local/share/ca-certificates/streamkv-build-host.crt"
  cp "$HOST_CA" "$root/etc/ssl/certs/ca-certificates.crt"
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | podman import --change "LABEL streamkv.base=$key" - "$BASE_IMAGE" >/dev/null
  rm -rf "$root"
  say "base: imported $BASE_IMAGE ($key)"
}

# ----------------------------------------------------------------------------------------------- build

CACHE_DIR=${STREAMKV_IMAGE_CACHE:-/var/cache/streamkv-image}
GIT_COMMIT=${GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
GIT_DIRTY=${GIT_DIRTY:-$(if [ -n "$(git status --porcelain 2>/dev/null)" ]; then echo 1; else echo 0; fi)}

# The CPU torch wheel for the base's Python (3.11): TORCH_WHEEL, else the first match in pip's find-links
# (this machine's pip config; PyPI's own Linux torch is the CUDA build, several GB).
find_torch_wheel() {
  local name="torch-${TORCH_VERSION}+cpu-cp311-cp311-manylinux*_x86_64.whl" dirs dir
  if [ -n "${TORCH_WHEEL:-}" ]; then
    [ -f "$TORCH_WHEEL" ] || die "TORCH_WHEEL=$TORCH_WHEEL is not a file"
    echo "$TORCH_WHEEL"; return
  fi
  dirs="${PIP_FIND_LINKS:-} $(python3 -m pip config list 2>/dev/null | sed -n "s/^[^=]*find-links='\(.*\)'$/\1/p")"
  for dir in $dirs; do
    dir=${dir#file://}
    # shellcheck disable=SC2086  # the glob must expand
    for wheel in "$dir"/$name; do [ -f "$wheel" ] && { echo "$wheel"; return; }; done
  done
  die "no $name in pip's find-links ($dirs); set TORCH_WHEEL to the CPU torch wheel for Python 3.11"
}

build_image() {
  make_base
  local wheel wheels="$CACHE_DIR/wheels" start
  wheel=$(find_torch_wheel)
  # A folder with that wheel alone, at a fixed path (the build context `wheels`); a hard link costs nothing.
  mkdir -p "$wheels"
  find "$wheels" -name '*.whl' ! -name "$(basename "$wheel")" -delete
  [ -f "$wheels/$(basename "$wheel")" ] || ln "$wheel" "$wheels/" 2>/dev/null || cp "$wheel" "$wheels/"
  say "build: $LOCAL_IMAGE from $BASE_IMAGE, CPU lock, demo assets, wheel $(basename "$wheel"), commit ${GIT_COMMIT:0:12} (dirty=$GIT_DIRTY)"
  start=$(now)
  # --force-rm: a failed build (tests/test_image.py makes some) leaves no working containers behind.
  buildah bud --isolation chroot --layers --format docker --force-rm \
    --build-arg CUDA_IMAGE="${BASE_IMAGE%:*}" \
    --build-arg CUDA_TAG="${BASE_IMAGE##*:}" \
    --build-arg CUDA_DIGEST= \
    --build-arg TORCH_VERSION="$TORCH_VERSION" \
    --build-arg TORCH_CUDA= \
    --build-arg REQUIREMENTS=requirements.lock \
    --build-arg MIT_REQUIREMENTS=requirements-mit.lock \
    --build-arg ASSETS=demo \
    --build-arg MIT_CLONE=optional \
    --build-arg GIT_COMMIT="$GIT_COMMIT" \
    --build-arg GIT_DIRTY="$GIT_DIRTY" \
    --build-context wheels="$wheels" \
    -t "$LOCAL_IMAGE" "$@" .
  say "build: ${LOCAL_IMAGE} built in $(elapsed "$start") s; image size $(image_size)"
}

image_size() {
  buildah images --format '{{.Size}}' "$LOCAL_IMAGE" | head -1
}

# ------------------------------------------------------------------------------------------------- run

# The image's output volumes, mounted from host folders as `docker run -v` would (docker/docker.mk), and /tmp
# as scratch (what `docker run --read-only --tmpfs /tmp` gives): the only places a run may write.
# Each is mounted from OUT/<its path>, e.g. OUT/app/results.
VOLUMES=(/app/results /app/NeurIPS/generated /app/NeurIPS/build /tmp)

# A fresh working container of the image; its name on stdout. buildah run gives each of the image's
# VOLUMEs an anonymous volume of its own, and which of that and a `-v` on the same path ends up on top
# varies from run to run (outputs then vanish into the anonymous one); `docker run -v` simply replaces the
# VOLUME. So the working container drops the VOLUMEs (its copy of the config, not the image's): the `-v`
# mounts of run_in are then the only ones.
new_container() {
  local ctr v
  ctr=$(buildah from --pull=never --name "streamkv-smoke-$$-$RANDOM" "$LOCAL_IMAGE" 2>/dev/null) \
    || die "no image $LOCAL_IMAGE: run docker/local-image.sh build"
  # shellcheck disable=SC2016  # a Go template, not shell
  for v in $(buildah inspect --format '{{range $v, $_ := .OCIv1.Config.Volumes}}{{$v}} {{end}}' "$ctr"); do
    buildah config --volume "$v-" "$ctr"
  done
  echo "$ctr"
}

# run_in CONTAINER OUT USER CMD...: CMD through the image's entrypoint, as USER, with no network (a new
# network namespace: `buildah run --network none` is not honoured with chroot isolation), with OUT/<volume>
# mounted on each /app/<volume>. buildah run does not apply ENTRYPOINT; `docker run` would.
run_in() {
  local ctr=$1 out=$2 user=$3 mounts=() v
  shift 3
  for v in "${VOLUMES[@]}"; do mounts+=(-v "$out$v:$v"); done
  unshare --net buildah run --isolation chroot --user "$user" "${mounts[@]}" "$ctr" -- /app/docker/entrypoint.sh "$@"
}

# Host folders for the volumes, owned by the image's user as `docker run --user` would need them.
make_volumes() {
  local out=$1 v
  for v in "${VOLUMES[@]}"; do mkdir -p "$out$v"; done
  chown -R "$UID_IN_IMAGE:$UID_IN_IMAGE" "$out"
  chmod 1777 "$out/tmp"
}

# ----------------------------------------------------------------------------------------------- smoke

STEP_TIMES=()
step() {  # step NAME CMD...: run, time, and remember the time for the summary
  local name=$1 start rc=0
  shift
  say "step: $name"
  start=$(now)
  "$@" || rc=$?
  STEP_TIMES+=("$name $(elapsed "$start") s")
  [ "$rc" = 0 ] || die "step '$name' failed (exit $rc)"
}

# What the image says it is, and what every result JSON must say about it.
check_outputs() {
  local ctr=$1 out=$2 python torch
  read -r python torch < <(buildah run --isolation chroot "$ctr" -- /opt/venv/bin/python -c \
    'import sys, torch; print(sys.version.split()[0], torch.__version__)')
  python3 - "$out" "$GIT_COMMIT" "$python" "$torch" <<'PY'
import json, sys
from pathlib import Path

out, commit, python, torch = Path(sys.argv[1]), *sys.argv[2:]
pdf = out / "app/NeurIPS/build/neurips_2025_compressed.pdf"
if not pdf.is_file() or pdf.stat().st_size == 0:
    sys.exit(f"no PDF, or an empty one, at {pdf}")
results = [p for p in (out / "app/results").rglob("*.json") if "fingerprint" in json.loads(p.read_text())]
if not results:
    sys.exit(f"no result JSON with a fingerprint under {out / 'app/results'}")
want = {"python": python, "torch": torch, "git_commit": commit}
bad = [f"{p.relative_to(out)}: {k}={fp.get(k)!r}, the image has {v!r}"
       for p in results for fp in [json.loads(p.read_text())["fingerprint"]] for k, v in want.items() if fp.get(k) != v]
if bad:
    sys.exit(f"{len(bad)} fingerprint fields do not name the image: {bad[0]}")
print(f"image-smoke: checks: PDF {pdf.stat().st_size} bytes; {len(results)} result JSONs name python {python}, "
      f"torch {torch}, commit {commit[:12]}", file=sys.stderr)
PY
}

# Files the runs created or changed in the container's own filesystem, outside the mounted volumes: there
# should be none. Mounted only now: runs of a container that is also mounted on the host lose their writes
# to bind-mounted volumes (buildah 1.28, chroot isolation). buildah itself puts /etc/hosts, /etc/resolv.conf
# and the like in place for each run, under /run or as mount points; those are not the commands' writes.
check_writes() {
  local ctr=$1 stamp=$2 mnt written prune=() v
  mnt=$(buildah mount "$ctr")
  for v in /proc /sys /dev /run "${VOLUMES[@]}"; do prune+=(-path ".$v" -prune -o); done
  written=$(cd "$mnt" && find . -xdev "${prune[@]}" -newer "$stamp" ! -type d -print | sort)
  buildah umount "$ctr" >/dev/null
  if [ -n "$written" ]; then
    say "written outside the volumes:"; printf '  %s\n' "${written//$'\n'/$'\n'  }" >&2
    return 1
  fi
  say "checks: nothing written outside the volumes (${VOLUMES[*]})"
}

smoke() {
  local ctr out stamp
  step base make_base
  step build build_image
  out=$(mktemp -d /var/tmp/streamkv-smoke.XXXXXX)
  make_volumes "$out"
  ctr=$(new_container)
  stamp=$(mktemp)
  # shellcheck disable=SC2064  # expand now: the locals are gone when the trap runs
  trap "buildah rm '$ctr' >/dev/null 2>&1; rm -f '$stamp'" EXIT
  # Every later write has a newer mtime than this.
  sleep 1
  step "no network" run_in "$ctr" "$out" "$UID_IN_IMAGE:$UID_IN_IMAGE" python -c \
    'import socket
try:
    socket.create_connection(("pypi.org", 443), timeout=5)
except OSError as err:
    print(f"network: none ({err})")
else:
    raise SystemExit("network: pypi.org is reachable from inside")'
  step "make paper" run_in "$ctr" "$out" "$UID_IN_IMAGE:$UID_IN_IMAGE" make paper
  step "verify-assets" run_in "$ctr" "$out" "$UID_IN_IMAGE:$UID_IN_IMAGE" streamkv verify-assets
  step "smoke.sh" run_in "$ctr" "$out" "$UID_IN_IMAGE:$UID_IN_IMAGE" docker/smoke.sh --no-gpu
  step "status" run_in "$ctr" "$out" "$UID_IN_IMAGE:$UID_IN_IMAGE" streamkv status
  step "checks" check_outputs "$ctr" "$out"
  step "writes" check_writes "$ctr" "$stamp"
  say "outputs: $out"
  say "image: $LOCAL_IMAGE, $(image_size)"
  printf 'image-smoke: time: %s\n' "${STEP_TIMES[@]}" >&2
  say "ok"
}

case "${1:-}" in
  base) make_base ;;
  build) shift; build_image "$@" ;;
  smoke) smoke ;;
  container) new_container ;;
  volumes) make_volumes "$2" ;;
  exec) shift; run_in "$@" ;;
  writes) check_writes "$2" "$3" ;;
  *) echo "usage: $0 base|build|smoke|container|volumes|exec|writes" >&2; exit 2 ;;
esac
