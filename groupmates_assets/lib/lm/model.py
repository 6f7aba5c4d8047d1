"""Build the proxy LM from transformers' Llama family, shaped and initialised like DCLM's open_lm models.

Architecture choice (open_lm itself is not on PyPI):
  * ``qk_norm=True``  -> ``Qwen3ForCausalLM``: pre-norm RMSNorm, SwiGLU, rotary, untied head, and a QK-norm
    applied before rotary like open_lm. Olmo2 has open_lm's full-width QK-norm but is *post*-norm, which is
    the bigger departure, so Qwen3 is used.
  * ``qk_norm=False`` -> ``LlamaForCausalLM`` (same layout without QK-norm).
Known deviations from open_lm (documented, small): RMSNorm instead of open_lm's gain-only LayerNorm (no mean
subtraction); QK-norm per head (``head_dim`` wide) instead of over the full ``d_model`` width, so each layer has
``2*(d_model - head_dim)`` fewer norm gains (<0.02% of parameters at 411M).
Initialisation follows open_lm's ``reset_parameters``: truncated normal (±3σ) with σ = 1/sqrt(d) for embeddings,
head, QKV and SwiGLU input projections, and depth-scaled σ for the two output projections; norm gains = 1.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # transformers is imported where a model is built: it adds about 2 s to every run's start
    from transformers import LlamaConfig, PreTrainedModel, Qwen3Config

from groupmates_assets.lib.lm.shapes import LMShape, get_shape


def default_device() -> torch.device:
    """CUDA when present, else CPU. Thread count (``torch.set_num_threads``) is the caller's business."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def autocast_for(device: torch.device | str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (as DCLM's ``amp_bfloat16``); plain fp32 on CPU, where bf16 is slow and inexact."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def hf_config(shape: LMShape) -> LlamaConfig | Qwen3Config:
    """The transformers config equivalent to ``shape`` (sdpa attention, no KV cache, untied head)."""
    common = {
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.d_model,
        "intermediate_size": shape.hidden,
        "num_hidden_layers": shape.n_layers,
        "num_attention_heads": shape.n_heads,
        "num_key_value_heads": shape.n_heads,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": shape.seq_len,
        "rms_norm_eps": shape.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(shape.rope_theta)},
        "tie_word_embeddings": False,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_cache": False,
        "attn_implementation": "sdpa",
        "bos_token_id": None,
        "eos_token_id": None,
    }
    from transformers import LlamaConfig, Qwen3Config

    if shape.qk_norm:
        return Qwen3Config(**common, use_sliding_window=False)
    return LlamaConfig(**common, mlp_bias=False)


def _trunc_normal_(param: torch.Tensor, std: float, generator: torch.Generator) -> None:
    """N(0, std²) truncated at ±3 std, like open_lm's ``trunc_normal_(std=s, a=-3s, b=3s)``.

    Sampled on CPU with a private generator (identical weights whatever the target device) by rejection:
    exact, and ~10x faster than ``torch.nn.init.trunc_normal_``'s erfinv on CPU (seconds at 411M). Every draw
    names the CPU: under ``with torch.device("cuda")`` a bare ``torch.empty`` would land on the GPU, where the
    CPU generator cannot sample.
    """
    values = torch.empty(param.shape, dtype=torch.float32, device="cpu").normal_(generator=generator)
    outside = values.abs() > 3.0
    while bool(outside.any()):  # 0.27% of draws; each pass redraws only those
        values[outside] = torch.empty(int(outside.sum()), dtype=torch.float32, device="cpu").normal_(
            generator=generator)
        outside = values.abs() > 3.0
    param.copy_(values.mul_(std))


@torch.no_grad()
def init_open_lm_(model: PreTrainedModel, shape: LMShape, seed: int) -> None:
    """Re-initialise every parameter deterministically from ``seed``, following open_lm's scheme."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    std = 1.0 / math.sqrt(shape.d_model)
    for name, param in model.named_parameters():  # fixed order -> deterministic
        leaf = name.rsplit(".", 2)[-2]
        if "norm" in leaf:
            param.fill_(1.0)
        elif leaf in ("embed_tokens", "lm_head", "q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
            _trunc_normal_(param, std, generator)
        elif leaf == "o_proj":
            layer = int(name.split(".layers.")[1].split(".")[0])
            _trunc_normal_(param, std / math.sqrt(2 * (layer + 1)), generator)
        elif leaf == "down_proj":
            layer = int(name.split(".layers.")[1].split(".")[0])
            _trunc_normal_(param, 1.0 / math.sqrt(shape.hidden) / math.sqrt(2 * (layer + 1)), generator)
        else:
            raise RuntimeError(f"no init rule for parameter {name}")


def build_model(
    shape: LMShape | str, seed: int = 0, device: torch.device | str | None = None, initialize: bool = True
) -> PreTrainedModel:
    """A freshly initialised fp32 LM of ``shape``; same seed -> bitwise-identical weights on any device.

    Under ``with torch.device("meta"):`` nothing is allocated or initialised (for parameter counting).
    ``initialize=False`` skips the open_lm init (weights about to be overwritten by a checkpoint).
    """
    shape = get_shape(shape)
    config = hf_config(shape)
    from transformers import LlamaForCausalLM, Qwen3ForCausalLM

    cls = Qwen3ForCausalLM if shape.qk_norm else LlamaForCausalLM
    with torch.random.fork_rng(devices=[]):  # transformers' own init must not disturb the caller's RNG
        # the CPU generator only: torch.manual_seed would also reseed the CUDA generators, which fork_rng(devices=[])
        # does not restore (the model is built on the CPU either way)
        torch.default_generator.manual_seed(int(seed))
        model = cls(config)
    if initialize and not _on_meta(model):
        init_open_lm_(model, shape, seed)
    if device is not None:
        model.to(torch.device(device))
    model.train()
    return model


def _on_meta(model: torch.nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def _params(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    return ((n, p) for n, p in model.named_parameters() if p.requires_grad)


def param_count(shape: LMShape | str, embeddings: bool = True) -> int:
    """Parameters of ``shape`` counted on the meta device (no memory); ``embeddings=False`` drops both
    the input embedding and the untied output head."""
    with torch.device("meta"):
        model = build_model(shape)
    total = 0
    for name, param in _params(model):
        if not embeddings and ("embed_tokens" in name or "lm_head" in name):
            continue
        total += param.numel()
    return total
