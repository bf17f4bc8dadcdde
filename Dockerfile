# syntax=docker/dockerfile:1
# streamkv's CUDA image: `make paper` / `make sweeps` on Pythia-2.8B with no network at run time.
# Build (with network): make image. Run: docker run --gpus all streamkv make sweeps. See docker/README.md.
# The version build args below are mirrored by docker/docker.mk and kept equal by tests/test_docker.py.

# The CUDA base, by exact tag and by digest (the digest wins when both are given; an empty CUDA_DIGEST
# falls back to the tag). The `base` flavour is enough: torch's wheels bring cuBLAS/cuDNN themselves.
ARG CUDA_IMAGE=nvidia/cuda
ARG CUDA_TAG=12.6.3-base-ubuntu24.04
ARG CUDA_DIGEST=sha256:c87e78933f4c16e3272123bf2f75537306596d0fbaa395a29696a22786e5ee0e
# torch==TORCH_VERSION+TORCH_CUDA must be the line docker/requirements.lock pins.
ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA=cu126
# EleutherAI/pythia-2.8b commit (40 hex): main as of this writing; see streamkv/fetch.py.
ARG PYTHIA_REVISION=2a259cdd96a4beb1cdf467512e3904197345f6a9
# mit-han-lab/streaming-llm commit (40 hex) the MIT reference runs; see scripts/mit/README.md.
ARG MIT_COMMIT=2e5042606d69933d88fbf909bd77907456b9b4dd
# The defaults build the paper's CUDA image. make image-smoke (docker/local-image.sh) builds this same file on
# a machine with no GPU and no hub by overriding only these and the base above: the CPU locks
# (requirements.lock, requirements-mit.lock, with TORCH_CUDA empty), ASSETS=demo (no fetch: the image runs
# the committed demo model, and that is its default profile), MIT_CLONE=optional (no clone of github: the
# image has no MIT reference, said in one line), and the `wheels` stage below.
ARG REQUIREMENTS=docker/requirements.lock
ARG MIT_REQUIREMENTS=docker/requirements-mit.lock
ARG ASSETS=paper
ARG MIT_CLONE=required

# Extra wheels pip may take (--find-links): none here. make image-smoke replaces this stage with a folder
# holding the CPU torch wheel (buildah bud --build-context wheels=DIR): PyPI's Linux torch bundles CUDA.
FROM scratch AS wheels

FROM ${CUDA_IMAGE}:${CUDA_TAG}${CUDA_DIGEST:+@}${CUDA_DIGEST} AS base
ARG DEBIAN_FRONTEND=noninteractive
# Ubuntu's archive keeps only the newest build of a package, so pinning apt versions would break the
# build within weeks; the base image digest and the Python lock are what pin this image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates make python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# ---- deps: the locked Python environment; changes only when docker/requirements.lock does.
FROM base AS deps
ARG TORCH_VERSION
ARG TORCH_CUDA
ARG REQUIREMENTS
COPY ${REQUIREMENTS} /tmp/requirements.lock
# An empty TORCH_CUDA means the lock pins the bare version (the CPU lock).
RUN --mount=type=bind,from=wheels,target=/tmp/wheels \
    torch_pin="torch==${TORCH_VERSION}${TORCH_CUDA:++}${TORCH_CUDA}" \
    && { grep -qx "${torch_pin}" /tmp/requirements.lock \
        || { echo "${REQUIREMENTS} does not pin ${torch_pin}" >&2; exit 1; }; } \
    && python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --find-links /tmp/wheels -r /tmp/requirements.lock
ENV PATH=/opt/venv/bin:$PATH

# ---- assets: `streamkv fetch` with network. Only fetch.py and its stdlib-only helper files.py are copied
# in, so that editing any other module leaves this multi-GB layer cached.
FROM deps AS assets
ARG PYTHIA_REVISION
ARG ASSETS
ENV HF_HOME=/opt/hf \
    HF_HUB_DISABLE_TELEMETRY=1
WORKDIR /assets
COPY streamkv/__init__.py streamkv/files.py streamkv/fetch.py streamkv/
# ASSETS=demo fetches nothing and leaves the two folders the runtime stage copies empty.
RUN case "${ASSETS}" in \
      paper) python -m streamkv.fetch --revision "${PYTHIA_REVISION}" --data-dir /assets/data ;; \
      demo) echo "assets: ASSETS=demo: no Pythia-2.8B, PG19 or WikiText in this image; it runs the demo profile" \
            && mkdir -p /opt/hf/hub/models--EleutherAI--pythia-2.8b /assets/data ;; \
      *) echo "ASSETS must be paper or demo, got '${ASSETS}'" >&2; exit 1 ;; \
    esac

