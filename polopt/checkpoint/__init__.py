"""Sharded training-state checkpoints that survive a crash, and the final model in HF format.

    training_state.py  resumable state: one folder per step, model and optimiser through
                       `torch.distributed.checkpoint` (DCP), the rest as JSON, renamed into place
    safe_load.py       DCP loading that unpickles nothing but tensors and plain data
    rng.py             the RNG states of Python, NumPy and torch as JSON data
    hf.py              the starting model read from an HF folder, the final model written as one

`CheckpointError` and `UnsafeCheckpointError` live in `polopt.errors` with the other user errors.
"""

from polopt.checkpoint.hf import HF_MODEL_FILES, SAFETENSORS_INDEX, load_hf_model, save_hf_model
from polopt.checkpoint.rng import rng_state, set_rng_state
from polopt.checkpoint.training_state import (
    CHECKPOINT_DIRNAME,
    TRAINER_STATE_FILE,
    latest_checkpoint,
    list_checkpoints,
    load_model_and_optimizer,
    load_training_state,
    save_training_state,
)
from polopt.errors import CheckpointError, UnsafeCheckpointError

__all__ = [
    "CHECKPOINT_DIRNAME", "HF_MODEL_FILES", "SAFETENSORS_INDEX", "TRAINER_STATE_FILE", "CheckpointError",
    "UnsafeCheckpointError", "latest_checkpoint", "list_checkpoints", "load_hf_model", "load_model_and_optimizer",
    "load_training_state", "rng_state", "save_hf_model", "save_training_state", "set_rng_state",
]
