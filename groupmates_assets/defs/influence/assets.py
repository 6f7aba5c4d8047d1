"""Influence stage: the relational influence model (initial and final), bootstrap trajectories and their oracle
labels, the MATES individual-influence model, and a side-by-side report of the three on held-out trajectories."""

import os
import tempfile
import time
from dataclasses import asdict

import dagster as dg
import numpy as np
import torch

from groupmates_assets.defs.common import blocking_check
from groupmates_assets.defs.deployment import gpu_asset, gpu_asset_args, step_asset
from groupmates_assets.defs.partitions import block_number, oracle_block_keys, oracle_bootstrap_blocks
from groupmates_assets.defs.resources import PlatformResource
from groupmates_assets.defs.shared import collect_oracle_block
from groupmates_assets.lib import layout, lm, plots
from groupmates_assets.lib import tokenization as tk
from groupmates_assets.lib.influence import bootstrap as boot
from groupmates_assets.lib.influence import encoder as enc
from groupmates_assets.lib.influence import learning_curve as lc
from groupmates_assets.lib.influence import model as im
from groupmates_assets.lib.influence import training as tr
from groupmates_assets.lib.jsonsafe import finite
from groupmates_assets.lib.oracle import read_oracle_blocks
from groupmates_assets.lib.storage import Storage
from groupmates_assets.settings import METHOD, InfluenceProfile, Profile

# ------------------------------------------------------------------------------------------------ helpers


def probe_documents(storage: Storage, settings: Profile) -> tuple[enc.ChunkedDocuments, enc.EncoderSource, str]:
    """The probe-pool contexts as encoder inputs: GPT-NeoX tokens decoded to text (special tokens dropped, as the
    reference does), re-tokenized with the encoder's tokenizer and cut into chunks. Returns (docs, encoder, sha)."""
    influence = settings.influence
    tokens = storage.read_numpy(f"{layout.PROBE_POOL_DIR}/contexts.npy")
    neox = tk.load_tokenizer(settings.tokenize.tokenizer)
    texts = neox.decode_batch([row.tolist() for row in tokens], skip_special_tokens=True)
    source = enc.resolve_encoder(influence.encoder)
    docs = enc.chunk_documents(enc.load_encoder_tokenizer(source), texts, influence.chunk_len, influence.chunks)
    return docs, source, storage.info(f"{layout.PROBE_POOL_DIR}/contexts.npy").sha256


def model_config(influence: InfluenceProfile, source: enc.EncoderSource, relational: bool) -> im.InfluenceModelConfig:
    return im.InfluenceModelConfig(
        relational=relational, chunk_len=influence.chunk_len, chunks=influence.chunks,
        reference_empty_chunks=influence.reference_empty_chunks, encoder_name=source.name,
        encoder_origin=source.origin, encoder_layers=influence.encoder_layers, dropout=influence.dropout)


def train_settings(influence: InfluenceProfile) -> tr.TrainSettings:
    return tr.TrainSettings(lr=influence.lr, weight_decay=influence.weight_decay, warmup_steps=influence.warmup_steps,
                            epochs=influence.epochs, trajectories_per_step=influence.trajectories_per_step,
                            evals_per_epoch=influence.evals_per_epoch, seed=influence.seed,
                            max_tokens=influence.max_tokens)


def _curve_markdown(history: list[dict], title: str) -> str:
    steps = [h["step"] for h in history]
    spearman = [h.get("val_spearman", float("nan")) for h in history]
    png = plots.line_png(steps, spearman, title, "optimizer step", "validation Spearman")
    table = "| step | train MSE | val MSE | val Spearman | alpha | tau |\n|---|---|---|---|---|---|\n" + "\n".join(
        f"| {h['step']} | {h['train_mse']:.4f} | {h.get('val_mse', float('nan')):.4f} | "
        f"{h.get('val_spearman', float('nan')):.4f} | {h['alpha']:.4f} | {h['tau']:.4f} |" for h in history)
    return plots.png_markdown(png, title) + "\n\n" + table


