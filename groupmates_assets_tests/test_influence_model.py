"""The relational influence model: invariants T1-T5 and T7 of the method spec (T6, trained alpha and tau, in
test_influence_training.py), the closed form, persistence."""

import numpy as np
import pytest
import torch

from groupmates_assets.lib.influence import encoder as enc
from groupmates_assets.lib.influence import model as im

pytestmark = pytest.mark.unit

TEXTS = [
    "The mitochondrion is the powerhouse of the cell and produces ATP through respiration.",
    "PostgreSQL supports transactions, indexes and a rich set of data types.",
    "Why did the chicken cross the road? To get to the other side.",
    "Python lists are mutable sequences, typically used to store collections of homogeneous items.",
    "The French Revolution began in 1789 and reshaped European politics for a century.",
    "VERA: Virtual Environment for Reactor Applications.",
    "A compiler translates source code written in one programming language into another language.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "", "ok",
] * 2


@pytest.fixture(scope="module")
def source():
    return enc.resolve_encoder(None)


@pytest.fixture(scope="module")
def docs(source):
    return enc.chunk_documents(enc.load_encoder_tokenizer(source), TEXTS, chunk_len=8, chunks=3)


@pytest.fixture()
def model(source):
    torch.manual_seed(0)
    built = im.build_model(source, im.InfluenceModelConfig(chunk_len=8, chunks=3, encoder_layers=1))
    with torch.no_grad():  # a head with a visible spread of u, so relational effects are not lost in noise
        built.head.weight.normal_(0, 1.0)
    return built.eval()


def test_chunking_respects_budget_and_keeps_empty_documents(docs):
    counts = np.diff(docs.doc_chunks)
    assert len(docs) == len(TEXTS)
    assert counts.min() >= 1 and counts.max() <= 3
    assert all(1 <= len(t) <= 8 for t in docs.chunk_tokens)
    assert docs.chunk_tokens[docs.doc_chunks[8]].tolist() == [101, 102]  # "" -> [CLS] [SEP]
    assert docs.chunk_tokens[0][0] == 101 and docs.chunk_tokens[1][0] != 101  # only chunk 1 starts with [CLS]


def test_trimmed_layout_equals_padded_layout(model, docs):
    with torch.no_grad():
        trimmed = model.embed(docs, np.arange(len(docs)))
        padded = model.embed(docs, np.arange(len(docs)), layout="padded")
    assert torch.allclose(trimmed, padded, atol=1e-5)
    assert torch.all(trimmed.norm(dim=-1) <= 1 + 1e-5)  # a mean of unit vectors


def test_reference_empty_chunks_flag_changes_short_documents_only(source, docs):
    torch.manual_seed(0)
    ours = im.build_model(source, im.InfluenceModelConfig(chunk_len=8, chunks=3, encoder_layers=1)).eval()
    reference = im.InfluenceModel(ours.encoder, im.InfluenceModelConfig(chunk_len=8, chunks=3,
                                                                        reference_empty_chunks=True)).eval()
    with torch.no_grad():
        a, b = ours.embed(docs, np.arange(len(docs))), reference.embed(docs, np.arange(len(docs)))
    full = np.diff(docs.doc_chunks) == 3
    assert torch.allclose(a[full], b[full], atol=1e-5)
    assert not torch.allclose(a[~full], b[~full], atol=1e-3)


def test_t1_first_position_is_individual(model, docs):
    trajectories = np.array([[0, 1, 2, 3, 4], [5, 6, 7, 1, 0]])
    with torch.no_grad():
        h = model.embed(docs, trajectories.reshape(-1)).view(2, 5, -1)
        u = model.individual(h)
        pred = model.trajectory_predictions(h, u)
    assert torch.equal(pred[:, 0], u[:, 0])


def test_t2_causality(model, docs):
    with torch.no_grad():
        base = model(docs, np.array([[0, 1, 2, 3]]))[0]
        later_changed = model(docs, np.array([[0, 1, 2, 7]]))[0]
        earlier_changed = model(docs, np.array([[5, 1, 2, 3]]))[0]
    assert torch.equal(base[:3], later_changed[:3])
    assert not torch.allclose(base[1:], earlier_changed[1:])


def test_t3_zeroed_relationships_give_alpha_times_u():
    h = torch.zeros(2, 4, 6)
    u = torch.randn(2, 4)
    pred = im.relational_predictions(h, u, alpha=torch.tensor(1.7), tau=torch.tensor(0.4))
    assert torch.allclose(pred[:, 1:], 1.7 * u[:, 1:])
    assert torch.equal(pred[:, 0], u[:, 0])


def test_duplicate_has_no_marginal_effect_with_unit_embeddings():
    h = torch.eye(3)[[0, 0]].unsqueeze(0)  # x2 duplicates x1
    pred = im.relational_predictions(h, torch.tensor([[-3.0, -3.0]]), 1.0, 1.0)
    assert pred[0, 1].item() == 0.0


def test_t5_batch_independence(model, docs):
    trajectories = np.array([[0, 1, 2, 3, 4], [5, 6, 7, 9, 11], [12, 13, 2, 1, 0]])
    with torch.no_grad():
        together = model(docs, trajectories)
        alone = torch.cat([model(docs, trajectories[i:i + 1]) for i in range(3)])
    assert torch.allclose(together, alone, atol=1e-6)


