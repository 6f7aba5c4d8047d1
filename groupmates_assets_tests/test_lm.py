"""Behaviour of the proxy LM library: shapes, loss, schedule, training step, checkpoints, snapshots, reference loss."""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import random

import pytest
import torch
import torch.nn.functional as F

from groupmates_assets.lib import lm

pytestmark = pytest.mark.unit

TINY = lm.LM_SHAPES["tiny"]
VOCAB = 50277  # real GPT-NeoX ids; the embedding is padded to 50304


@pytest.fixture(autouse=True)
def _threads():
    """The tiny model's matmuls are too small to gain from threads; one thread also keeps timings stable on a
    busy machine (OpenMP barriers stall when the cores are oversubscribed)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("GROUPMATES_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(previous)


def _tokens(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _cfg(**overrides) -> lm.OptimConfig:
    base = {"lr": 3e-3, "weight_decay": 0.033, "warmup_steps": 2, "total_steps": 20, "final_lr": 3e-5}
    return lm.OptimConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    """One freshly built tiny model per module; tests work on deep copies (building is the slow part)."""
    return lm.build_model(TINY, seed=0)


@pytest.fixture(scope="module")
def trained_states(tiny) -> tuple[dict, dict, lm.OptimConfig]:
    """Weights and optimiser state of the tiny model part-way through a schedule (non-trivial moments and LR)."""
    model = copy.deepcopy(tiny)
    cfg = _cfg()
    optimizer = lm.make_optimizer(model, cfg)
    lm.pretrain(model, optimizer, (_tokens(2, 17, 100 + i) for i in range(3)), cfg)
    return _state(model), copy.deepcopy(optimizer.state_dict()), cfg


def _trained(tiny, trained_states) -> tuple[torch.nn.Module, torch.optim.Optimizer, lm.OptimConfig]:
    weights, optimizer_state, cfg = trained_states
    model = copy.deepcopy(tiny)
    model.load_state_dict(weights)
    optimizer = lm.make_optimizer(model, cfg)
    optimizer.load_state_dict(copy.deepcopy(optimizer_state))
    return model, optimizer, cfg


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --- shapes -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "expected"), [("411m", 411.6e6), ("1b", 1.44e9), ("3b", 2.80e9), ("7b", 6.89e9)])
def test_dclm_parameter_counts_match_spec(name: str, expected: float) -> None:
    assert lm.param_count(name) == pytest.approx(expected, rel=5e-3)


def test_dclm_shapes_are_counted_on_meta_without_allocating() -> None:
    with torch.device("meta"):
        model = lm.build_model("7b")
    assert all(p.is_meta for p in model.parameters())
    assert model.lm_head.weight is not model.model.embed_tokens.weight  # untied head


def test_swiglu_width_and_demo_count() -> None:
    assert [lm.open_lm_swiglu_hidden(d) for d in (256, 1024, 2048, 2560, 4096)] == [768, 2816, 5632, 6912, 11008]
    demo = lm.LM_SHAPES["demo"]
    d, hidden, layers = demo.d_model, demo.hidden, demo.n_layers
    per_layer = 4 * d * d + 3 * d * hidden + 2 * d + 2 * demo.head_dim  # attn, SwiGLU, 2 norms, per-head QK-norm
    assert lm.param_count(demo) == 2 * demo.vocab_size * d + layers * per_layer + d
    assert 2e6 < lm.param_count(demo, embeddings=False) < 10e6
    assert demo.vocab_size % 64 == 0 and demo.vocab_size >= VOCAB and demo.seq_len == 256


def test_same_seed_same_weights_and_caller_rng_untouched() -> None:
    torch.manual_seed(1234)
    expected_next = torch.rand(3)
    torch.manual_seed(1234)
    a = _state(lm.build_model(TINY, seed=7))
    assert torch.equal(torch.rand(3), expected_next)
    _assert_bitwise_equal(a, _state(lm.build_model(TINY, seed=7)))
    c = _state(lm.build_model(TINY, seed=8))
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    # open_lm init: truncated normal at ±3σ with σ = 1/sqrt(d); norm gains start at 1
    emb = a["model.embed_tokens.weight"]
    assert emb.abs().max() <= 3 / math.sqrt(TINY.d_model) + 1e-6
    assert emb.std().item() == pytest.approx(0.9866 / math.sqrt(TINY.d_model), rel=0.02)
    assert torch.equal(a["model.norm.weight"], torch.ones(TINY.d_model))


def test_init_draws_on_cpu_under_a_default_device_context() -> None:
    """``with torch.device("cuda"): build_model(...)`` must not send the redraws of the truncated normal to the GPU,
    where the CPU generator cannot sample; a meta default device stands in for CUDA on a CPU-only machine."""
    expected = lm.build_model(TINY, seed=3)
    model = lm.build_model(TINY, seed=0)
    with torch.device("meta"):
        lm.model.init_open_lm_(model, TINY, seed=3)
    _assert_bitwise_equal(_state(model), _state(expected))


# --- loss ---------------------------------------------------------------------------------------------------


def test_lm_loss_is_ce_plus_z_loss_by_hand(tiny) -> None:
    model = tiny
    tokens = _tokens(2, 9, 1)
    loss, ce = lm.lm_loss(model, tokens, z_loss_weight=1e-4)
    with torch.no_grad():
        logits = model(input_ids=tokens[:, :-1]).logits.double()
    targets = tokens[:, 1:]
    log_probs = logits.log_softmax(-1)
    ce_hand = -log_probs.gather(-1, targets.unsqueeze(-1)).mean()
    z_hand = torch.logsumexp(logits, -1).pow(2).mean()
    assert ce.item() == pytest.approx(ce_hand.item(), rel=1e-5)
    assert loss.item() == pytest.approx((ce_hand + 1e-4 * z_hand).item(), rel=1e-5)
    assert (loss - ce).item() > 0  # the z-loss term is really there
    no_z, _ = lm.lm_loss(model, tokens, z_loss_weight=0.0)
    assert no_z.item() == pytest.approx(ce.item(), rel=1e-6)


def test_loss_mask_ignores_right_padding(tiny) -> None:
    model = tiny
    real = _tokens(1, 10, 2)
    padded = torch.cat([real, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    mask = torch.zeros_like(padded, dtype=torch.bool)
    mask[:, :10] = True
    masked_loss, masked_ce = lm.lm_loss(model, padded, loss_mask=mask)
    loss, ce = lm.lm_loss(model, real)
    assert masked_ce.item() == pytest.approx(ce.item(), rel=1e-5)
    assert masked_loss.item() == pytest.approx(loss.item(), rel=1e-5)
    unmasked, _ = lm.lm_loss(model, padded)
    assert unmasked.item() != pytest.approx(loss.item(), rel=1e-3)


# --- schedule -----------------------------------------------------------------------------------------------


def test_lr_schedule_warmup_then_cosine_to_final() -> None:
    cfg = lm.OptimConfig(lr=1e-3, warmup_steps=10, total_steps=110, final_lr=1e-5)
    assert lm.lr_at(0, cfg) == pytest.approx(1e-4)  # open_lm: lr * (step + 1) / warmup
    assert lm.lr_at(4, cfg) == pytest.approx(5e-4)
    assert lm.lr_at(9, cfg) == pytest.approx(1e-3)
    assert lm.lr_at(10, cfg) == pytest.approx(1e-3)
    assert lm.lr_at(60, cfg) == pytest.approx((1e-3 + 1e-5) / 2)  # half-way through the cosine
    assert lm.lr_at(35, cfg) == pytest.approx(1e-5 + 0.5 * (1 + math.cos(math.pi / 4)) * (1e-3 - 1e-5))
    assert lm.lr_at(110, cfg) == pytest.approx(1e-5)
    assert lm.lr_at(500, cfg) == pytest.approx(1e-5)
    lrs = [lm.lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_optimizer_groups_follow_dclm_layout(tiny) -> None:
    model = copy.deepcopy(tiny)
    dclm = lm.make_optimizer(model, _cfg())
    assert [len(g["params"]) for g in dclm.param_groups] == [0, len(list(model.parameters()))]
    assert [g["weight_decay"] for g in dclm.param_groups] == [0.0, 0.033]
    assert dclm.param_groups[1]["betas"] == (0.9, 0.95)
    split = lm.make_optimizer(model, _cfg(no_decay_1d=True))
    assert all(p.dim() == 1 for p in split.param_groups[0]["params"]) and split.param_groups[0]["params"]
    assert all(p.dim() == 2 for p in split.param_groups[1]["params"])


# --- training step ------------------------------------------------------------------------------------------


def test_train_step_lowers_loss_on_a_repeated_batch(tiny) -> None:
    model = copy.deepcopy(tiny)
    cfg = _cfg(lr=1e-2, warmup_steps=0)
    optimizer = lm.make_optimizer(model, cfg)
    batch = _tokens(2, 33, 5)
    losses = [lm.train_step(model, optimizer, batch, cfg)["loss"] for _ in range(6)]
    assert losses[-1] < losses[0] - 1.0
    assert all(b < a for a, b in itertools.pairwise(losses))


def test_train_step_uses_optimizer_lr_unless_given(tiny) -> None:
    model = copy.deepcopy(tiny)
    cfg = _cfg()
    optimizer = lm.make_optimizer(model, cfg)
    lm.set_lr(optimizer, 1.25e-4)
    assert lm.train_step(model, optimizer, _tokens(1, 9, 0), cfg)["lr"] == 1.25e-4
    assert lm.train_step(model, optimizer, _tokens(1, 9, 0), cfg, lr=2e-4)["lr"] == 2e-4
    assert all(g["lr"] == 2e-4 for g in optimizer.param_groups)


def test_grad_clipping_reports_pre_clip_norm_and_bounds_the_update(tiny) -> None:
    clip = 1e-2
    cfg = _cfg(grad_clip=clip, z_loss=1e-4)
    batch = _tokens(2, 17, 9)
    reference = copy.deepcopy(tiny)
    loss, _ = lm.lm_loss(reference, batch, z_loss_weight=cfg.z_loss)
    loss.backward()
    true_norm = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in reference.parameters())).item()
    assert true_norm > 10 * clip

    model = copy.deepcopy(tiny)
    before = [p.detach().clone() for p in model.parameters()]
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)  # update == clipped gradient, so its size is visible
    result = lm.train_step(model, sgd, batch, cfg)
    assert result["grad_norm"] == pytest.approx(true_norm, rel=1e-4)
    step_norm = torch.sqrt(sum((p.detach() - b).double().pow(2).sum() for p, b in zip(model.parameters(), before,
                                                                                       strict=True))).item()
    assert step_norm == pytest.approx(clip, rel=1e-3)


@pytest.mark.parametrize("masked", [False, True])
def test_micro_batches_give_the_whole_batch_update(tiny, masked: bool) -> None:
    """Gradient accumulation over passes of 1 or 3 rows equals one pass over the batch (SGD with lr 1, no clip,
    so the update is the gradient); with a mask each pass weighs by its target tokens, and an all-padding row
    (a pass with nothing to score) is skipped."""
    cfg = _cfg(grad_clip=0.0, z_loss=1e-2)
    batch = _tokens(4, 17, 11)
    mask = None
    if masked:
        mask = torch.ones_like(batch, dtype=torch.bool)
        mask[0, 5:] = False
        mask[2, :] = False
        mask[3, 12:] = False
    results, weights = {}, {}
    for micro in (None, 3, 1):
        model = copy.deepcopy(tiny)
        sgd = torch.optim.SGD(model.parameters(), lr=1.0)
        results[micro] = lm.train_step(model, sgd, batch, cfg, loss_mask=mask, micro_batch=micro)
        weights[micro] = _state(model)
    for micro in (3, 1):
        for key in ("loss", "ce", "grad_norm"):
            assert results[micro][key] == pytest.approx(results[None][key], rel=1e-5), (micro, key)
        for name, value in weights[None].items():
            torch.testing.assert_close(weights[micro][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_default_micro_batch_is_the_whole_batch_off_cuda() -> None:
    assert lm.default_micro_batch(2048, "cpu") is None
    assert lm.default_micro_batch(2048, torch.device("cuda")) == lm.CUDA_MICRO_BATCH_TOKENS // 2048
    assert lm.default_micro_batch(10**6, "cuda:1") == 1


def test_pretrain_returns_a_loss_curve_on_schedule(tiny) -> None:
    model = copy.deepcopy(tiny)
    cfg = _cfg()
    optimizer = lm.make_optimizer(model, cfg)
    logged: list[dict] = []
    batches = [_tokens(2, 17, i) for i in range(5)]
    curve = lm.pretrain(model, optimizer, batches, cfg, start_step=3, steps=4, log=logged.append, log_every=2)
    assert [r["step"] for r in curve] == [4, 5, 6, 7]
    assert [r["tokens_seen"] for r in curve] == [32, 64, 96, 128]
    assert [r["lr"] for r in curve] == pytest.approx([lm.lr_at(s, cfg) for s in (3, 4, 5, 6)])
    assert [r["step"] for r in logged] == [4, 6, 7]
    assert len(lm.pretrain(model, optimizer, batches[:2], cfg, steps=10)) == 2  # stops when data runs out


# --- checkpoints and snapshots ------------------------------------------------------------------------------


def test_checkpoint_round_trip_is_bitwise(tmp_path, tiny, trained_states) -> None:
    model, optimizer, cfg = _trained(tiny, trained_states)
    ckpt = tmp_path / "ckpt"
    lm.save_checkpoint(ckpt, model, optimizer, TINY, cfg, step=3, extra={"pool": "demo"})
    assert sorted(p.name for p in ckpt.iterdir()) == ["model.safetensors", "optimizer.pt", "trainer_state.json"]
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["extra"] == {"pool": "demo"} and state["shape"]["name"] == "tiny"
    assert state["lr"] == pytest.approx(lm.lr_at(2, cfg))
    torch.load(ckpt / "optimizer.pt", weights_only=True)

    loaded, loaded_opt, loaded_state = lm.load_checkpoint(ckpt, device="cpu")
    assert loaded_state["lm_shape"] == TINY and loaded_state["optim_config"] == cfg
    _assert_bitwise_equal(_state(model), _state(loaded))
    probe = _tokens(1, 33, 77)
    a = lm.train_step(model, optimizer, probe, cfg)
    b = lm.train_step(loaded, loaded_opt, probe, cfg)
    assert a == b  # same loss, grad norm and LR (the LR saved in the optimiser state)
    _assert_bitwise_equal(_state(model), _state(loaded))


def test_snapshot_restore_gives_identical_next_steps(tmp_path, tiny, trained_states) -> None:
    model, optimizer, cfg = _trained(tiny, trained_states)
    lm.save_checkpoint(tmp_path / "c", model, optimizer, TINY, cfg, step=3)
    snap = lm.snapshot(model, optimizer)
    probe1, probe2 = _tokens(1, 33, 1), _tokens(1, 33, 2)
    first = [lm.train_step(model, optimizer, probe1, cfg), lm.train_step(model, optimizer, probe2, cfg, lr=0.1)]
    after_first = _state(model)
    storage = [p.data_ptr() for p in model.parameters()]

    lm.restore(model, optimizer, snap)
    assert [p.data_ptr() for p in model.parameters()] == storage  # in place, no reallocation
    second = [lm.train_step(model, optimizer, probe1, cfg), lm.train_step(model, optimizer, probe2, cfg, lr=0.1)]
    assert first == second
    _assert_bitwise_equal(after_first, _state(model))

    lm.restore(model, optimizer, snap)  # also restores the LR overwritten by lr=0.1
    fresh, fresh_opt, _ = lm.load_checkpoint(tmp_path / "c", device="cpu")
    assert lm.train_step(model, optimizer, probe1, cfg) == lm.train_step(fresh, fresh_opt, probe1, cfg)
    _assert_bitwise_equal(_state(model), _state(fresh))


def test_restore_to_a_stateless_snapshot_clears_adam_state(tiny) -> None:
    model = copy.deepcopy(tiny)
    cfg = _cfg()
    optimizer = lm.make_optimizer(model, cfg)
    snap = lm.snapshot(model, optimizer)
    probe = _tokens(1, 17, 3)
    first = lm.train_step(model, optimizer, probe, cfg)
    lm.restore(model, optimizer, snap)
    assert not optimizer.state
    assert lm.train_step(model, optimizer, probe, cfg) == first


def test_restored_optimizer_state_differs_from_fresh_adamw(tiny, trained_states) -> None:
    """T11: a probe step with the checkpoint's moments/LR is not a step with fresh AdamW state."""
    model, optimizer, cfg = _trained(tiny, trained_states)
    snap = lm.snapshot(model, optimizer)
    probe = _tokens(1, 33, 11)
    lm.train_step(model, optimizer, probe, cfg)
    restored_result = _state(model)

    lm.restore(model, optimizer, snap)
    fresh = lm.make_optimizer(model, cfg)  # fresh moments, step 0, lr = cfg.lr
    lm.train_step(model, fresh, probe, cfg)
    fresh_result = _state(model)
    diff = max((restored_result[k] - fresh_result[k]).abs().max().item() for k in restored_result)
    assert diff > 1e-4

    lm.restore(model, optimizer, snap)
    lm.set_lr(fresh, optimizer.param_groups[-1]["lr"])
    fresh.state.clear()
    lm.train_step(model, fresh, probe, cfg)  # same LR but no moments: still different
    assert any(not torch.equal(restored_result[k], v) for k, v in _state(model).items())


