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
COPY docker/requirements.lock /tmp/requirements.lock
RUN grep -qx "torch==${TORCH_VERSION}+${TORCH_CUDA}" /tmp/requirements.lock \
        || { echo "docker/requirements.lock does not pin torch==${TORCH_VERSION}+${TORCH_CUDA}" >&2; exit 1; } \
    && python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir -r /tmp/requirements.lock
ENV PATH=/opt/venv/bin:$PATH

# ---- assets: `streamkv fetch` with network. Only fetch.py and its stdlib-only helper files.py are copied
# in, so that editing any other module leaves this multi-GB layer cached.
FROM deps AS assets
ARG PYTHIA_REVISION
ENV HF_HOME=/opt/hf \
    HF_HUB_DISABLE_TELEMETRY=1
WORKDIR /assets
COPY streamkv/__init__.py streamkv/files.py streamkv/fetch.py streamkv/
RUN python -m streamkv.fetch --revision "${PYTHIA_REVISION}" --data-dir /assets/data

# ---- mit: MIT streaming-llm at MIT_COMMIT with our setup patch, in its own pinned environment (transformers
# 4.33.0), for the MIT reference stage. Cloned here, where the network exists; never vendored.
FROM base AS mit
ARG MIT_COMMIT
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git patch \
    && rm -rf /var/lib/apt/lists/*
COPY docker/requirements-mit.lock /tmp/requirements-mit.lock
RUN python3 -m venv /opt/venv-mit \
    && /opt/venv-mit/bin/pip install --no-cache-dir -r /tmp/requirements-mit.lock
COPY scripts/mit/setup.sh scripts/mit/streaming-llm.patch /tmp/mit/
RUN git clone --quiet https://github.com/mit-han-lab/streaming-llm /tmp/streaming-llm-clone \
    && mkdir -p /opt/mit \
    && bash /tmp/mit/setup.sh /tmp/streaming-llm-clone "${MIT_COMMIT}" /opt/mit/streaming-llm \
    && rm -rf /tmp/streaming-llm-clone

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
    && chmod 1777 /app/results /app/NeurIPS /app/NeurIPS/generated /app/NeurIPS/build
# Build args are declared only here, after the heavy layers: a RUN after an ARG re-runs when its value changes.
ARG CUDA_TAG
ARG TORCH_VERSION
ARG TORCH_CUDA
ARG PYTHIA_REVISION
ENV PATH=/opt/venv/bin:$PATH \
    VENV=/opt/venv \
    HF_HOME=/opt/hf \
    HF_HUB_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    STREAMKV_PROFILE=paper \
    STREAMKV_PYTHIA_REVISION=${PYTHIA_REVISION} \
    MIT_REPO=/opt/mit/streaming-llm \
    PYTHON_BIN=/opt/venv-mit/bin/python
# A new commit changes these and nothing above. The fingerprint reads them: there is no .git here.
ARG GIT_COMMIT=unknown
ARG GIT_DIRTY=unknown
ENV STREAMKV_GIT_COMMIT=${GIT_COMMIT} \
    STREAMKV_GIT_DIRTY=${GIT_DIRTY}
LABEL org.opencontainers.image.title="streamkv" \
      org.opencontainers.image.description="KV-cache eviction experiments on Pythia-2.8B, offline" \
      org.opencontainers.image.revision="${GIT_COMMIT}" \
      streamkv.cuda-base="${CUDA_TAG}" \
      streamkv.torch="${TORCH_VERSION}+${TORCH_CUDA}" \
      streamkv.pythia-revision="${PYTHIA_REVISION}"
VOLUME ["/app/results", "/app/NeurIPS/generated", "/app/NeurIPS/build"]
USER 10001:10001
# Quick asset check (sizes): a periodic full sha256 of 5.7 GB would load the host for nothing.
HEALTHCHECK --interval=10m --timeout=2m --start-period=1m --retries=1 CMD ["/app/docker/smoke.sh", "--quick"]
ENTRYPOINT ["/app/docker/entrypoint.sh"]
CMD ["make", "help"]
