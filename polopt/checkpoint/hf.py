"""The model in Hugging Face format: the starting weights read from an HF folder, the final model written as one.

The final model is written with torchtune's `FullModelHFCheckpointer` (which converts torchtune's
parameter names to HF's) into a temporary folder, tidied into a plain HF model directory
(`model.safetensors`, config, tokenizer, `polopt.json`) and renamed to `<output_dir>/final`, so
transformers, vLLM and polopt's own recipes (`model_dir=<output_dir>/final`) load it as it is.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from polopt.errors import ConfigError


def load_hf_model(checkpointer_cfg) -> tuple[Any, dict[str, torch.Tensor]]:
    """(checkpointer, torchtune state dict) of the HF model folder `checkpointer_cfg.checkpoint_dir`,
    through `torchtune.config.instantiate(checkpointer_cfg)`. Its output folder is a scratch one
    that is removed after loading (reading a model writes nothing). A folder that is not an HF
    model, or that lacks the configured weight files, is a `ConfigError` naming the key to set."""
    from torchtune import config, training

    checkpoint_dir = Path(str(checkpointer_cfg.get("checkpoint_dir", "")))
    if not (checkpoint_dir / "config.json").is_file():
        what = "no such folder" if not checkpoint_dir.is_dir() else "not an HF model folder (no config.json)"
        raise ConfigError(f"model_dir / checkpointer.checkpoint_dir={checkpoint_dir}: {what} (resolved: "
                          f"{checkpoint_dir.resolve()}); set model_dir to an HF model folder", "model_dir")
    scratch = tempfile.mkdtemp(prefix="polopt-checkpointer-")
    try:
        checkpointer = config.instantiate(checkpointer_cfg, output_dir=scratch)
        return checkpointer, checkpointer.load_checkpoint()[training.MODEL_KEY]
    except ValueError as e:  # torchtune: "No file with name: ... found in ..."
        if "No file with name" not in str(e):
            raise
        present = sorted(p.name for p in checkpoint_dir.glob("*.safetensors")) or "none"
        raise ConfigError(f"{e}; *.safetensors there: {present}; set checkpointer.checkpoint_files",
                          "checkpointer.checkpoint_files") from e
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# What an HF model directory holds besides its weights; anything else in the base model's folder
# (its data files, its evaluation results, its README) describes the base model, not this one.
HF_MODEL_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
    "merges.txt", "special_tokens.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "chat_template.jinja", "chat_template.json", "LICENSE", "NOTICE",
)
SAFETENSORS_INDEX = "model.safetensors.index.json"


def save_hf_model(
    checkpointer_factory,
    state_dict: dict[str, torch.Tensor],
    output_dir: str | Path,
    loaded_checkpointer=None,
    *,
    training_info: Optional[dict[str, Any]] = None,
) -> Path:
    """Write `state_dict` (torchtune names) as a clean HF model folder `<output_dir>/final`, atomically.

    `checkpointer_factory(output_dir)` builds the config's HF checkpointer writing into a temporary
    folder; its `epoch_0` output is tidied and renamed to `final`:
    - one shard becomes `model.safetensors` (no index), the name HF, vLLM and a torchtune config's
      `checkpoint_files: [model.safetensors]` expect; several shards keep HF's
      `model-0000i-of-0000n.safetensors` names and index (torchtune reads them with
      `checkpoint_files: {filename_format: ..., max_filename: ...}`);
    - of the base model's other files only config, generation config, tokenizer and licence files
      (`HF_MODEL_FILES`) are kept;
    - `polopt.json` records `training_info` (how this model was trained).
    torchtune's HF checkpointer only knows how to shard what it has loaded (its weight map):
    `loaded_checkpointer`, the one that loaded the starting weights, lends it that map instead of
    reading the whole checkpoint again.
    """
    output_dir = Path(output_dir)
    final = output_dir / "final"
    staging = Path(tempfile.mkdtemp(prefix=".final.", dir=output_dir))
    try:
        checkpointer = checkpointer_factory(str(staging))
        if getattr(checkpointer, "_weight_map", "") is None:
            if loaded_checkpointer is not None and getattr(loaded_checkpointer, "_weight_map", None):
                checkpointer._weight_map = loaded_checkpointer._weight_map
            else:
                checkpointer.load_checkpoint()
        # torchtune logs the staging path, which is gone a moment later; the caller logs `final`.
        with _quiet_torchtune_logger():
            checkpointer.save_checkpoint({"model": state_dict}, epoch=0, intermediate_checkpoint=False)
        written = staging / "epoch_0"
        _tidy_hf_dir(written)
        if training_info is not None:
            (written / "polopt.json").write_text(json.dumps(training_info, indent=2) + "\n")
        _chmod_like_umask(written)
        if final.exists():
            shutil.rmtree(final)
        os.replace(written, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _tidy_hf_dir(folder: Path) -> None:
    shards = sorted(folder.glob("*.safetensors"))
    for path in folder.iterdir():
        if path.suffix == ".safetensors" or path.name == SAFETENSORS_INDEX or path.name in HF_MODEL_FILES:
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    if len(shards) == 1:
        shards[0].rename(folder / "model.safetensors")
        (folder / SAFETENSORS_INDEX).unlink(missing_ok=True)


def _chmod_like_umask(folder: Path) -> None:
    """mkdtemp makes 0700 folders: give `final` the modes any other new folder would get."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def _quiet_torchtune_logger():
    logger = logging.getLogger("torchtune.utils._logging")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