def train_influence_asset(context: dg.AssetExecutionContext, platform: PlatformResource, kind: str,
                          relational: bool, oracle_sources: list[tuple[str, list[str], str]],
                          lineage: dict) -> dg.MaterializeResult:
    """Shared body of the three model assets: read oracle labels, split, train, save, report."""
    storage, settings = platform.storage(), platform.settings(alone=True)
    influence = settings.influence
    torch.set_num_threads(influence.torch_threads)
    tables, oracle_fingerprints = [], {}
    for root_dir, keys, asset_name in oracle_sources:
        blocks, oracle_fp = read_oracle_blocks(storage, root_dir, keys, asset_name)
        tables += blocks
        oracle_fingerprints[asset_name] = oracle_fp
    data = tr.Trajectories.from_tables(tables)
    docs, source, pool_sha = probe_documents(storage, settings)
    if data.contexts.max() >= len(docs):
        raise ValueError(f"oracle trajectories refer to probe-pool row {int(data.contexts.max())} but the probe pool "
                         f"holds {len(docs)} contexts; rematerialize the oracle for the current probe pool")
    train_rows, val_rows = tr.split_by_group(data, influence.val_fraction, influence.seed)
    config = model_config(influence, source, relational)
    model_fp = layout.fingerprint(kind=kind, oracle=oracle_fingerprints, pool=pool_sha, config=asdict(config),
                                  train=asdict(train_settings(influence)), val_fraction=influence.val_fraction,
                                  **tr.split_fingerprint(data))
    device = str(lm.default_device())
    context.log.info(f"{kind}: {len(train_rows)} training and {len(val_rows)} validation trajectories "
                     f"({', '.join(sorted(set(data.policy)))}); encoder {source.name} on {device}")
    model = im.build_model(source, config, seed=influence.seed).to(device)
    result = tr.train_model(model, docs, data, train_rows, val_rows, train_settings(influence),
                            log=lambda line: context.log.info(f"{kind}: {line}"))
    out = f"{layout.model_dir(kind)}/{model_fp}"
    with tempfile.TemporaryDirectory(prefix="groupmates-influence-") as tmp:
        local = os.path.join(tmp, "model")
        model.config.extra = finite({"best_step": result.best_step, "best_metrics": result.best_metrics,
                                     "oracle": oracle_fingerprints, "probe_pool_sha256": pool_sha, **lineage})
        im.save_model(model, local, enc.load_encoder_tokenizer(source).to_str())
        hashes = {name: info.sha256 for name, info in storage.put_dir(local, out, im.MODEL_FILES).items()}
    alpha, tau = model.alpha_tau()
    split = {"train_trajectories": len(train_rows), "val_trajectories": len(val_rows)}
    layout.write_pointer(storage, layout.model_dir(kind), finite({
        "fingerprint": model_fp, "path": out, "alpha": alpha, "tau": tau, "best_metrics": result.best_metrics,
        "oracle": oracle_fingerprints, **split}))
    best = result.best_metrics
    beats = bool(best) and best["mse"] < best["mse_constant"]
    return dg.MaterializeResult(
        metadata={
            "relational": relational, "alpha": alpha, "tau": tau, **split,
            "oracle_points": int(data.labels.size), "best_step": result.best_step, "steps": result.steps,
            **{f"val_{k}": v for k, v in finite(best).items()}, "beats_constant_predictor": beats,
            "label_mean": result.label_mean, "label_std": result.label_std,
            "trajectories_per_second": round(result.trajectories_per_second, 3),
            "training_seconds": round(result.seconds, 1), "device": device,
            "encoder": source.name, "encoder_origin": source.origin,
            "learning_curve": dg.MetadataValue.md(_curve_markdown(result.history, f"{kind}: validation Spearman")),
            "oracle_fingerprints": dg.MetadataValue.json(oracle_fingerprints), "fingerprint": model_fp,
            "weights_sha256": hashes[im.MODEL_FILE], "settings": dg.MetadataValue.json(asdict(influence)),
            "path": dg.MetadataValue.path(storage.url(out)),
        },
        data_version=dg.DataVersion(hashes[im.MODEL_FILE][:16]),
    )


def random_block_keys(platform: PlatformResource) -> list[str]:
    return oracle_block_keys(platform.settings().oracle.blocks)


def bootstrap_block_keys(platform: PlatformResource) -> list[str]:
    return oracle_block_keys(platform.settings().oracle.bootstrap_blocks)


# ------------------------------------------------------------------------------------------------- assets


