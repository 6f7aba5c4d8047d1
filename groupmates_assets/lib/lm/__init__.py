"""The proxy LM of Group-MATES: model shapes, the training step shared by pretraining and oracle probes,
exactly-resumable checkpoints, in-memory snapshots for trajectory resets, and a fast reference loss.

Plain torch/transformers (no Dagster). Runs on CPU in fp32 and on CUDA with bf16 autocast, choosing by where
the model lives. Thread count is the caller's business: set ``torch.set_num_threads`` before building/using.
"""

from groupmates_assets.lib.lm.checkpoint import (
    Snapshot,
    load_checkpoint,
    load_weights,
    read_trainer_state,
    restore,
    save_checkpoint,
    snapshot,
)
from groupmates_assets.lib.lm.model import autocast_for, build_model, default_device, hf_config, param_count
from groupmates_assets.lib.lm.reference import IGNORE_INDEX, ReferenceBatch, reference_loss
from groupmates_assets.lib.lm.shapes import LM_SHAPES, LMShape, get_shape, open_lm_swiglu_hidden
from groupmates_assets.lib.lm.train import (
    CUDA_MICRO_BATCH_TOKENS,
    OptimConfig,
    current_lr,
    default_micro_batch,
    lm_loss,
    lr_at,
    make_optimizer,
    pretrain,
    set_lr,
    train_step,
)

__all__ = [
    "CUDA_MICRO_BATCH_TOKENS",
    "IGNORE_INDEX",
    "LM_SHAPES",
    "LMShape",
    "OptimConfig",
    "ReferenceBatch",
    "Snapshot",
    "autocast_for",
    "build_model",
    "current_lr",
    "default_device",
    "default_micro_batch",
    "get_shape",
    "hf_config",
    "lm_loss",
    "load_checkpoint",
    "load_weights",
    "lr_at",
    "make_optimizer",
    "open_lm_swiglu_hidden",
    "param_count",
    "pretrain",
    "read_trainer_state",
    "reference_loss",
    "restore",
    "save_checkpoint",
    "set_lr",
    "snapshot",
    "train_step",
]