# ---- mit: MIT streaming-llm at MIT_COMMIT with our setup patch, in its own pinned environment (transformers
# 4.33.0), for the MIT reference stage. Cloned here, where the network exists; never vendored.
FROM base AS mit
ARG MIT_COMMIT
ARG MIT_REQUIREMENTS
ARG MIT_CLONE
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git patch \
    && rm -rf /var/lib/apt/lists/*
# The clone comes first so that without it (MIT_CLONE=optional) the pinned environment is not installed
# either; /opt/mit and /opt/venv-mit then stay empty and the MIT stage skips itself with one line at run time.
RUN mkdir -p /opt/mit /opt/venv-mit \
    && if ! git clone --quiet https://github.com/mit-han-lab/streaming-llm /tmp/streaming-llm-clone 2>/tmp/clone.err; then \
         cat /tmp/clone.err >&2; \
         [ "${MIT_CLONE}" = optional ] || exit 1; \
         echo "mit: MIT_CLONE=optional and github.com/mit-han-lab/streaming-llm cannot be cloned: no MIT reference in this image"; \
       fi
COPY ${MIT_REQUIREMENTS} /tmp/requirements-mit.lock
RUN if [ -d /tmp/streaming-llm-clone ]; then \
      python3 -m venv /opt/venv-mit \
      && /opt/venv-mit/bin/pip install --no-cache-dir -r /tmp/requirements-mit.lock; \
    fi
COPY scripts/mit/setup.sh scripts/mit/streaming-llm.patch /tmp/mit/
RUN if [ -d /tmp/streaming-llm-clone ]; then \
      bash /tmp/mit/setup.sh /tmp/streaming-llm-clone "${MIT_COMMIT}" /opt/mit/streaming-llm \
      && rm -rf /tmp/streaming-llm-clone; \
    fi

# ---- runtime: offline, non-root, TeX Live for the PDF.
FROM base AS runtime
# The same Debian TeX Live packages CI installs (scripts/ensure_tex.sh keeps the list).
COPY scripts/ensure_tex.sh /tmp/ensure_tex.sh
RUN bash /tmp/ensure_tex.sh \
    && rm -rf /var/lib/apt/lists/* /tmp/ensure_tex.sh \
    && useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin streamkv
COPY --from=deps /opt/venv /opt/venv
COPY --from=mit /opt/venv-mit /opt/venv-mit
COPY --from=mit /opt/mit /opt/mit
COPY --from=assets /opt/hf/hub/models--EleutherAI--pythia-2.8b /opt/hf/hub/models--EleutherAI--pythia-2.8b
WORKDIR /app
COPY --from=assets /assets/data/ /app/data/
COPY . /app/
# Editable, because streamkv.assets finds data/ next to the package (/app/data). VENV points the
# Makefile at the image's venv, and the stamp tells it the venv is installed.
# The output directories are writable by any uid: docker/docker.mk runs as the host user (--user).
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps --no-build-isolation -e /app \
    && touch /opt/venv/.installed \
    && mkdir -p /app/results /app/NeurIPS/generated /app/NeurIPS/build \
    && chmod 1777 /app/results /app/NeurIPS /app/NeurIPS/generated /app/NeurIPS/build \
    && ln -s build/neurips_2025_compressed.pdf /app/NeurIPS/neurips_2025_compressed.pdf
# A run writes only to the volumes and to /tmp (scratch; `docker run --read-only --tmpfs /tmp` works): the
# PDF's copy next to the .tex is a link into build/, and matplotlib's, TeX's, Triton's and other caches
# go to /tmp. torch.compile's Inductor caches, which save a later process its compilations, go to the
# results volume instead (results/.cache/torch-compile, streamkv/compile_cache.py; Triton's kernels travel
# inside their entries).
# Build args are declared only here, after the heavy layers: a RUN after an ARG re-runs when its value changes.
ARG CUDA_TAG
ARG TORCH_VERSION
ARG TORCH_CUDA
ARG PYTHIA_REVISION
ARG ASSETS
ENV PATH=/opt/venv/bin:$PATH \
    VENV=/opt/venv \
    HF_HOME=/opt/hf \
    HF_HUB_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    STREAMKV_PROFILE=${ASSETS} \
    STREAMKV_PYTHIA_REVISION=${PYTHIA_REVISION} \
    MIT_REPO=/opt/mit/streaming-llm \
    PYTHON_BIN=/opt/venv-mit/bin/python \
    MPLCONFIGDIR=/tmp/streamkv-cache/matplotlib \
    TEXMFVAR=/tmp/streamkv-cache/texmf-var \
    TRITON_CACHE_DIR=/tmp/streamkv-cache/triton \
    XDG_CACHE_HOME=/tmp/streamkv-cache
# A new commit changes these and nothing above. The fingerprint reads them: there is no .git here.
ARG GIT_COMMIT=unknown
ARG GIT_DIRTY=unknown
ENV STREAMKV_GIT_COMMIT=${GIT_COMMIT} \
    STREAMKV_GIT_DIRTY=${GIT_DIRTY}
LABEL org.opencontainers.image.title="streamkv" \
      org.opencontainers.image.description="KV-cache eviction experiments on Pythia-2.8B, offline" \
      org.opencontainers.image.revision="${GIT_COMMIT}" \
      streamkv.cuda-base="${CUDA_TAG}" \
      streamkv.torch="${TORCH_VERSION}${TORCH_CUDA:++}${TORCH_CUDA}" \
      streamkv.assets="${ASSETS}" \
      streamkv.pythia-revision="${PYTHIA_REVISION}"
VOLUME ["/app/results", "/app/NeurIPS/generated", "/app/NeurIPS/build"]
USER 10001:10001
# Quick asset check (sizes): a periodic full sha256 of 5.7 GB would load the host for nothing.
HEALTHCHECK --interval=10m --timeout=2m --start-period=1m --retries=1 CMD ["/app/docker/smoke.sh", "--quick"]
ENTRYPOINT ["/app/docker/entrypoint.sh"]
CMD ["make", "help"]
