"""Model shapes of the proxy LM: a small demo/test scale plus DCLM's real scales (method spec, Stage 2 table).

The DCLM scales are kept at their true shapes so that parameter counts can be checked against the spec
(on the ``meta`` device, without allocating anything) and so that a GPU run can use them unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


def open_lm_swiglu_hidden(d_model: int) -> int:
    """open_lm's SwiGLU width: 2/3 of 4*d, rounded up to a multiple of 256 (matches DCLM's checkpoints)."""
    return 256 * ((int(2 * 4 * d_model / 3) + 256 - 1) // 256)


@dataclass(frozen=True)
class LMShape:
    """Architecture of a decoder-only LM (pre-norm, SwiGLU, rotary, untied embeddings)."""

    name: str
    d_model: int
    n_layers: int
    n_heads: int
    seq_len: int
    vocab_size: int
    ffn_hidden: int | None = None  # None -> open_lm's SwiGLU rule
    qk_norm: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if min(self.d_model, self.n_layers, self.n_heads, self.seq_len, self.vocab_size) <= 0:
            raise ValueError(f"non-positive dimension in {self}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def hidden(self) -> int:
        """The effective SwiGLU width."""
        return self.ffn_hidden if self.ffn_hidden is not None else open_lm_swiglu_hidden(self.d_model)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LMShape:
        return cls(**data)


# GPT-NeoX-20B has 50277 tokens; padded up to a multiple of 64 for matmul efficiency.
NEOX_VOCAB_PADDED = 50304
# DCLM's open_lm configs use 50432 (a multiple of 128) for the same tokenizer.
DCLM_VOCAB = 50432

LM_SHAPES: dict[str, LMShape] = {
    shape.name: shape
    for shape in (
        # CPU proxy: ~3.4M non-embedding parameters, the 50k-vocab embeddings dominate (~26M).
        LMShape("demo", d_model=256, n_layers=4, n_heads=4, seq_len=256, vocab_size=NEOX_VOCAB_PADDED),
        # One GPU on the embedded pool (the gpu-demo profile): ~27M non-embedding parameters.
        LMShape("small", d_model=512, n_layers=8, n_heads=8, seq_len=512, vocab_size=NEOX_VOCAB_PADDED),
        # Unit tests only.
        LMShape("tiny", d_model=64, n_layers=2, n_heads=2, seq_len=64, vocab_size=NEOX_VOCAB_PADDED),
        LMShape("411m", d_model=1024, n_layers=24, n_heads=8, seq_len=2048, vocab_size=DCLM_VOCAB),
        LMShape("1b", d_model=2048, n_layers=24, n_heads=16, seq_len=2048, vocab_size=DCLM_VOCAB),
        LMShape("3b", d_model=2560, n_layers=32, n_heads=32, seq_len=2048, vocab_size=DCLM_VOCAB),
        LMShape("7b", d_model=4096, n_layers=32, n_heads=32, seq_len=2048, vocab_size=DCLM_VOCAB),
    )
}


def get_shape(name_or_shape: str | LMShape) -> LMShape:
    """Resolve a registry name (or pass a shape through), with a helpful error for typos."""
    if isinstance(name_or_shape, LMShape):
        return name_or_shape
    try:
        return LM_SHAPES[name_or_shape]
    except KeyError:
        raise KeyError(f"unknown LM shape {name_or_shape!r}; known: {sorted(LM_SHAPES)}") from None
