# Image targets, included by the Makefile; also usable alone: make -f docker/docker.mk -n image
# The version variables mirror the Dockerfile's build args (tests/test_docker.py keeps them equal); override
# any of them on the command line, e.g. make image PYTHIA_REVISION=<40-hex commit>.

CUDA_IMAGE      ?= nvidia/cuda
CUDA_TAG        ?= 12.6.3-base-ubuntu24.04
CUDA_DIGEST     ?= sha256:c87e78933f4c16e3272123bf2f75537306596d0fbaa395a29696a22786e5ee0e
TORCH_VERSION   ?= 2.13.0
TORCH_CUDA      ?= cu126
PYTHIA_REVISION ?= 2a259cdd96a4beb1cdf467512e3904197345f6a9
# mit-han-lab/streaming-llm commit the MIT reference runs (its main as of this writing); `make mit-env` too.
MIT_COMMIT      ?= 2e5042606d69933d88fbf909bd77907456b9b4dd

# The tag names the stack; `streamkv` (:latest) is the short name the README's docker run lines use.
IMAGE_NAME ?= streamkv
IMAGE      ?= $(IMAGE_NAME):torch$(TORCH_VERSION)-$(TORCH_CUDA)-pythia2.8b-$(shell printf %.7s '$(PYTHIA_REVISION)')
DOCKER     ?= docker
HADOLINT   ?= $(firstword $(wildcard $(or $(VENV),.venv)/bin/hadolint) hadolint)
GIT_COMMIT ?= $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
GIT_DIRTY  ?= $(if $(shell git status --porcelain 2>/dev/null),1,0)

# Runs: the host's GPUs when it has an NVIDIA driver, the host user's uid/gid so that the outputs (results,
# tables, and the PDF, which latexmk builds in NeurIPS/build/) stay the user's, --init so that Ctrl-C stops
# make and its children.
# DOCKER_ARGS passes more, e.g. DOCKER_ARGS="-e REPEAT_RUNS=3".
GPU_FLAGS   ?= $(if $(shell command -v nvidia-smi 2>/dev/null),--gpus all,)
DOCKER_USER ?= $(shell id -u):$(shell id -g)
DOCKER_ARGS ?=
OUTPUT_DIRS := results NeurIPS/generated NeurIPS/build
docker_run   = $(DOCKER) run --rm --init $(GPU_FLAGS) --user $(DOCKER_USER) \
	$(foreach d,$(OUTPUT_DIRS),-v $(CURDIR)/$(d):/app/$(d)) $(DOCKER_ARGS) $(IMAGE)

.PHONY: image docker-smoke image-base image-cpu image-smoke docker-paper docker-sweeps lint-docker

image: ## Build the CUDA image (network needed: fetches Pythia-2.8B, PG19, WikiText-103)
	$(if $(shell printf '%s' '$(PYTHIA_REVISION)' | grep -xE '[0-9a-f]{40}'),,$(error PYTHIA_REVISION must be a 40-hex commit, got '$(PYTHIA_REVISION)'))
	$(DOCKER) build \
		--build-arg CUDA_IMAGE=$(CUDA_IMAGE) \
		--build-arg CUDA_TAG=$(CUDA_TAG) \
		--build-arg CUDA_DIGEST=$(CUDA_DIGEST) \
		--build-arg TORCH_VERSION=$(TORCH_VERSION) \
		--build-arg TORCH_CUDA=$(TORCH_CUDA) \
		--build-arg PYTHIA_REVISION=$(PYTHIA_REVISION) \
		--build-arg MIT_COMMIT=$(MIT_COMMIT) \
		--build-arg GIT_COMMIT=$(GIT_COMMIT) \
		--build-arg GIT_DIRTY=$(GIT_DIRTY) \
		-t $(IMAGE) -t $(IMAGE_NAME) .

docker-smoke: ## Fingerprint, GPU and full asset sha256 check inside the built CUDA image (Docker)
	$(DOCKER) run --rm $(GPU_FLAGS) $(IMAGE) docker/smoke.sh $(if $(GPU_FLAGS),,--no-gpu)

# Without Docker, a GPU or a hub (CI): the same Dockerfile through buildah, with build args for a local Debian
# base, the CPU lock and the demo assets (docker/local-image.sh says which and why). Root only.
local_image = GIT_COMMIT=$(GIT_COMMIT) GIT_DIRTY=$(GIT_DIRTY) TORCH_VERSION=$(TORCH_VERSION) docker/local-image.sh

image-base: ## Make the local Debian bookworm base for image-cpu (debootstrap; cached in buildah's storage)
	$(local_image) base

image-cpu: ## Build the Dockerfile for CPU with buildah: local base, CPU lock, demo assets (no GPU, no hub)
	$(local_image) build

image-smoke: ## image-cpu, then make paper, verify-assets, smoke.sh and status in it as uid 10001, offline
	$(local_image) smoke

docker-paper: ## make paper inside the image; results/, NeurIPS/generated/ and the PDF (NeurIPS/build/) land here
	mkdir -p $(OUTPUT_DIRS)
	$(docker_run) make paper

docker-sweeps: ## make sweeps inside the image; outputs land in results/
	mkdir -p $(OUTPUT_DIRS)
	$(docker_run) make sweeps

lint-docker: ## hadolint on the Dockerfile (zero findings)
	$(HADOLINT) Dockerfile
