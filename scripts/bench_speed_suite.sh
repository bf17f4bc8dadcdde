#!/usr/bin/env bash
# Every measurement issue 17 asks for, on one GPU, in priority order, then the probes of what its profile
# points at; each step under the call's deadline (a step that would not fit is skipped with a line, never
# cut mid-JSON):
#
#   scripts/bench_speed_suite.sh ANCHOR_PY OUT_DIR [SECONDS]      # default 560 s: a device call's 600 s less slack
#   STEPS="recompute bench_4096 bench_gqa compile_cache" scripts/bench_speed_suite.sh ...   # the anchor, then these, in this order
#   STEPS="bench_2048 gemv_no_lt gemv_cdt recompute_compile" scripts/bench_speed_suite.sh ...   # the probes
#   STEPS="cuda_tests bench_gemv profile_gemv gemv_kernels" scripts/bench_speed_suite.sh ...   # the Triton GEMV
#
# ANCHOR_PY is the workplace's hf_anchor.py; it runs in every call (the ratios divide by its floor, so they
# only compare numbers of one call). The steps need about 13 minutes, so two calls; the probes a
# third. cuda_tests needs pytest, hypothesis and submitit importable (tests/conftest.py imports the CLI; on
# a machine without them, carry their wheels: the workplace's GPU image lacks submitit).
# Writes OUT_DIR/{anchor,bench_decode,profile_recompute,profile_recompute_compiled,bench_steps2048,probe_attention,bench_multi_kernel,
# bench_cooperative,bench_4096,bench_gqa,bench_recompute,bench_recompute_compiled,bench_recompute_autotune,compile_cache,compile_cache_torch,profile,bench_gemv,
# profile_gemv,profile_cuts,bench_gemv_fused,bench_flash,bench_decode_cuts,bench_combo_kernels,bench_cdt,bench_no_lt,probe_gemv,probe_recompute_compile}.json and OUT_DIR/log.txt;
# docs/bench/README.md ("Speed to the limit") says what each file shows.
set -uo pipefail
anchor_py=${1:?usage: bench_speed_suite.sh ANCHOR_PY OUT_DIR [SECONDS]}
out=${2:?usage: bench_speed_suite.sh ANCHOR_PY OUT_DIR [SECONDS]}
end=$(( $(date +%s) + ${3:-560} ))
mkdir -p "$out"
log=$out/log.txt
export PYTHONUNBUFFERED=1

# Steps are declared below in the full suite's order and run at the end: without STEPS all of them, in that
# order; with STEPS the anchor, then the named ones in the order STEPS names them, so that a call's
# most decisive step runs first whatever its place here (a name that is not a step is refused before
# anything runs: on a lent GPU a typo would otherwise cost the call).
declare -a order=()
declare -A need=() command=()
step() {   # step NAME SECONDS COMMAND...: SECONDS is what the step needs; skipped if less is left then
    local name=$1
    need[$name]=$2
    shift 2
    command[$name]=$(printf '%q ' "$@")
    order+=("$name")
}

run_step() {
    local name=$1 left=$(( end - $(date +%s) - 5 ))
    if (( left < need[$name] )); then
        echo "== $name: skipped (needs ${need[$name]}s, ${left}s left)" | tee -a "$log"
        return
    fi
    echo "== $name: ${command[$name]}" | tee -a "$log"
    local began=$(date +%s)
    eval "timeout $left ${command[$name]}" >>"$log" 2>&1
    echo "== $name: exit $? after $(( $(date +%s) - began ))s" | tee -a "$log"
}

step anchor 70 python3 "$anchor_py" --out "$out/anchor.json"
# The goal: fast (SDPA) strict and lazy R=64 at cap 2048, against the anchor's floor.
step bench_2048 150 python3 scripts/bench_decode.py --engines fast \
    --stability-runs 1 --repeats 3 --anchor "$out/anchor.json" --out "$out/bench_decode.json"
# The batched baseline beside the anchor's recompute_ms.
step recompute 60 python3 scripts/bench_decode.py --engines '' --recompute-batches 1,16,32 --steps 64 \
    --repeats 3 --anchor "$out/anchor.json" --out "$out/bench_recompute.json"
# The engine's compiled forward (one compile, the last batch padded) beside eager at the paper's batch size:
# the compiled profile (stop 29) had its attention masked; it runs without a mask now (UNMASKED_SDPA).
step recompute_compiled 150 python3 scripts/bench_decode.py --engines '' --recompute-batches 16 \
    --recompute-compile --steps 64 --repeats 3 --anchor "$out/anchor.json" --out "$out/bench_recompute_compiled.json"