@gpu_asset(
    group_name="influence",
    code_version="influence-model-v2",
    deps=[dg.AssetDep("oracle_random", partition_mapping=dg.AllPartitionMapping()), "probe_pool"],
    kinds={"pytorch", "safetensors"},
)
def influence_model_init(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
    """The initial relational influence model, trained on the random-rollout oracle: encoder -> h, u = w.h + b, pred_t =
    alpha * u_t * mean_{i<t}(1 - <h_i,h_t>/tau); MSE on z-scored marginal labels, best validation Spearman kept."""
    return train_influence_asset(context, platform, "init", relational=True,
                                 oracle_sources=[(layout.ORACLE_RANDOM_DIR, random_block_keys(platform),
                                                  "oracle_random")],
                                 lineage={"policies": ["random"]})


@gpu_asset(
    group_name="influence",
    code_version="bootstrap-trajectories-v2",
    deps=[influence_model_init, "probe_pool"],
    kinds={"pytorch", "parquet"},
    check_specs=[blocking_check(
        "tails_separated", "bootstrap_trajectories",
        "T18: every beneficial beam's predicted score is below the 1st percentile of random "
        "trajectories', every harmful one above the 99th, and the tails do not start from the same rows")],
)
def bootstrap_trajectories(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
    """Bootstrap trajectories: beam search (width K) over the probe pool with the initial model toward the most
    beneficial and the most harmful tail; step 0 scored by the individual influence u."""
    storage, settings = platform.storage(), platform.settings(alone=True)
    influence = settings.influence
    torch.set_num_threads(influence.torch_threads)
    init = layout.current_model(storage, "init")
    docs, _, pool_sha = probe_documents(storage, settings)
    h, u, alpha, tau, embed_seconds = _embed_probe_pool(context, storage, init["path"], docs, influence.max_tokens)
    length, keep = METHOD.trajectory_length, influence.bootstrap_per_tail
    beams = boot.search_tails(h, u, alpha, tau, length, influence.bootstrap_width, keep,
                              influence.bootstrap_candidates, influence.bootstrap_search_beams)
    report = boot.tail_report(h, u, alpha, tau, beams["beneficial"], beams["harmful"],
                              influence.tail_check_trajectories, influence.seed)
    pool_ids = storage.read_parquet(f"{layout.PROBE_POOL_DIR}/contexts.parquet").column("context_id").to_pylist()
    table = boot.trajectories_table(beams, keep, pool_ids)
    boot_fp = layout.fingerprint(model=init["fingerprint"], pool=pool_sha, width=influence.bootstrap_width,
                                 keep=keep, length=length, candidates=influence.bootstrap_candidates,
                                 search_beams=influence.bootstrap_search_beams)
    path = f"{layout.BOOTSTRAP_DIR}/{boot_fp}/trajectories.parquet"
    info = storage.write_parquet(path, table)
    layout.write_pointer(storage, layout.BOOTSTRAP_DIR, {"fingerprint": boot_fp, "sha256": info.sha256, "path": path,
                                                         "model": init["fingerprint"]})
    edges, counts = boot.random_score_histogram(h, u, alpha, tau, beams, length, influence.seed)
    png = plots.histogram_png(edges, counts, "predicted trajectory scores: 500 random trajectories",
                              "sum of predicted influences", ylabel="trajectories")
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": table.num_rows, "per_tail": keep, "width": influence.bootstrap_width,
            "candidates": influence.bootstrap_candidates, "search_beams": max(keep, influence.bootstrap_search_beams),
            "length": length, "alpha": alpha, "tau": tau, "probe_contexts": len(docs),
            "embed_seconds": round(embed_seconds, 1),
            "embed_documents_per_second": round(len(docs) / embed_seconds, 1),
            "beneficial_scores": dg.MetadataValue.json([round(float(x), 4) for x in beams["beneficial"].scores[:20]]),
            "harmful_scores": dg.MetadataValue.json([round(float(x), 4) for x in beams["harmful"].scores[:20]]),
            "random_score_histogram": dg.MetadataValue.md(plots.png_markdown(png, "random trajectory scores")),
            "model_fingerprint": init["fingerprint"], "fingerprint": boot_fp, "sha256": info.sha256,
            "path": dg.MetadataValue.path(info.path),
        },
        check_results=[dg.AssetCheckResult(check_name="tails_separated", passed=boot.tails_separated(report),
                                           metadata=report, severity=dg.AssetCheckSeverity.ERROR)],
        data_version=dg.DataVersion(info.sha256[:16]),
    )


