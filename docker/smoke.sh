#!/bin/sh
# Smoke test of the streamkv image, and its HEALTHCHECK: print the environment fingerprint, check that
# torch sees a GPU, and check the baked assets against data/manifest.json. Exit 1 if any check fails.
#   --quick   assets by presence and size only (the periodic health check; a full pass hashes 5.7 GB)
#   --no-gpu  skip the GPU check (make image-smoke on a host without an NVIDIA GPU)
set -u
verify_flags=""
gpu=1
for arg in "$@"; do
  case "$arg" in
    --quick) verify_flags="--quick" ;;
    --no-gpu) gpu=0 ;;
    *) echo "smoke.sh: unknown option $arg (use --quick, --no-gpu)" >&2; exit 2 ;;
  esac
done
data_dir="$(cd "$(dirname "$0")/.." && pwd)/data"
failed=""

streamkv fingerprint || failed="$failed fingerprint"

if [ "$gpu" = 1 ]; then
  python - <<'PY' || failed="$failed gpu"
import sys

import torch

if not torch.cuda.is_available():
    sys.exit("gpu: torch sees no CUDA device; run the container with --gpus all (NVIDIA Container Toolkit)")
print(f"gpu: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
PY
else
  echo "gpu: check skipped (--no-gpu)"
fi

# shellcheck disable=SC2086  # verify_flags is empty or one word
streamkv verify-assets --data-dir "$data_dir" $verify_flags || failed="$failed assets"

if [ -n "$failed" ]; then
  echo "smoke: FAILED:$failed" >&2
  exit 1
fi
echo "smoke: ok"