# The same with Inductor's max-autotune: its Triton GEMM templates against cuBLAS per shape, and where a
# template wins, the element-wise work after it (bias, GELU, residual adds) fused into its epilogue, which
# cuBLAS cannot take exactly (cuBLASLt's GELU epilogue is the tanh approximation). The compiled forward's
# element-wise work was 3.1 ms of 25.8 (stop 29); 18 ms a token needs most of it gone. A probe: autotuning
# every GEMM shape takes minutes, so a call of its own.
step recompute_autotune 420 python3 scripts/bench_decode.py --engines '' --recompute-batches 16 \
    --recompute-compile --steps 64 --repeats 3 --inductor max_autotune=1 --anchor "$out/anchor.json" \
    --out "$out/bench_recompute_autotune.json"
step cuda_tests 240 python3 -m pytest -q -p no:cacheprovider tests/test_flash_decode.py tests/test_gemv.py tests/test_gemv_fusion.py \
    tests/test_fast.py tests/test_recompute.py tests/test_compile.py tests/test_score_policies.py \
    -k "cuda or flash_decode or gemv"
# Where the step's time goes, per kernel kind against its byte floor (the first thing a second call runs).
# SDPA, the CUDA default: flash measured slower on an H100 (docs/bench/README.md); the profile times both alone.
step profile 80 python3 scripts/profile_decode.py --out "$out/profile.json"
# Not tuned to one shape: cap 4096, and a grouped-query model.
step bench_4096 140 python3 scripts/bench_decode.py --engines fast --cap 4096 \
    --stability-runs 1 --repeats 3 --anchor "$out/anchor.json" --out "$out/bench_4096.json"
step bench_gqa 140 python3 scripts/bench_decode.py --engines fast \
    --config scripts/configs/llama-3.2-3b-shape.json --stability-runs 1 --repeats 3 \
    --anchor "$out/anchor.json" --out "$out/bench_gqa.json"
step compile_cache 150 python3 scripts/bench_compile_cache.py --processes 2 --out "$out/compile_cache.json"
# The same with cuBLAS's linears: what the Triton GEMV's 129 custom-operator calls add to the first process.
step compile_cache_torch 150 python3 scripts/bench_compile_cache.py --processes 2 --engine fast:linear=torch \
    --out "$out/compile_cache_torch.json"
# Probes of what the profile points at (docs/bench/README.md, issue 17), each beside bench_2048 of the same
# call: the triton split-KV attention (slower than SDPA on an H100, untimed on an H200); Inductor's
# coordinate-descent tuning (with it, Inductor decomposes a one-row mm into a tuned multiply-and-sum:
# gpt-fast's route to its GEMVs; Pythia's linears have biases, and torch 2.13 keeps an fp16 addmm whole
# unless keep_addmm_fused_for_half_dtypes is off, a key the device machines' torch 2.11 does not have, so the
# probe sets only the first); addmm without cuBLASLt, whose nvjet kernels run the step's GEMVs
# at 1.26x their floor on an H100 (aten then calls cuBLAS's plain GEMM, which may pick its GEMV kernels);
# the recompute forward compiled. The GEMV probe most likely to pay runs first.
# The Triton GEMV (engines/gemv.py), the CUDA default since stop 29 (241 µs a step off cuBLAS's on an H100),
# beside cuBLAS in the same process; then the step's profile with cuBLAS.
step bench_gemv 250 python3 scripts/bench_decode.py --engines fast,fast:linear=torch --stability-runs 1 \
    --repeats 3 --anchor "$out/anchor.json" --out "$out/bench_gemv.json"
# The GEMV with the MLP's activation in its epilogue (GELU: one kernel a layer less), then also with the layer
# norms in its prologue and the residual sums in its epilogue (no reduction kernel left in a layer: it took
# 3.5 µs a layer), beside the default: which of the folds pays.
step gemv_fused 330 python3 scripts/bench_decode.py --engines fast,fast:linear=triton_activation,fast:linear=triton_fused \
    --stability-runs 1 --repeats 3 --anchor "$out/anchor.json" --out "$out/bench_gemv_fused.json"
# The cuts at once (the GEMV with what it folds in, and the one-kernel flash), each alone, beside the
# default; every engine's NLL against the first's in the JSON (agreement_with_first), so a race in flash would show.
step decode_cuts 480 python3 scripts/bench_decode.py \
    --engines fast,fast:linear=triton_fused,fast:decode_attention=flash,fast:linear=triton_fused,decode_attention=flash \
    --stability-runs 1 --repeats 3 --anchor "$out/anchor.json" --out "$out/bench_decode_cuts.json"
