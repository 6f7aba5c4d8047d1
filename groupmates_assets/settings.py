"""Every constant of the method in one place, and one named profile per scale.

`METHOD` holds the constants of Group-MATES and of the DCLM recipe it starts from (see the method
specification); profiles choose the sizes that fit a machine: ``demo`` runs on 2 CPU cores, ``dclm-400m``
is the paper's 400M-4x setting on a GPU cluster. Assets record the resolved values in their metadata.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from groupmates_assets.lib.quality import FastTextRecipe


# -- validation: an out-of-range value fails when the profile is built, naming the field, not deep inside the
# step that first uses it (or, worse, silently: a zero count that makes a stage do nothing).
def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _at_least(section: str, minimum: int, **values: Any) -> None:
    """Counts: whole numbers of at least ``minimum``."""
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"{section}.{name} must be a whole number >= {minimum}, got {value!r}")


def _optional_at_least(section: str, minimum: int, **values: Any) -> None:
    _at_least(section, minimum, **{name: value for name, value in values.items() if value is not None})


def _in_range(name: str, value: Any, low: float, high: float, closed: str = "right") -> None:
    """``value`` in the interval from ``low`` to ``high``; ``closed``: "right" (low, high], "left" [low, high),
    "both" or "neither". NaN is in no interval."""
    left, right = closed in ("left", "both"), closed in ("right", "both")
    inside = _number(value) and (low <= value if left else low < value) and (value <= high if right else value < high)
    if not inside:
        interval = f"{'[' if left else '('}{low:g}, {high:g}{']' if right else ')'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")


def _positive(section: str, **values: Any) -> None:
    for name, value in values.items():
        _in_range(f"{section}.{name}", value, 0, float("inf"), "neither")


def _non_negative(section: str, **values: Any) -> None:
    for name, value in values.items():
        _in_range(f"{section}.{name}", value, 0, float("inf"), "left")


def _one_of(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


@dataclass(frozen=True)
class MethodConstants:
    # Stage 0: DCLM fastText filter.
    dclm_fasttext_threshold: float = 0.018112  # keep iff P(hq) >= this, with DCLM's OH-2.5+ELI5 model
    dclm_fasttext_model: str = "openhermes_reddit_eli5_vs_rw_v2_bigram_200k_train.bin"
    # Stage 1: tokenize/shuffle.
    tokenizer: str = "EleutherAI/gpt-neox-20b"
    context_tokens: int = 2049  # seq_len + 1 per packed context
    # Oracle trajectories.
    trajectory_length: int = 10
    reference_examples: int = 128
    # Relational model and bootstrap.
    bootstrap_width: int = 5
    alpha_init: float = 1.0
    tau_init: float = 1.0
    encoder_chunks: int = 4
    encoder_chunk_tokens: int = 512
    # Selection.
    selection_ratio: float = 0.5
    kmeans_centroids: int = 10_000
    kmeans_iterations: int = 100
    kmeans_seed: int = 1234
    # Report: paired intervals of each method's difference from random (lib.stats; recorded in the report).
    interval_confidence: float = 0.95
    bootstrap_resamples: int = 2000
    bootstrap_seed: int = 0

    def intervals(self):  # -> lib.stats.BootstrapSpec (imported here only: scipy is slow to import)
        """The report's interval settings as the spec lib.stats and lib.report take."""
        from groupmates_assets.lib.stats import BootstrapSpec

        return BootstrapSpec(self.bootstrap_resamples, self.interval_confidence, self.bootstrap_seed)


METHOD = MethodConstants()


@dataclass(frozen=True)
class PoolProfile:
    embedded_shards: int = 16  # shards of the embedded default pool
    embedded_positives_fraction: float = 0.4  # share of Wikipedia summaries held out as classifier positives
    group_field: str | None = "source"  # record field reported per group (keep rates by source)
    shards_per_run: int = 8  # shards one backfill run of a per-shard stage handles (fewer process and model loads)
    # share of every source set aside before filtering for held-out bits per byte (lib.heldout; 0: none). The
    # embedded pool's 42,662 documents give about 850.
    heldout_fraction: float = 0.02

    def __post_init__(self) -> None:
        _at_least("pool", 1, embedded_shards=self.embedded_shards, shards_per_run=self.shards_per_run)
        _in_range("pool.heldout_fraction", self.heldout_fraction, 0, 0.5, "left")
        _in_range("pool.embedded_positives_fraction", self.embedded_positives_fraction, 0, 1, "neither")