# --- reference loss -----------------------------------------------------------------------------------------


def _reference_examples(n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        length = rng.randint(5, 40)
        answer = 0 if i == 3 else rng.randint(1, 6)  # one example with nothing to score
        ids = [rng.randrange(VOCAB) for _ in range(length)]
        labels = [-100] * (length - answer) + ids[length - answer:]
        examples.append((ids, labels))
    return examples


def _naive_reference_loss(model: torch.nn.Module, examples: list[tuple[list[int], list[int]]]) -> float:
    """Full logits per example, CE on label != -100 (shifted), micro-averaged over tokens."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in examples:
            logits = model(input_ids=torch.tensor([ids[:-1]])).logits[0].double()
            targets = torch.tensor(labels[1:])
            keep = targets != -100
            total += F.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
            count += int(keep.sum())
    return total / count


def test_reference_loss_fast_path_equals_naive(tiny, trained_states) -> None:
    model, _, _ = _trained(tiny, trained_states)
    examples = _reference_examples(16, seed=4)
    ref = lm.ReferenceBatch(examples)
    naive = _naive_reference_loss(model, examples)
    model.train()
    for budget in (16384, 150, 1):  # one chunk, several chunks, one example per chunk
        assert lm.reference_loss(model, ref, max_tokens_per_forward=budget) == pytest.approx(naive, abs=1e-5)
    assert model.training  # mode restored
    assert len(ref.chunks(150, torch.device("cpu"))) > 1
    assert ref.n_scored_tokens == sum(sum(t != -100 for t in lab[1:]) for _, lab in examples)


def test_reference_loss_tracks_training_and_rejects_bad_input(tiny) -> None:
    model = copy.deepcopy(tiny)
    cfg = _cfg(lr=1e-2, warmup_steps=0)
    optimizer = lm.make_optimizer(model, cfg)
    ids = _tokens(1, 33, 8)[0].tolist()
    ref = lm.ReferenceBatch([(ids, [-100] * 16 + ids[16:])])
    before = lm.reference_loss(model, ref)
    for _ in range(3):
        lm.train_step(model, optimizer, torch.tensor([ids]), cfg)
    assert lm.reference_loss(model, ref) < before - 0.5
    with pytest.raises(ValueError):
        lm.ReferenceBatch([([1, 2, 3], [-100, -100])])
    with pytest.raises(ValueError):
        lm.ReferenceBatch([([1, 2, 3], [2, -100, -100])])  # only position 0 labelled: nothing to predict