def _embed_probe_pool(context: dg.AssetExecutionContext, storage: Storage, model_path: str, docs: enc.ChunkedDocuments,
                      max_tokens: int) -> tuple[torch.Tensor, torch.Tensor, float, float, float]:
    """(h, u, alpha, tau, seconds) of the probe pool under a stored influence model; the time includes loading it."""
    started = time.perf_counter()
    with im.local_model_dir(storage, model_path) as local:
        model = im.load_model(local, lm.default_device())
    h, u = im.embed_documents(model, docs, max_tokens=max_tokens, log=context.log.info)
    seconds = time.perf_counter() - started
    alpha, tau = model.alpha_tau()
    return h, u, alpha, tau, seconds


@step_asset(
    partitions_def=oracle_bootstrap_blocks,
    group_name="oracle",
    code_version="oracle-bootstrap-v1",
    deps=[bootstrap_trajectories],
    kinds={"pytorch", "parquet"},
    check_specs=[blocking_check(
        "labels_consistent", "oracle_bootstrap",
        "every trajectory complete (T distinct contexts, finite labels) and telescoping, with L_r(M_T+1) "
        "recomputed for oracle.replay_per_block trajectories replayed from the checkpoint")],
    **gpu_asset_args(partitioned=True),
)
def oracle_bootstrap(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
    """Oracle data influences of the bootstrap trajectories, collected exactly as for random ones (same checkpoint,
    reference set and collector); the trajectories are split into contiguous blocks."""
    storage, settings = platform.storage(), platform.settings()
    current = layout.current_bootstrap(storage)
    table = storage.read_parquet(current["path"])
    blocks, block = settings.oracle.bootstrap_blocks, block_number(context.partition_key)
    per_block = -(-table.num_rows // blocks)
    rows = slice(block * per_block, min((block + 1) * per_block, table.num_rows))
    plan = np.array(table.column("context_index").to_pylist()[rows], dtype=np.int64)
    if len(plan) == 0:
        raise ValueError(f"{context.partition_key} has no bootstrap trajectories: {table.num_rows} trajectories "
                         f"over {blocks} blocks; lower oracle.bootstrap_blocks or raise influence.bootstrap_per_tail")
    return collect_oracle_block(
        context, platform, root_dir=layout.ORACLE_BOOTSTRAP_DIR, plan=plan,
        trajectory_ids=np.array(table.column("row").to_pylist()[rows], dtype=np.int64),
        policy=tuple(table.column("policy").to_pylist()[rows]),
        fingerprint_parts={"bootstrap_sha256": current["sha256"], "blocks": blocks, "policy": "bootstrap"},
    )


@gpu_asset(
    group_name="influence",
    code_version="influence-model-v3",
    deps=[dg.AssetDep("oracle_random", partition_mapping=dg.AllPartitionMapping()),
          dg.AssetDep(oracle_bootstrap, partition_mapping=dg.AllPartitionMapping()), "probe_pool"],
    kinds={"pytorch", "safetensors"},
)
def influence_model_final(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
    """The final relational influence model: trained fresh from the encoder on the random and the bootstrap oracle; the
    model that scores the pool for selection."""
    return train_influence_asset(context, platform, "final", relational=True, oracle_sources=oracle_union(platform),
                                 lineage={"policies": ["random", "bootstrap"]})


def oracle_union(platform: PlatformResource) -> list[tuple[str, list[str], str]]:
    return [(layout.ORACLE_RANDOM_DIR, random_block_keys(platform), "oracle_random"),
            (layout.ORACLE_BOOTSTRAP_DIR, bootstrap_block_keys(platform), "oracle_bootstrap")]


@gpu_asset(
    group_name="influence",
    code_version="individual-model-v3",
    deps=[dg.AssetDep("oracle_random", partition_mapping=dg.AllPartitionMapping()),
          dg.AssetDep(oracle_bootstrap, partition_mapping=dg.AllPartitionMapping()), "probe_pool"],
    kinds={"pytorch", "safetensors"},
)
def individual_influence_model(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
    """MATES' individual-influence model: the same encoder and head without the relational term (pred_t = u_t), trained
    on the same oracle data as the final model; the baseline Group-MATES improves on."""
    return train_influence_asset(context, platform, "individual", relational=False,
                                 oracle_sources=oracle_union(platform), lineage={"policies": ["random", "bootstrap"]})


@gpu_asset(
    group_name="influence",
    code_version="influence-report-v2",
    deps=[influence_model_init, influence_model_final, individual_influence_model],
    kinds={"pytorch"},
)
def influence_model_report(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
    """The three influence models side by side on the same held-out trajectories: the random-rollout validation set
    (shared by all three) and the final model's whole validation set; and a learning curve of the final and the
    individual model against the share of oracle trajectories trained on (``influence.learning_curve_fractions``
    plus the trained models at 100%)."""
    storage, settings = platform.storage(), platform.settings(alone=True)
    influence = settings.influence
    torch.set_num_threads(influence.torch_threads)
    tables = []
    for root_dir, keys, asset_name in oracle_union(platform):
        tables += read_oracle_blocks(storage, root_dir, keys, asset_name)[0]
    data = tr.Trajectories.from_tables(tables)
    train_rows, val_rows = tr.split_by_group(data, influence.val_fraction, influence.seed)
    random_val = val_rows[data.family()[val_rows] == "random"]
    docs, source, _ = probe_documents(storage, settings)
    summary = {}
    for kind in ("init", "final", "individual"):
        with im.local_model_dir(storage, layout.current_model(storage, kind)["path"]) as local:
            model = im.load_model(local, lm.default_device())
        on_random = tr.evaluate(model, docs, data, random_val, influence.max_tokens)
        on_all = tr.evaluate(model, docs, data, val_rows, influence.max_tokens)
        alpha, tau = model.alpha_tau()
        summary[kind] = {"random_val": on_random, "all_val": on_all, "alpha": alpha, "tau": tau}
    table = tr.comparison_markdown({layout.ASSET_OF_KIND[kind]: result for kind, result in summary.items()})
    context.log.info("influence models on held-out trajectories:\n" + table)
    started = time.perf_counter()
    curves = {layout.ASSET_OF_KIND[kind]: _learning_curve(context, influence, source, docs, data, train_rows, val_rows,
                                                          kind, summary[kind]) for kind in ("final", "individual")}
    curve_seconds = time.perf_counter() - started
    storage.write_json(layout.INFLUENCE_REPORT, finite({**summary, "learning_curves": curves}))
    curve_table = lc.curves_markdown(curves)
    context.log.info("learning curves:\n" + curve_table)
    curve_png = plots.png_markdown(lc.curves_png(curves), "validation Spearman against oracle trajectories")
    return dg.MaterializeResult(metadata={
        "comparison": dg.MetadataValue.md(table),
        "random_heldout_trajectories": len(random_val), "all_heldout_trajectories": len(val_rows),
        **finite({f"{kind}_spearman_random_heldout": summary[kind]["random_val"].get("spearman") for kind in summary}),
        **finite({f"{kind}_spearman_all_heldout": summary[kind]["all_val"].get("spearman") for kind in summary}),
        "learning_curves": dg.MetadataValue.md(
            f"{curve_png}\n\nEvery point scored on the same {len(val_rows)} held-out trajectories ({len(random_val)} "
            f"random); below 100% a fresh model on a nested, seeded share of the training trajectories.\n\n"
            + curve_table),
        "learning_curve_fractions": dg.MetadataValue.json([p["fraction"] for p in curves["influence_model_final"]]),
        "learning_curve_seconds": round(curve_seconds, 1),
    })


def _learning_curve(context: dg.AssetExecutionContext, influence: InfluenceProfile, source: enc.EncoderSource,
                    docs: enc.ChunkedDocuments, data: tr.Trajectories, train_rows: np.ndarray, val_rows: np.ndarray,
                    kind: str, trained: dict) -> list[dict]:
    """One model kind's learning curve: fresh models as the stored one was built, its own scores at 100%. Each model
    gets a config of its own: training writes its label statistics there."""
    device = lm.default_device()

    def new_model() -> im.InfluenceModel:
        config = model_config(influence, source, relational=kind != "individual")
        return im.build_model(source, config, seed=influence.seed).to(device)

    return lc.learning_curve(new_model, docs, data, train_rows, val_rows, influence.learning_curve_fractions,
                             train_settings(influence), trained,
                             log=lambda line: context.log.info(f"{kind} learning curve: {line}"))