@dataclass(frozen=True)
class QualityProfile:
    model_path: str | None = None  # a supplied fastText .bin (path, URL, or relative to the storage root)
    hq_label: str | None = None  # label of the high-quality class in a user-supplied model
    threshold: float | None = None  # keep iff P(hq) >= threshold ...
    keep_fraction: float | None = 0.5  # ... or derive the threshold that keeps this share of a pool sample
    positives_path: str | None = None  # None: the embedded pool's held-out Wikipedia summaries
    max_positives: int = 200_000
    negatives_per_positive: float = 1.0
    negative_sample_shards: int = 64  # negatives come from at most this many shards, evenly spread
    heldout_fraction: float = 0.2
    recipe: FastTextRecipe = field(default_factory=FastTextRecipe)
    batch_size: int = 8192

    def __post_init__(self) -> None:
        if self.model_path is not None and (not isinstance(self.model_path, str) or not self.model_path.strip()):
            raise ValueError(f"quality.model_path must be a path, URL or None, got {self.model_path!r}")
        if self.threshold is None and self.keep_fraction is None:
            raise ValueError("quality needs a threshold or a keep_fraction, got neither")
        if self.threshold is not None:
            _in_range("quality.threshold", self.threshold, 0, 1, "both")
        if self.keep_fraction is not None:
            _in_range("quality.keep_fraction", self.keep_fraction, 0, 1)
        _at_least("quality", 1, max_positives=self.max_positives, negative_sample_shards=self.negative_sample_shards,
                  batch_size=self.batch_size)
        _positive("quality", negatives_per_positive=self.negatives_per_positive)
        _in_range("quality.heldout_fraction", self.heldout_fraction, 0, 1, "neither")
        recipe = self.recipe
        _at_least("quality.recipe", 1, word_ngrams=recipe.word_ngrams, dim=recipe.dim, epoch=recipe.epoch,
                  min_count=recipe.min_count, threads=recipe.threads)
        _at_least("quality.recipe", 0, bucket=recipe.bucket)
        _positive("quality.recipe", lr=recipe.lr)


@dataclass(frozen=True)
class TokenizeProfile:
    tokenizer: str | None = None  # None: GPT-NeoX-20B from a registry package; else a tokenizer.json or hub name
    num_local_cells: int = 512  # DCLM tokshuf: contexts are spread over this many cells before shuffling
    seed: int = 1234  # DCLM tokshuf default
    batch_size: int = 1024  # documents per encode_batch call

    def __post_init__(self) -> None:
        _at_least("tokenize", 1, num_local_cells=self.num_local_cells, batch_size=self.batch_size)


@dataclass(frozen=True)
class LMProfile:
    """The proxy LM pretrained on the filtered pool, and where along its run the probe checkpoint sits."""

    shape: str = "demo"  # a key of lib.lm.LM_SHAPES
    total_steps: int = 150  # the full pretraining run's length (the probe is taken part-way through)
    probe_fraction: float = 0.4  # paper: the run being pretrained, about 40% in (DCLM epoch_2 of 5)
    batch_size: int = 4  # sequences per optimizer step
    lr: float = 3e-3
    final_lr: float = 3e-5  # cosine cool-down end
    warmup_steps: int = 15
    weight_decay: float = 0.033
    seed: int = 124
    torch_threads: int = 2

    def __post_init__(self) -> None:
        _at_least("lm", 1, total_steps=self.total_steps, batch_size=self.batch_size, torch_threads=self.torch_threads)
        _at_least("lm", 0, warmup_steps=self.warmup_steps)
        _in_range("lm.probe_fraction", self.probe_fraction, 0, 1, "neither")
        _positive("lm", lr=self.lr)
        _non_negative("lm", final_lr=self.final_lr, weight_decay=self.weight_decay)

    @property
    def probe_steps(self) -> int:
        """Optimizer steps of stage 1: the run up to the probe checkpoint."""
        return max(1, round(self.probe_fraction * self.total_steps))