def _order_effects(model: im.InfluenceModel, docs) -> tuple[bool, bool]:
    """T7 as two verdicts: (order matters, prefix order does not). Items 1 and 2 stand after a different prefix
    set in the reversed trajectory (so their predictions must change); item 3 stands last after the same set in
    another order (so its prediction must not). Position-wise comparisons would pass for any model: a permutation
    moves different items into each position even when the model ignores what came before."""
    with torch.no_grad():
        pred = model(docs, np.array([[0, 1, 2, 3], [3, 2, 1, 0], [1, 2, 0, 3]]))
    after_other_prefix = not torch.allclose(pred[0, [1, 2]], pred[1, [2, 1]])
    same_prefix_set = bool(torch.allclose(pred[0, 3], pred[2, 3], atol=1e-6))
    return after_other_prefix, same_prefix_set


def test_t7_order_matters_but_prefix_order_does_not(model, docs):
    assert _order_effects(model, docs) == (True, True)


def test_t7_fails_for_a_model_without_the_relational_term(model, source, docs, monkeypatch):
    torch.manual_seed(0)
    individual = im.build_model(source, im.InfluenceModelConfig(relational=False, chunk_len=8, chunks=3,
                                                                encoder_layers=1))
    individual.load_state_dict({k: v for k, v in model.state_dict().items() if k not in ("alpha", "tau")})
    assert _order_effects(individual.eval(), docs) == (False, True)
    monkeypatch.setattr(im, "relational_predictions",  # alpha * u_t: the similarity term dropped
                        lambda h, u, alpha, tau: torch.cat([u[:, :1], alpha * u[:, 1:]], dim=1))
    assert _order_effects(model, docs) == (False, True)


def test_closed_form_equals_trajectory_forward():
    torch.manual_seed(1)
    h = torch.nn.functional.normalize(torch.randn(3, 6, 5), dim=-1) * 0.8
    u = torch.randn(3, 6)
    alpha, tau = 1.3, 0.7
    pred = im.relational_predictions(h, u, alpha, tau)
    for b in range(3):
        for t in range(1, 6):
            mean = h[b, :t].mean(0)
            closed = im.closed_form_scores(u[b, t:t + 1], h[b, t:t + 1], mean, alpha, tau)
            assert torch.allclose(pred[b, t], closed[0], atol=1e-6)


def test_individual_model_predicts_u_everywhere(source, docs):
    torch.manual_seed(0)
    individual = im.build_model(source, im.InfluenceModelConfig(relational=False, chunk_len=8, chunks=3,
                                                                encoder_layers=1)).eval()
    assert not hasattr(individual, "alpha")
    with torch.no_grad():
        h = individual.embed(docs, np.arange(4))
        pred = individual(docs, np.array([[0, 1, 2, 3]]))
    assert torch.allclose(pred[0], individual.individual(h), atol=1e-6)


def test_save_load_round_trip(model, docs, source, tmp_path):
    with torch.no_grad():
        model.alpha.fill_(0.8)
        model.tau.fill_(1.4)
    model.config.label_mean, model.config.label_std = 0.01, 0.2
    im.save_model(model, str(tmp_path / "m"), enc.load_encoder_tokenizer(source).to_str())
    loaded = im.load_model(str(tmp_path / "m"))
    trajectories = np.array([[0, 1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(model(docs, trajectories), loaded(docs, trajectories))
    assert loaded.alpha_tau() == pytest.approx((0.8, 1.4))
    assert loaded.config.label_std == 0.2 and loaded.config.encoder_layers == 1
    assert im.load_tokenizer(str(tmp_path / "m")).encode("hello world").ids[:1] == [101]


def test_missing_model_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved influence model"):
        im.load_model(str(tmp_path))


def test_half_precision_checkpoints_load_as_float32(model, source, tmp_path):
    """transformers 5 loads weights in their stored dtype; an encoder published in bf16 (or a saved config that
    names bf16) must still train and run with fp32 weights (bf16 on CUDA is autocast's, forward only)."""
    import json
    import shutil

    half = tmp_path / "bf16-encoder"
    enc.load_pretrained_encoder(source, 1).to(torch.bfloat16).save_pretrained(half)
    shutil.copy(f"{source.location}/tokenizer.json", half / "tokenizer.json")
    encoder = enc.load_pretrained_encoder(enc.resolve_encoder(str(half)))
    assert {p.dtype for p in encoder.parameters()} == {torch.float32}
    im.save_model(model, str(tmp_path / "m"), enc.load_encoder_tokenizer(source).to_str())
    config_path = tmp_path / "m" / im.ENCODER_DIR / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "dtype": "bfloat16"}))
    assert {p.dtype for p in im.load_model(str(tmp_path / "m")).parameters()} == {torch.float32}


def test_a_new_head_depends_on_the_seed_not_on_the_process_history(source):
    """The head is the only freshly drawn part of a model: drawn from the global generator, two runs of one
    configuration trained different models whenever the process had done different work before."""
    config = im.InfluenceModelConfig(chunk_len=8, chunks=3, encoder_layers=1)
    torch.manual_seed(1)
    first = im.build_model(source, config, seed=7)
    torch.rand(1000)  # other work in between moves the global generator
    state = torch.random.get_rng_state()
    second = im.build_model(source, config, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)  # and building leaves it alone
    other = im.build_model(source, config, seed=8)
    assert torch.equal(first.head.weight, second.head.weight) and torch.equal(first.head.bias, second.head.bias)
    assert not torch.equal(first.head.weight, other.head.weight)
