"""Corpus stage: each selection method's corpus tokenized, packed and ordered for training at a token budget."""

import time

import dagster as dg

from groupmates_assets.defs.common import PermanentFailure, blocking_check
from groupmates_assets.defs.deployment import step_asset
from groupmates_assets.defs.partitions import SELECTION_METHODS, selection_methods
from groupmates_assets.defs.resources import PlatformResource
from groupmates_assets.defs.shared import context_len
from groupmates_assets.lib import corpus as corpus_lib
from groupmates_assets.lib import layout, lm
from groupmates_assets.lib import tokenization as tk


def token_budget(platform: PlatformResource) -> int:
    """Tokens one training run reads from a selected corpus: the corpus profile's budget, else the steps trained
    on selected data (S = 2: the LM run after the probe checkpoint; S = 1: the whole run) x batch x seq_len."""
    settings = platform.settings()
    if settings.corpus.token_budget is not None:
        return settings.corpus.token_budget
    shape = lm.get_shape(settings.lm.shape)
    steps = settings.lm.total_steps - (settings.lm.probe_steps if settings.pretrain.stages == 2 else 0)
    if steps < 1:
        raise PermanentFailure(f"the probe checkpoint is at step {settings.lm.probe_steps} of "
                               f"{settings.lm.total_steps}: S = 2 leaves no steps for the selected data")
    return steps * settings.lm.batch_size * shape.seq_len


@step_asset(
    partitions_def=selection_methods,
    # one method per run, as pretraining: a backfill puts a method's tokenizing, training and evaluation in one run
    backfill_policy=dg.BackfillPolicy.multi_run(1),
    group_name="corpus",
    code_version="tokenized-corpus-v2",
    deps=[dg.AssetDep("selected_corpus", partition_mapping=dg.AllPartitionMapping())],
    kinds={"numpy", "parquet"},
    check_specs=[blocking_check(
        "every_document_every_pass", "tokenized_corpus",
        "every selected document's tokens are packed exactly once, and every complete data pass "
        "visits every context exactly once")],
)
def tokenized_corpus(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
    """One selection method's corpus as training data: its selected documents packed into contexts of seq_len + 1 tokens
    (GPT-NeoX, EOT between documents) with lineage to doc_ids, and one training order per seed of seeded passes
    (repeated when the corpus holds fewer tokens than the budget), cut at the budget."""
    storage, settings = platform.storage(), platform.settings()
    method = context.partition_key
    if method not in SELECTION_METHODS:
        raise ValueError(f"unknown selection method {method!r}; known: {', '.join(SELECTION_METHODS)}")
    selected = corpus_lib.read_selected_corpus(storage, layout.filtered_shards(storage), method)
    tokenizer = tk.load_tokenizer(settings.tokenize.tokenizer)
    started = time.perf_counter()
    packed = tk.pack_documents(selected.doc_ids, selected.texts, tokenizer, context_len(platform),
                               tk.eot_token_id(tokenizer), batch_size=settings.tokenize.batch_size)
    seconds = time.perf_counter() - started
    budget, seeds = token_budget(platform), settings.pretrain.seeds
    plan = corpus_lib.plan_training(packed, budget, seeds, settings.corpus.seed, method)
    corpus_fp = layout.fingerprint(method=method, shards=selected.shard_hashes, context_len=packed.context_len,
                                   tokenizer=tk.tokenizer_fingerprint(tokenizer), budget=budget,
                                   seed=settings.corpus.seed, seeds=seeds)
    out = f"{layout.corpus_dir(method)}/{corpus_fp}"
    contexts = storage.write_numpy(f"{out}/contexts.npy", packed.tokens)
    lineage = packed.lineage_table()
    storage.write_parquet(f"{out}/lineage.parquet", lineage)
    order_info = storage.write_numpy(f"{out}/orders.npy", plan.orders)
    storage.write_json(f"{out}/manifest.json", _manifest(method, corpus_fp, selected, packed, plan, budget, seeds,
                                                         contexts.sha256, order_info.sha256))
    layout.write_pointer(storage, layout.corpus_dir(method), {"fingerprint": corpus_fp, "path": out})
    documents, documents_packed = len(selected.doc_ids), len(set(lineage.column("doc_id").to_pylist()))
    passed = (plan.every_pass_complete() and documents_packed == documents == len(set(selected.doc_ids))
              and packed.tokens.size == packed.total_tokens + packed.pad_tokens)
    context.log.info(f"{method}: {documents:,} documents -> {packed.total_tokens:,} tokens -> {packed.n_contexts:,} "
                     f"contexts; {plan.passes} pass(es), {plan.orders.shape[1]:,} contexts for a budget of "
                     f"{budget:,} tokens, {seeds} seed(s)")
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": packed.n_contexts, "documents": documents, "tokens": packed.total_tokens,
            "contexts": packed.n_contexts, "token_budget": budget, "passes": plan.passes,
            "training_contexts": plan.orders.shape[1], "seeds": seeds,
            "tokens_per_second": round(packed.total_tokens / seconds, 1) if seconds > 0 else None,
            "fingerprint": corpus_fp, "path": dg.MetadataValue.path(storage.url(out)),
        },
        check_results=[dg.AssetCheckResult(
            check_name="every_document_every_pass", passed=bool(passed), severity=dg.AssetCheckSeverity.ERROR,
            metadata={"documents": documents, "documents_in_lineage": documents_packed,
                      "complete_passes_checked": plan.complete_passes})],
        data_version=dg.DataVersion(contexts.sha256[:16]),
    )


def _manifest(method: str, corpus_fp: str, selected: corpus_lib.SelectedCorpus, packed: tk.PackedContexts,
              plan: corpus_lib.TrainingPlan, budget: int, seeds: int, contexts_sha256: str,
              orders_sha256: str) -> dict:
    """What pretraining reads of the corpus (key order is the file's)."""
    return {"method": method, "fingerprint": corpus_fp, "documents": len(selected.doc_ids),
            "tokens": packed.total_tokens, "contexts": packed.n_contexts, "usable_contexts": len(plan.usable),
            "pad_context": packed.pad_context, "context_len": packed.context_len, "token_budget": budget,
            "passes": plan.passes, "training_contexts": plan.orders.shape[1], "seeds": seeds,
            "shards": selected.shard_hashes, "contexts_sha256": contexts_sha256, "orders_sha256": orders_sha256}