@dataclass(frozen=True)
class OracleProfile:
    reference_source: str = "nq_open"  # instruction-style QA, disjoint from the evaluation tasks
    reference_size: int = 128  # METHOD.reference_examples
    probe_pool_size: int = 2048  # contexts trajectories draw from (paper: 81,920 = 10 x 8,192)
    blocks: int = 4  # partitions of trajectories (paper: 4 seeds)
    trajectories_per_block: int = 5  # paper: 5,000
    part_size: int = 1  # trajectories written per atomic part (resume granularity)
    workers: int = 1  # replica processes per block, each with its own model + optimizer (GPU: several per card)
    seed: int = 0
    bootstrap_blocks: int = 2  # partitions of bootstrap trajectories (paper: 4 seeds, 2 per tail)
    replay_per_block: int = 1  # trajectories per block replayed from the checkpoint by `labels_consistent` (T8)
    # Nats the replayed losses may differ from the stored ones. On a CPU the replay takes the block's own code path,
    # device and thread count: on the demo it matched to 1.6e-8 (float32 storage of the marginals), while the
    # demo's smallest |marginal| was 0.004 and the mean 0.1; 1e-4 lies well between.
    replay_tolerance: float = 1e-4

    def __post_init__(self) -> None:
        # Zero blocks or trajectories would give the influence model nothing to learn from.
        _at_least("oracle", 1, reference_size=self.reference_size, probe_pool_size=self.probe_pool_size,
                  blocks=self.blocks, trajectories_per_block=self.trajectories_per_block, part_size=self.part_size,
                  workers=self.workers, bootstrap_blocks=self.bootstrap_blocks)
        _at_least("oracle", 0, replay_per_block=self.replay_per_block)
        _positive("oracle", replay_tolerance=self.replay_tolerance)


@dataclass(frozen=True)
class InfluenceProfile:
    """The relational influence model (and the MATES individual model): encoder, training, bootstrap."""

    encoder: str | None = None  # None: all-MiniLM-L6-v2 from a registry package; a directory or a hub name
    encoder_layers: int | None = 3  # keep only the encoder's first layers (None: all; 2 CPU cores: 3 of 6)
    chunk_len: int = 32  # METHOD.encoder_chunk_tokens at paper scale
    chunks: int = 2  # METHOD.encoder_chunks at paper scale
    reference_empty_chunks: bool = False  # True: average all-padding chunks too, as the reference code did
    dropout: float = 0.1  # on h before the linear head (the encoder's hidden dropout in the reference)
    lr: float = 1e-3  # paper: 5e-5 over thousands of steps; the demo's few dozen steps need more to move u
    weight_decay: float = 0.01
    warmup_steps: int = 2  # reference: 50
    epochs: int = 10  # reference: 5
    trajectories_per_step: int = 4  # reference: 32, paper: 128
    evals_per_epoch: int = 1
    val_fraction: float = 0.2  # share of trajectories held out per rollout policy (paper: 1,000 of 20,000)
    seed: int = 1234
    max_tokens: int = 8192  # encoder tokens per forward pass
    torch_threads: int = 2
    bootstrap_per_tail: int = 5  # beams kept per tail (paper: 10,000)
    bootstrap_width: int = 5  # METHOD.bootstrap_width
    # Candidates per beam: "both" = the paper's policy (the width best toward either tail), "tail" = the reference
    # code's (toward the beam's own tail only); beams kept during the search (the best bootstrap_per_tail are
    # returned). lib/influence/bootstrap.py says why the defaults differ from the reference code.
    bootstrap_candidates: str = "both"
    bootstrap_search_beams: int = 1024
    tail_check_trajectories: int = 2000  # random trajectories the T18 check compares the tails with
    # influence_model_report's learning curve: shares of the training trajectories it trains extra final and
    # individual models on (the 100% point is the trained model itself); () reports the 100% point alone
    learning_curve_fractions: tuple[float, ...] = (0.25, 0.5)

    def __post_init__(self) -> None:
        _optional_at_least("influence", 1, encoder_layers=self.encoder_layers)
        _at_least("influence", 2, chunk_len=self.chunk_len)  # the first chunk holds [CLS] and [SEP]
        _at_least("influence", 1, chunks=self.chunks, epochs=self.epochs,
                  trajectories_per_step=self.trajectories_per_step, evals_per_epoch=self.evals_per_epoch,
                  max_tokens=self.max_tokens, torch_threads=self.torch_threads,
                  bootstrap_per_tail=self.bootstrap_per_tail, bootstrap_width=self.bootstrap_width,
                  tail_check_trajectories=self.tail_check_trajectories)
        _at_least("influence", 0, warmup_steps=self.warmup_steps, bootstrap_search_beams=self.bootstrap_search_beams)
        _one_of("influence.bootstrap_candidates", self.bootstrap_candidates, ("tail", "both"))
        _in_range("influence.dropout", self.dropout, 0, 1, "left")
        _in_range("influence.val_fraction", self.val_fraction, 0, 1, "left")
        _positive("influence", lr=self.lr)
        _non_negative("influence", weight_decay=self.weight_decay)
        for fraction in self.learning_curve_fractions:
            _in_range("influence.learning_curve_fractions", fraction, 0, 1, "neither")
        if len(set(self.learning_curve_fractions)) != len(self.learning_curve_fractions):
            raise ValueError(f"influence.learning_curve_fractions repeat: {self.learning_curve_fractions}")


