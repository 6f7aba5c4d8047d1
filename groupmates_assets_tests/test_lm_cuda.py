"""The LM on a real CUDA device (the ``gpu`` tier: skipped where torch sees none). A seed gives the CPU's weights
bit for bit, whether the model is built under a CUDA default device or moved to one; test_lm.py checks the first
case on the CPU with the meta device standing in."""

from __future__ import annotations

import pytest
import torch

from groupmates_assets.lib import lm

pytestmark = pytest.mark.gpu


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().cpu() for name, param in model.named_parameters()}


def test_a_seed_gives_the_cpu_weights_on_cuda():
    expected = _weights(lm.build_model("tiny", seed=3))
    with torch.device("cuda"):
        built_on_cuda = lm.build_model("tiny", seed=3)
    moved_to_cuda = lm.build_model("tiny", seed=3, device="cuda")
    for model in (built_on_cuda, moved_to_cuda):
        assert next(model.parameters()).is_cuda
        weights = _weights(model)
        assert weights.keys() == expected.keys()
        assert [name for name in expected if not torch.equal(weights[name], expected[name])] == []
