"""Named profiles as data: `demo` (embedded tiny model, CPU, minutes), `paper` (Pythia-2.8B, CUDA) and
`paper-random` (the paper's points on CUDA with random weights and short synthetic streams: timing only) and
`paper-random-full` (the same on synthetic streams of the paper's lengths: what `make paper` costs on a GPU).

A profile fixes the model, device, KV budget, datasets, the main knobs, the sweep grids, the baseline's
recorded S/W and the ablation ladder; `resolve(settings)` applies the seed guide's knobs on top.

Every point spends the same budget through auto-cap (W = CAP_TOTAL − S − σ − O − B), so strict and lazy
differ in R alone. Sweeps vary one knob around the main lazy point:
- R sweep: R = v (σ, δ at the main values);
- σ sweep: σ = v, so W shrinks by v;
- δ sweep: σ = R and δ = v. Deliberate: δ is inert for every σ < R (the prune target is capped at
  safe = hard − (R − 1) = soft + σ − R + 1, which is ≤ soft, i.e. the δ = 0 target, unless σ ≥ R; and the
  cooldown only skips prunes with L ≤ hard, while a prune needs L ≥ soft + R). At the main σ = 0 every δ
  would reproduce the same numbers; DESIGN.md's "with R = 64, δ changes nothing unless σ ≥ 63" is that
  bound, loose by one.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from . import assets, fetch, policies
from .confined import shown
from .policies import PolicySpec
from .settings import Settings, SettingsError
from .spec import ModelSpec, SpecError


SYNTHETIC = "synthetic"
PYDOC = "pydoc_data.topics"       # the demo model's training and evaluation text, shipped with Python
# A swept knob as slot labels name it -> as the paper prints it.
SWEEP_SYMBOLS = {"R": "R", "sigma": "σ", "delta": "δ"}


def _data(relative: str) -> str:
    return f"data/{relative}"


@dataclass(frozen=True)
class Dataset:
    name: str
    display: str         # as the tables print it
    path: str            # stream file, relative to the repository root
    max_tokens: int      # evaluation length (the seed's --max-eval-tokens)
    source: str = ""     # where the text comes from, as the paper names it
    cite: str | None = None   # bibliography key of the dataset's paper (NeurIPS/references.bib), if any


@dataclass(frozen=True)
class Variant:
    """One point relative to the main lazy point: knob overrides (auto-capped) and engine switches."""

    label: str
    display: str
    knobs: tuple[tuple[str, int], ...] = ()
    position_mode: str = "cache"
    rerotation: str = "exact"
    # Lazy pruning lets a query see soft + R keys where strict sees soft + 1 (Pythia: 2112 vs 2049, past
    # its 2048 training length). Shrinking W by R − 1 removes that confound: the cache never holds more
    # than the budget, at the price of a smaller recent window.
    window_matched: bool = False
    value: int | None = None        # a sweep point's value of its swept knob
    policy: str = PolicySpec.NAME   # the policy unit (streamkv.policies.REGISTRY) the knobs are for


@dataclass(frozen=True)
class Profile:
    name: str
    model_display: str
    dtype: str
    device: str
    cap_total: int
    long: Dataset                   # main results, ablations and sweeps
    short: Dataset                  # main results only
    n_sink: int
    strict_r: int
    lazy_r: int
    cache_slack: int
    max_drop: int
    sweep_r: tuple[int, ...]
    sweep_sigma: tuple[int, ...]
    sweep_delta: tuple[int, ...]
    baseline_sink: int              # the recompute baseline only needs its cap S + W; S/W are recorded
    baseline_window: int            # as the seed did (4 + 2044 = 2048)
    # Preferred perplexity engine; a stage falls back to plans.FALLBACK where it cannot realise the point,
    # and records the engine it used in the spec.
    perplexity_engine: str
    # Decode steps timed when perplexity comes from another engine (MeasureSpec.timing_tokens).
    timing_tokens: int
    model: ModelSpec | None = None  # set by resolve(): the demo's revision is read from data/demo/
    # Weights drawn from a fixed seed (ModelSpec.random_weights, so in every config_hash): such a profile's
    # perplexities are meaningless and its PDF says "random weights: timing only" on the title page.
    random_weights: bool = False

    @property
    def datasets(self) -> tuple[Dataset, Dataset]:
        return (self.long, self.short)

    def dataset(self, name: str, *, vocab_size: int | None = None) -> Dataset:
        """A dataset of the profile; `synthetic` (seeded random ids over `vocab_size`, as long as the long
        dataset) is offered for random-weights timing runs, which need no text and no tokenizer."""
        for d in self.datasets:
            if d.name == name:
                return d
        if name == SYNTHETIC and vocab_size is not None:
            return Dataset(SYNTHETIC, "synthetic stream", assets.synthetic_path(0, vocab_size), self.long.max_tokens)
        raise SpecError(f"profile {self.name} has no dataset {shown(name)}; choose one of "
                        f"{', '.join(d.name for d in self.datasets)}, or {SYNTHETIC} with --random-weights")

    def policy(self, variant: Variant):
        """The variant's policy unit at the profile's budget (auto-cap), its knobs defaulting to the main
        lazy point's where the policy has them."""
        unit = policies.get(variant.policy)
        main = {"n_sink": self.n_sink, "compress_every": self.lazy_r, "cache_slack": self.cache_slack,
                "max_drop": self.max_drop}
        own = {f.name for f in dataclasses.fields(unit)}
        knobs = {**{k: v for k, v in main.items() if k in own}, **dict(variant.knobs)}
        policy = unit.auto_cap(self.cap_total, **knobs)
        if not variant.window_matched:
            return policy
        window = policy.window - max(0, policy.compress_every - 1)
        if window <= 0:
            raise SpecError(f"{variant.label}: window {policy.window} − (R − 1) leaves {window} <= 0")
        return dataclasses.replace(policy, window=window)

    def baseline_policy(self) -> PolicySpec:
        return PolicySpec(n_sink=self.baseline_sink, window=self.baseline_window)

    def main_variants(self) -> tuple[Variant, Variant]:
        return (Variant("strict", f"Start+Recent (R = {self.strict_r})", (("compress_every", self.strict_r),)),
                Variant("lazy", f"Lazy Pruning (R = {self.lazy_r})"))

    def engine_variants(self) -> tuple[Variant, ...]:
        """The bench's engine comparison: no eviction (R = 0, the cache grows from C), then the main points."""
        return (Variant("no_eviction", "No eviction (R = 0)", (("compress_every", 0),)),) + self.main_variants()

    def ablations(self, quality: bool) -> tuple[Variant, ...]:
        r = self.lazy_r
        ladder = self.main_variants() + (
            Variant("lazy_window_matched", f"Lazy, window matched (W − {r - 1})", window_matched=True),
            Variant("lazy_absolute", "Lazy, absolute positions", position_mode="absolute"),
            Variant("lazy_composed_fp16", "Lazy, composed fp16 re-rotation", rerotation="composed_fp16"),
            Variant("lazy_no_sink", "Lazy, no sink tokens (S=0)", (("n_sink", 0),)),
        )
        # Score-based policies at the same budget and R, half of what sinks leave chosen by score (H2O's
        # heavy/recent split), decoded by the decode engine (the one that hands them the attention).
        heavy = (self.cap_total - self.n_sink) // 2
        ladder += tuple(Variant(name, f"{display}, lazy (R = {r}, {heavy} scored slots)", (("heavy", heavy),),
                                policy=name) for name, display in (("h2o", "H2O"), ("tova", "TOVA")))
        if quality:
            ladder += (
                Variant("lazy_slack", f"Lazy + slack (σ={r // 2})", (("cache_slack", r // 2),)),
                Variant("lazy_slack_maxdrop", f"Lazy + slack + max drop (σ={r}, δ={r // 2})",
                        (("cache_slack", r), ("max_drop", r // 2))),
            )
        return ladder

    def sweeps(self, quality: bool) -> dict[str, tuple[Variant, ...]]:
        """Sweep name -> points; the slot label is `{name}={value}`."""
        grids = {"R": [(v, (("compress_every", v),)) for v in self.sweep_r]}
        if quality:
            grids["sigma"] = [(v, (("cache_slack", v),)) for v in self.sweep_sigma]
            grids["delta"] = [(v, (("cache_slack", self.lazy_r), ("max_drop", v))) for v in self.sweep_delta]
        return {name: tuple(Variant(f"{name}={v}", f"{SWEEP_SYMBOLS[name]} = {v}", knobs, value=v)
                            for v, knobs in points)
                for name, points in grids.items()}


PAPER = Profile(
    name="paper",
    model_display="Pythia-2.8B",
    dtype="float16",
    device="cuda",
    cap_total=2048,
    # The streams `streamkv fetch` writes; PG19 is evaluated on its first 20k tokens (the seed's
    # --max-eval-tokens=20000), WikiText on the whole sample.
    long=Dataset("pg19", "PG19", _data(fetch.pg19_file(fetch.PG19_SAMPLE_LENGTH)), 20000,
                 source="one PG19 test book", cite="rae2020compressive"),
    short=Dataset("wikitext", "WikiText-103", _data(fetch.wikitext_file(fetch.WIKITEXT_SAMPLE_LENGTH)),
                  fetch.WIKITEXT_SAMPLE_LENGTH, source="one WikiText-103 test article", cite="merity2017pointer"),
    n_sink=32, strict_r=1, lazy_r=64, cache_slack=0, max_drop=0,
    sweep_r=(1, 16, 32, 64, 128), sweep_sigma=(0, 16, 32), sweep_delta=(0, 16, 32),
    baseline_sink=4, baseline_window=2044,
    # TPOT is a mean over steps at a full cache (the prefill fills it), so it needs enough steps to hold
    # whole prune periods, not the whole stream: 512 is four periods of the largest R swept and the
    # bench's default decode length (MIT_BENCH_GEN_TOKENS). At 2048 the timing was most of a point's time
    # (the decode-timed ablations: about 3 minutes each on an H100, stop 27).
    perplexity_engine="parallel", timing_tokens=512,
)

DEMO = Profile(
    name="demo",
    model_display="tiny GPT-NeoX (demo)",
    dtype="float32",
    device="cpu",
    cap_total=256,
    long=Dataset("demo-long", "demo-long", "data/demo/streams/demo-long.json", 4096,
                 source=f"held-out topics of Python's pydoc documentation, {PYDOC}"),
    short=Dataset("demo-short", "demo-short", "data/demo/streams/demo-short.json", 1024,
                  source=f"held-out topics of Python's pydoc documentation, {PYDOC}"),
    n_sink=4, strict_r=1, lazy_r=16, cache_slack=0, max_drop=0,
    sweep_r=(1, 4, 8, 16, 32), sweep_sigma=(0, 8, 16), sweep_delta=(0, 8, 16),
    baseline_sink=4, baseline_window=252,
    perplexity_engine="parallel", timing_tokens=256,
)

# The paper's stages, points and cap on CUDA, end to end in minutes and with no asset: the Pythia-2.8B
# architecture with random fp16 weights (its bundled config), seeded random token ids for both streams.
# resolve() sets the streams' vocabulary and lengths: the cap's prefill plus SYNTHETIC_DECODE tokens, so
# every point still prunes (lazy R = 128 twice on the long stream) while the composed-fp16 ablation
# and the bench's HF decodes, which pay ~20 ms a token, stay short. Speed equals the real weights'.
PAPER_RANDOM = dataclasses.replace(
    PAPER, name="paper-random", model_display="Pythia-2.8B (random weights)", random_weights=True,
    long=Dataset("synthetic-long", "Synthetic (long)", "", 0, source="seeded random token ids"),
    short=Dataset("synthetic-short", "Synthetic (short)", "", 0, source="seeded random token ids"),
)
SYNTHETIC_DECODE = {"synthetic-long": 256, "synthetic-short": 128}   # decoded tokens after the prefill
# The same at the paper's stream lengths (PG19's 20 000 evaluated tokens, WikiText's 4096): what `make paper`
# costs on a GPU with the real weights, measurable where they cannot be downloaded. About 21 minutes on one
# GPU (README), so on the device tool it runs over several calls: scripts/bench_paper_e2e.py --deadline, --resume.
PAPER_RANDOM_FULL = dataclasses.replace(
    PAPER_RANDOM, name="paper-random-full",
    long=Dataset("synthetic-pg19-length", "Synthetic (PG19's length)", "", PAPER.long.max_tokens,
                 source="seeded random token ids"),
    short=Dataset("synthetic-wikitext-length", "Synthetic (WikiText's length)", "", PAPER.short.max_tokens,
                  source="seeded random token ids"),
)
SYNTHETIC_SEED = {"synthetic-long": 1, "synthetic-short": 2, "synthetic-pg19-length": 3,
                  "synthetic-wikitext-length": 4}

PROFILES = {p.name: p for p in (DEMO, PAPER, PAPER_RANDOM, PAPER_RANDOM_FULL)}


def resolve(settings: Settings) -> Profile:
    """The profile named by the settings, with the guide's knobs applied on top."""
    if settings.profile not in PROFILES:
        raise SettingsError(f"unknown profile {settings.profile!r} (STREAMKV_PROFILE / --profile); "
                            f"choose one of {', '.join(PROFILES)}")
    p = PROFILES[settings.profile]
    cap = settings.cap_total or p.cap_total
    sink = p.baseline_sink if settings.baseline_sink is None else settings.baseline_sink
    changes = dict(
        cap_total=cap,
        baseline_sink=sink,
        # The baseline's cap follows CAP_TOTAL unless BASELINE_WINDOW pins it.
        baseline_window=settings.baseline_window or cap - sink,
        sweep_r=settings.sweep_r_values or p.sweep_r,
        sweep_sigma=settings.sweep_sigma_values or p.sweep_sigma,
        sweep_delta=settings.sweep_delta_values or p.sweep_delta,
    )
    if p is DEMO:
        # The committed checkpoint, pinned by the sha256 recorded when it was trained.
        changes["model"] = assets.demo_model_spec(p.dtype)
    elif p.random_weights:
        model = _paper_model(settings, p, changes)
        vocab = assets.vocab_size(model)
        # paper-random's streams follow the cap; paper-random-full's have the paper's lengths.
        changes.update({which: dataclasses.replace(
            d, path=assets.synthetic_path(SYNTHETIC_SEED[d.name], vocab),
            max_tokens=cap + SYNTHETIC_DECODE[d.name] if d.name in SYNTHETIC_DECODE else d.max_tokens)
            for which, d in (("long", p.long), ("short", p.short))})
    else:
        # The guide's model and sample knobs name the paper's assets; the demo's ship with the repository
        # and ignore them (so the guide's .env, MODEL_NAME=EleutherAI/pythia-2.8b, works with both).
        _paper_model(settings, p, changes)
        pg19_len = settings.pg19_sample_length or fetch.PG19_SAMPLE_LENGTH
        wiki_len = settings.wikitext_sample_length or fetch.WIKITEXT_SAMPLE_LENGTH
        pg19_path = settings.pg19_sample_file or _data(fetch.pg19_file(pg19_len))
        changes["long"] = dataclasses.replace(p.long, path=pg19_path)
        changes["short"] = dataclasses.replace(p.short, path=_data(fetch.wikitext_file(wiki_len)), max_tokens=wiki_len)
    if changes["baseline_window"] <= 0:
        raise SettingsError(f"baseline window CAP_TOTAL − BASELINE_SINK = {changes['baseline_window']} <= 0")
    return dataclasses.replace(p, **changes)


def _paper_model(settings: Settings, p: Profile, changes: dict) -> ModelSpec:
    """The paper's model into `changes`: the pinned commit `streamkv fetch` downloads (the image may pin
    another via its build arg), or MODEL_NAME's."""
    changes["model"] = ModelSpec(name=fetch.PYTHIA_REPO, revision=fetch.pinned_revision(), dtype=p.dtype)
    if settings.model_name and settings.model_name != fetch.PYTHIA_REPO:
        changes["model"] = _model_from_name(settings.model_name, p.dtype)
        changes["model_display"] = settings.model_name
    return changes["model"]


# A Hugging Face repository id, as huggingface_hub validates it (a path such as /no/such/dir is not one).
_HUB_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}")


def _model_from_name(name: str, dtype: str) -> ModelSpec:
    """MODEL_NAME: a local checkpoint directory (pinned by its weights' sha256) or `hub/id@<revision>`."""
    local = Path(name) if Path(name).is_absolute() else assets.REPO / name
    if (local / "model.safetensors").is_file():
        return ModelSpec(name=name, revision=assets.sha256_file(local / "model.safetensors"), dtype=dtype)
    hub_id, _, revision = name.partition("@")
    if not revision or not _HUB_ID.fullmatch(hub_id) or ".." in hub_id or "--" in hub_id:
        raise SettingsError(f"MODEL_NAME={shown(name)} is neither a local checkpoint directory (with "
                            "model.safetensors) nor pinned as hub/id@<revision>: results must name the exact weights")
    return ModelSpec(name=hub_id, revision=revision, dtype=dtype)