@dataclass(frozen=True)
class SelectionProfile:
    """Pool inference, influence-aware clusters and the per-cluster greedy group selection."""

    ratio: float = 0.5  # METHOD.selection_ratio: share of each cluster selected
    budget_rounding: str = "floor"  # "floor": reference code (a singleton cluster gives 0); "ceil": the paper
    learned_alpha_tau: bool = True  # False reproduces the reference code's alpha = tau = 1
    mean_cluster_size: int = 100  # k = ceil(documents / this) (paper: 10,000 clusters for 29.5M documents)
    kmeans_iterations: int = 25  # METHOD.kmeans_iterations at paper scale
    kmeans_seed: int = 1234  # METHOD.kmeans_seed
    max_points_per_centroid: int = 256  # k-means trains on at most this many points per centroid
    cluster_ranges: int = 1  # partitions of the selection; each selects a contiguous range of cluster ids
    predict_batch_docs: int = 256  # documents per embedding batch (tokens per forward: influence.max_tokens)
    random_seed: int = 0  # the random-selection baseline (and the Gumbel noise of MATES' sampling)
    mates_temperature: float = 0.0  # MATES baseline: 0 deterministic top-k; > 0 MATES' Gumbel-top-k at this
    # temperature (pred / temperature + Gumbel noise, the k smallest)
    # The non-uniform cluster budget policies (group_mates_weighted, group_mates_global; lib.budgets): each cluster
    # keeps between floor(budget_floor x |C|) and ceil(budget_cap x |C|) documents (the floor at most, the cap at
    # least the ratio); the cap is also how far selected_documents computes each cluster's greedy sequence.
    budget_floor: float = 0.1
    budget_cap: float = 1.0
    weighted_sharpness: float = 1.0  # influence_weighted: budget ~ |C| exp(-sharpness z), z the standardised benefit
    torch_threads: int = 2

    def __post_init__(self) -> None:
        _in_range("selection.ratio", self.ratio, 0, 1)
        _one_of("selection.budget_rounding", self.budget_rounding, ("floor", "ceil"))
        _non_negative("selection", mates_temperature=self.mates_temperature,
                      weighted_sharpness=self.weighted_sharpness)
        _in_range("selection.budget_floor", self.budget_floor, 0, 1, "both")
        _in_range("selection.budget_cap", self.budget_cap, 0, 1, "both")
        _at_least("selection", 1, mean_cluster_size=self.mean_cluster_size, kmeans_iterations=self.kmeans_iterations,
                  max_points_per_centroid=self.max_points_per_centroid, cluster_ranges=self.cluster_ranges,
                  predict_batch_docs=self.predict_batch_docs, torch_threads=self.torch_threads)

    def policy_limits(self):  # -> lib.budgets.PolicyLimits
        """The floor, cap and sharpness of the non-uniform cluster budget policies; the floor at most and the cap
        at least the ratio, so the uniform budget always lies between them."""
        from groupmates_assets.lib.budgets import PolicyLimits

        return PolicyLimits(min(self.budget_floor, self.ratio), max(self.budget_cap, self.ratio),
                            self.weighted_sharpness)