# Where the step's time goes with both cuts (and a layer's K/V written by one scatter since stop 30): whether
# the layer-norm kernels are gone, and what the GEMVs pay for them.
step profile_cuts 80 python3 scripts/profile_decode.py --linear triton_fused --decode-attention flash \
    --out "$out/profile_cuts.json"
step profile_gemv 80 python3 scripts/profile_decode.py --linear torch --out "$out/profile_gemv.json"
step flash 150 python3 scripts/bench_decode.py --engines fast:decode_attention=flash --stability-runs 1 \
    --repeats 3 --anchor "$out/anchor.json" --out "$out/bench_flash.json"
step gemv_cdt 200 python3 scripts/bench_decode.py --engines fast --stability-runs 1 --repeats 3 \
    --inductor coordinate_descent_tuning=1 \
    --anchor "$out/anchor.json" --out "$out/bench_cdt.json"
step gemv_no_lt 150 env DISABLE_ADDMM_CUDA_LT=1 python3 scripts/bench_decode.py --engines fast \
    --stability-runs 1 --repeats 3 --anchor "$out/anchor.json" --out "$out/bench_no_lt.json"
# The step's layer norms (the residual add and both of GPT-NeoX's norms over 2560 features, one row) run as
# looped one-program reductions, 3.5 µs each, 30 a step (h100_profile_step_sdpa.json): Inductor makes a
# reduction persistent only up to 1024 features, 16x that with multi_kernel (which benchmarks both), and
# cooperative reductions split one row over several blocks.
step norms_multi_kernel 150 python3 scripts/bench_decode.py --engines fast --stability-runs 1 --repeats 3 \
    --inductor triton.multi_kernel=1 --anchor "$out/anchor.json" --out "$out/bench_multi_kernel.json"
step norms_cooperative 150 python3 scripts/bench_decode.py --engines fast --stability-runs 1 --repeats 3 \
    --inductor triton.cooperative_reductions=1 --anchor "$out/anchor.json" --out "$out/bench_cooperative.json"
# Inductor's combo kernels launch independent kernels of one graph as one (horizontal fusion): a layer's
# query rotation, its K/V scatter and its layer norms are such kernels, 1.3-3.5 µs each on an H100.
step combo_kernels 150 python3 scripts/bench_decode.py --engines fast --stability-runs 1 --repeats 3 \
    --inductor combo_kernels=1 --anchor "$out/anchor.json" --out "$out/bench_combo_kernels.json"
# The paper profile times each point on 512 decoded tokens (profiles.PAPER.timing_tokens); TPOT at 2048,
# beside bench_gemv's `fast` row (512 steps, same call), says whether the shorter run changes the figure.
step timing_length 150 python3 scripts/bench_decode.py --engines fast --steps 2048 --stability-runs 1 \
    --repeats 3 --anchor "$out/anchor.json" --out "$out/bench_steps2048.json"
# Where the recompute baseline's forward spends its time, per kernel kind, against the card's GEMM rate.
step profile_recompute 90 python3 scripts/profile_recompute.py --batch 16 --out "$out/profile_recompute.json"
# The same forward compiled (stop 26: slower than eager, 26.2 against 23.9 ms a window): which kernels lose.
step profile_recompute_compiled 120 python3 scripts/profile_recompute.py --batch 16 --compiled \
    --out "$out/profile_recompute_compiled.json"
# Per decode shape, SDPA against flash_decode at every launch tile of probe_attention.py's grid.
step attention_kernels 200 python3 scripts/probe_attention.py --out "$out/probe_attention.json"
# Per linear shape, cuBLAS against Inductor's GEMV and a Triton GEMV of our own, each against its byte floor;
# for the two a layer norm feeds, the engine's tile with the norm inside against the norm alone.
step gemv_kernels 180 python3 scripts/probe_gemv.py --out "$out/probe_gemv.json"
step recompute_compile 200 python3 scripts/probe_recompute_compile.py --batch 32 --repeats 3 \
    --out "$out/probe_recompute_compile.json"

chosen=("${order[@]}")
if [[ -n "${STEPS:-}" ]]; then
    chosen=(anchor)
    for name in $STEPS; do
        if [[ -z "${need[$name]:-}" ]]; then
            echo "bench_speed_suite.sh: no step $name; the steps: ${order[*]}" >&2
            exit 2
        fi
        [[ $name == anchor ]] || chosen+=("$name")
    done
fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee -a "$log"
for name in "${chosen[@]}"; do
    run_step "$name"
done
