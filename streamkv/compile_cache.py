"""torch.compile paid once: one compilation per buffer shape in a process, Inductor's work kept across processes.

In a process. Dynamo keys compiled code by code object and guards. The fast engine compiles the bound
method `_Stream.step` of a new stream at every evaluation, but its guards check the shapes and dtypes of
what the step reads, not the objects' identities, so an evaluation with the shapes of an earlier one reuses
its compiled step (tests/test_compile.py counts compilations). Each new buffer shape (stream length, sink
and ring slots, loss dtype) compiles once more; past dynamo's recompile_limit (8 per code object) dynamo
would silently run the step uncompiled, and the CUDA graph would capture the eager step: about 2x the TPOT
(docs/bench: 5.5 vs 2.7 ms on an H200), unnoticed; one `streamkv paper` process, which runs every stage
(two stream lengths, their timing prefixes, the bench prefix, the ablations' sink counts), can meet that
many. So the step runs under a limit of MAX_SHAPES with fail_on_recompile_limit_hit: beyond it, an
error, never a silent slowdown. The guards' cost grows with the entries, but a captured step is called only
for its warm-up and capture.

Across processes. Inductor keeps its FX graph cache, the AOTAutograd cache and autotuning results under
TORCHINDUCTOR_CACHE_DIR, by default a per-user folder in /tmp that a container loses. `configure` points it
at the compile cache before the first compilation: $STREAMKV_COMPILE_CACHE if set, else
<results dir>/.cache/torch-compile, which the results store never reads (it scans only its slot
directories) and which in the image lies on the results volume. Triton's kernels travel inside the FX
graph cache entries. A second process still runs dynamo's trace of the step (seconds); it skips Inductor's
code generation and the C++/Triton compiles. Each result records the directory and this process's hit and
miss counts in its fingerprint (`record`), never in the config hash: a cached graph is the graph Inductor
would have compiled.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch._dynamo.utils import counters
from torch._functorch import config as functorch_config
from torch._inductor import config as inductor_config

ENV = "STREAMKV_COMPILE_CACHE"
RESULTS_SUBDIR = Path(".cache") / "torch-compile"
MAX_SHAPES = 64           # compiled buffer shapes of one step per process
# Inductor's counters (torch._dynamo.utils.counters) that say what the caches saved.
COUNTERS = (("inductor", "fxgraph_cache_hit"), ("inductor", "fxgraph_cache_miss"),
            ("aot_autograd", "autograd_cache_hit"), ("aot_autograd", "autograd_cache_miss"))


def directory(results_dir: str | Path) -> Path:
    """The compile cache of a results directory: $STREAMKV_COMPILE_CACHE, else <results>/.cache/torch-compile."""
    chosen = os.environ.get(ENV, "").strip()
    return Path(chosen).absolute() if chosen else Path(results_dir).absolute() / RESULTS_SUBDIR


def configure(results_dir: str | Path) -> Path:
    """Keep Inductor's caches in `directory(results_dir)` from now on (before the first compilation: a
    graph compiled earlier was cached where the cache was then); returns it."""
    path = directory(results_dir)
    # Read by Inductor at every cache access (torch._inductor.runtime.cache_dir_utils.cache_dir).
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    # On by default in torch 2.13; set so that an environment that turned them off does not pay every time.
    inductor_config.fx_graph_cache = True
    inductor_config.autotune_local_cache = True
    functorch_config.enable_autograd_cache = True
    return path


def record() -> dict:
    """What a result's fingerprint says of compilation: the cache directory in use (None: torch's default,
    nothing configured) and this process's cache hits and misses so far."""
    return {"dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
            **{name: counters[group][name] for group, name in COUNTERS}}


def compiled(step):
    """`step` compiled for fixed shapes, under the recompile limit above."""
    step = torch.compile(step, dynamic=False)

    def call(*args):
        # The limit is read when a call misses every compiled entry, so it must hold around the calls.
        with torch._dynamo.config.patch(recompile_limit=MAX_SHAPES, fail_on_recompile_limit_hit=True):
            return step(*args)
    return call