@dataclass(frozen=True)
class CorpusProfile:
    """Each selected corpus as LM training data."""

    token_budget: int | None = None  # tokens one training run reads; None: the steps of the selected-data stage
    # (stage 2 of S = 2, the whole run for S = 1) x batch x seq_len
    seed: int = 1234  # shuffles of the data passes (run r of a method uses seed + r)

    def __post_init__(self) -> None:
        _optional_at_least("corpus", 1, token_budget=self.token_budget)


@dataclass(frozen=True)
class PretrainProfile:
    """The target-LM runs that compare selection methods at one token budget (method spec stage 15).

    With ``stages = 2`` (the paper's S = 2) the LM run of the ``lm`` profile is continued from the probe
    checkpoint (stage 1 on the filtered pool) on each method's selected data up to ``lm.total_steps``; with
    ``stages = 1`` each method trains from scratch for ``lm.total_steps`` on its selected data alone.
    """

    stages: int = 2
    seeds: int = 1  # runs per method: the data order differs (and with S = 1 also the initialisation)
    checkpoint_every: int = 50  # optimizer steps between checkpoints (and the last step); each one is evaluated
    gpus_per_run: int = 1  # > 1: torchrun through Dagster Pipes, one data-parallel process per device
    launcher: str = "auto"  # "auto" (torchrun when gpus_per_run > 1), "in_process" or "torchrun"

    def __post_init__(self) -> None:
        if self.stages not in (1, 2):
            raise ValueError(f"pretrain.stages must be 1 or 2, got {self.stages}")
        _at_least("pretrain", 1, seeds=self.seeds, checkpoint_every=self.checkpoint_every,
                  gpus_per_run=self.gpus_per_run)
        if self.launcher not in ("auto", "in_process", "torchrun"):
            raise ValueError(f"pretrain.launcher must be auto, in_process or torchrun, got {self.launcher!r}")

    @property
    def uses_torchrun(self) -> bool:
        return self.launcher == "torchrun" or (self.launcher == "auto" and self.gpus_per_run > 1)


ICL_TASK_TYPES = ("multiple_choice", "schema", "language_modeling")  # LLM Foundry ICL task types read from files


@dataclass(frozen=True)
class IclTask:
    """A user's evaluation task: a JSON-lines file in LLM Foundry's ICL format (lib.icl_tasks), scored beside the
    built-in tasks and averaged into core_centered with them."""

    name: str
    path: str  # a path in the storage root, an absolute local path or an fsspec URL (s3://...)
    task_type: str  # one of ICL_TASK_TYPES
    num_fewshot: int = 0  # demonstrations from the same file, never the scored line
    random_baseline: float | None = None  # None: mean 1/num_choices (multiple_choice, schema); 0 (language_modeling)
    continuation_delimiter: str = " "  # LLM Foundry's defaults
    example_delimiter: str = "\n"

    def __post_init__(self) -> None:
        if not self.name.strip() or not self.path.strip():
            raise ValueError(f"evaluation.icl_tasks: name and path must be set, got {self.name!r}, {self.path!r}")
        if self.task_type not in ICL_TASK_TYPES:
            raise ValueError(f"evaluation.icl_tasks {self.name!r}: task_type must be one of {ICL_TASK_TYPES}, "
                             f"got {self.task_type!r}")
        _at_least(f"evaluation.icl_tasks {self.name!r}", 0, num_fewshot=self.num_fewshot)
        if self.random_baseline is not None:
            _in_range(f"evaluation.icl_tasks {self.name!r}: random_baseline", self.random_baseline, 0, 1, "left")


@dataclass(frozen=True)
class EvalProfile:
    """Evaluation of each pretrained checkpoint: offline multiple-choice tasks and held-out bits per byte."""

    tasks: tuple[str, ...] | None = None  # None: the DCLM core tasks available offline (lib.evaluation.CORE_TASKS)
    limit_per_task: int | None = 200  # seeded subset per task (None: the whole validation split)
    seed: int = 0
    heldout_path: str | None = None  # the user's held-out shards (a file or folder, any pool shard format; in the
    # storage root or a URL); None: the pool's held-out slice (pool.heldout_fraction), which never enters the pool
    heldout_documents: int = 200  # sampled with `seed`, stratified by source
    heldout_min_per_source: int = 3  # at least this many from every source that has them
    every_checkpoint: bool = True  # evaluate each saved checkpoint (score-vs-tokens curves), not only the last
    # shots per built-in task: "dclm" (DCLM core's count per task, lib.fewshot.DCLM_NUM_FEWSHOT) or one count for all
    num_fewshot: int | str = "dclm"
    icl_tasks: tuple[IclTask, ...] = ()  # the user's own task files, evaluated beside the built-in tasks

    def __post_init__(self) -> None:
        if self.tasks is not None and not self.tasks:
            raise ValueError("evaluation.tasks must name at least one task, or be None for the core tasks, got ()")
        if self.num_fewshot != "dclm":
            _at_least("evaluation", 0, num_fewshot=self.num_fewshot)
        names = [task.name for task in self.icl_tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"evaluation.icl_tasks: task names must be unique, got {names}")
        _optional_at_least("evaluation", 1, limit_per_task=self.limit_per_task)
        _at_least("evaluation", 1, heldout_documents=self.heldout_documents)
        _at_least("evaluation", 0, heldout_min_per_source=self.heldout_min_per_source)


@dataclass(frozen=True)
class CausalProfile:
    """The causal check (``selection_influence``): N paired groups of T contexts per selection method and from the
    filtered pool, each run as an oracle trajectory from the probe checkpoint."""

    groups: int = 16  # N groups per set; each costs T probe steps + one reference loss
    seed: int = 0  # group g of every set is drawn under (seed, g)
    methods: tuple[str, ...] = ("group_mates", "group_mates_weighted", "group_mates_global", "mates",
                                "fasttext")  # compared with random groups of the pool
    references: tuple[str, ...] = ("mates",)  # every set is also compared with these (those in methods), paired
    workers: int = 2  # replica processes (2 CPU cores: 2 x 1 thread beats 1 x 2 threads)

    def __post_init__(self) -> None:
        _at_least("causal", 1, groups=self.groups, workers=self.workers)
        if not self.methods:
            raise ValueError("causal.methods must name at least one selection method, got ()")


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    pool: PoolProfile = field(default_factory=PoolProfile)
    quality: QualityProfile = field(default_factory=QualityProfile)
    tokenize: TokenizeProfile = field(default_factory=TokenizeProfile)
    lm: LMProfile = field(default_factory=LMProfile)
    oracle: OracleProfile = field(default_factory=OracleProfile)
    influence: InfluenceProfile = field(default_factory=InfluenceProfile)
    selection: SelectionProfile = field(default_factory=SelectionProfile)
    corpus: CorpusProfile = field(default_factory=CorpusProfile)
    pretrain: PretrainProfile = field(default_factory=PretrainProfile)
    evaluation: EvalProfile = field(default_factory=EvalProfile)
    causal: CausalProfile = field(default_factory=CausalProfile)

    def __post_init__(self) -> None:
        if self.pretrain.stages == 2 and self.lm.probe_steps >= self.lm.total_steps:
            raise ValueError(f"lm.probe_fraction {self.lm.probe_fraction} puts the probe checkpoint at step "
                             f"{self.lm.probe_steps} of lm.total_steps {self.lm.total_steps}: with pretrain.stages 2 "
                             "no steps are left for the selected data")

    def as_metadata(self) -> dict[str, Any]:
        return {"profile": self.name, **asdict(self)}


PROFILES: dict[str, Profile] = {
    "demo": Profile(
        name="demo",
        description="2 CPU cores: the embedded pool, a classifier trained on it, half of the pool kept; the whole "
        "graph in about half an hour",
        lm=LMProfile(total_steps=80),  # probe at step 32; stage 2 trains 48 steps on each method's data
        pretrain=PretrainProfile(checkpoint_every=24),
        # zero-shot: DCLM's 10-shot prompts are cut to the demo LM's 256 tokens anyway, and they double the scoring
        # time (8 core tasks x 20 items on 2 cores: 8.2 s zero-shot, 16.8 s with DCLM's shots, per checkpoint)
        evaluation=EvalProfile(limit_per_task=20, heldout_documents=60, num_fewshot=0),
    ),
    "gpu-demo": Profile(
        name="gpu-demo",
        description="one GPU: the embedded pool with a 79M-parameter LM, 120 oracle trajectories, the full MiniLM "
        "encoder on 4 x 128 tokens, 3 seeds per method; the whole graph in under 10 minutes on an H100",
        lm=LMProfile(shape="small", total_steps=240, batch_size=32, warmup_steps=24, torch_threads=8),
        # 4 replicas per block share the card: one 79M probe step is too small to keep an H100 busy
        # bf16 autocast and atomics in CUDA backward kernels do not repeat bit for bit: a looser replay tolerance
        # (not yet measured on a GPU; still 4x below the demo's smallest |marginal|)
        oracle=OracleProfile(blocks=4, trajectories_per_block=20, part_size=5, workers=4, bootstrap_blocks=2,
                             replay_tolerance=1e-3),
        influence=InfluenceProfile(encoder_layers=None, chunk_len=128, chunks=4, epochs=10, trajectories_per_step=8,
                                   max_tokens=65536, torch_threads=8, bootstrap_per_tail=20),
        selection=SelectionProfile(predict_batch_docs=1024, torch_threads=8),
        pretrain=PretrainProfile(seeds=3, checkpoint_every=72),
        evaluation=EvalProfile(limit_per_task=100, heldout_documents=100),
        causal=CausalProfile(groups=64, methods=("group_mates", "group_mates_weighted", "group_mates_global",
                                                 "mates", "fasttext", "random"), workers=4),
    ),
    "ci": Profile(
        name="ci",
        description="the demo's graph with a tiny LM and a handful of trajectories, for the end-to-end test",
        lm=LMProfile(shape="tiny", total_steps=10, warmup_steps=2, batch_size=2),
        oracle=OracleProfile(reference_size=16, probe_pool_size=64, blocks=2, trajectories_per_block=3, workers=2,
                             bootstrap_blocks=2),
        influence=InfluenceProfile(chunk_len=16, chunks=2, encoder_layers=2, epochs=2, trajectories_per_step=2,
                                   val_fraction=0.34, bootstrap_per_tail=2, tail_check_trajectories=200,
                                   learning_curve_fractions=(0.5,)),
        selection=SelectionProfile(mean_cluster_size=200, kmeans_iterations=10, cluster_ranges=2),
        pretrain=PretrainProfile(seeds=2, checkpoint_every=5),
        evaluation=EvalProfile(tasks=("arc_easy", "arc_challenge", "copa", "openbookqa"), limit_per_task=4,
                               heldout_documents=10, num_fewshot=0),  # the tiny LM reads 64 tokens
        causal=CausalProfile(groups=3),
    ),
    "dclm-400m": Profile(
        name="dclm-400m",
        description="DCLM 400M-4x: DCLM's own fastText model and threshold on refinedweb shards",
        pool=PoolProfile(group_field=None),
        quality=QualityProfile(
            model_path=f"models/{MethodConstants.dclm_fasttext_model}",  # inside the storage root
            threshold=METHOD.dclm_fasttext_threshold,
            keep_fraction=None,
            batch_size=32768,
        ),
        lm=LMProfile(shape="411m", total_steps=31_403, batch_size=512, warmup_steps=2000, torch_threads=16),
        oracle=OracleProfile(probe_pool_size=81_920, blocks=4, trajectories_per_block=5_000, part_size=250,
                             workers=4, bootstrap_blocks=4),
        influence=InfluenceProfile(encoder="BAAI/bge-base-en-v1.5", encoder_layers=None,
                                   chunk_len=METHOD.encoder_chunk_tokens,
                                   chunks=METHOD.encoder_chunks, lr=5e-5, warmup_steps=50, epochs=5,
                                   trajectories_per_step=32, evals_per_epoch=10, val_fraction=0.05,
                                   max_tokens=65536, torch_threads=16, bootstrap_per_tail=10_000,
                                   tail_check_trajectories=20_000),
        selection=SelectionProfile(mean_cluster_size=2_950, kmeans_iterations=METHOD.kmeans_iterations,
                                   cluster_ranges=16, predict_batch_docs=1024, torch_threads=16),
        pretrain=PretrainProfile(checkpoint_every=3_000, gpus_per_run=8),
        evaluation=EvalProfile(limit_per_task=None, every_checkpoint=False),
    ),
}


PROFILE_ENV = "GROUPMATES_PROFILE"
DEFAULT_PROFILE = "demo"
_active_profile_name: str | None = None  # GROUPMATES_PROFILE as first resolved in this process (see below)


def resolve_profile_name(name: str | None = None) -> str:
    """``name``, or $GROUPMATES_PROFILE, or ``demo``, checked against the known profiles: an unknown name raises a
    ``ValueError`` with a one-line message naming where it came from and every known profile."""
    source = "" if name else f" ({PROFILE_ENV})"
    name = name or os.environ.get(PROFILE_ENV, "").strip() or DEFAULT_PROFILE
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}{source}; known profiles: {', '.join(sorted(PROFILES))}")
    return name


def active_profile_name() -> str:
    """The profile this process runs: GROUPMATES_PROFILE (default ``demo``), read and validated once, on first use.

    Everything built when the definitions are imported (the oracle, bootstrap and selection-range partitions,
    the GPU request of pretraining steps) and the platform resource's default all come from this one value, so
    a later change of the environment variable cannot make them disagree; reload the code location instead."""
    global _active_profile_name
    if _active_profile_name is None:
        _active_profile_name = resolve_profile_name()
    return _active_profile_name


def get_profile(name: str | None = None) -> Profile:
    """The profile named (unknown: ``ValueError`` listing the known ones), or the active one
    (``active_profile_name``)."""
    return PROFILES[resolve_profile_name(name) if name else active_profile_name()]


def with_overrides(profile: Profile, **quality_overrides: Any) -> Profile:
    """A copy of a profile with some quality settings replaced (None values are ignored)."""
    changes = {k: v for k, v in quality_overrides.items() if v is not None}
    return replace(profile, quality=replace(profile.quality, **changes)) if changes else profile


def with_thread_cap(profile: Profile, threads: int) -> Profile:
    """A copy whose torch thread counts are at most ``threads``: for steps run side by side on one machine (two
    one-thread steps get more done on 2 cores than one two-thread step). Nothing else changes; results can differ
    only in floating-point summation order."""
    if threads < 1:
        raise ValueError(f"a thread cap must be at least 1, got {threads}")
    return replace(
        profile,
        lm=replace(profile.lm, torch_threads=min(profile.lm.torch_threads, threads)),
        influence=replace(profile.influence, torch_threads=min(profile.influence.torch_threads, threads)),
        selection=replace(profile.selection, torch_threads=min(profile.selection.torch_threads, threads)),
    )
