"""What `resume=true` refuses to change: the keys that define a run, compared with its saved config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

# What a run *is*: `resume=true` refuses to continue a run with other values for these (unless
# `resume_allow_changes=true`). max_steps, logging, checkpointing, validation and the engine may change.
RESUME_FIXED_KEYS = (
    "loss",
    "loss_args.<loss>",
    "seed",
    "model",
    "optimizer",
    "dataset",
    "shuffle",
    "rollout.num_prompts",
    "rollout.num_samples",
    "rollout.temperature",
    "rollout.top_p",
    "rollout.top_k",
    "rollout.max_new_tokens",
    "filter",
    "num_minibatches",
    "recompute_old_logprobs",
)


def resume_config_changes(saved_path: str | Path, new: DictConfig) -> list[str]:
    """`"key: old -> new"` for each RESUME_FIXED_KEYS entry on which the run config saved at
    `saved_path` and the (validated) `new` config differ."""
    saved = OmegaConf.load(saved_path)
    new_resolved = OmegaConf.create(OmegaConf.to_container(new, resolve=True))
    changes = []
    for key in RESUME_FIXED_KEYS:
        key = key.replace("<loss>", str(saved.get("loss")))
        before, after = OmegaConf.select(saved, key), OmegaConf.select(new_resolved, key)
        if key.startswith("loss_args.") and saved.get("loss") == new_resolved.get("loss"):
            # the loss's hyperparameters as built, defaults included: `{}` and the defaults spelt out agree
            before, after = _loss_hparams(saved.loss, before), _loss_hparams(saved.loss, after)
            if isinstance(before, dict) and isinstance(after, dict):  # name only what changed
                changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
                before, after = ({k: d.get(k) for k in changed} for d in (before, after))
        if before != after:
            changes.append(f"{key}: {_plain(before)} -> {_plain(after)}")
    return changes


def _loss_hparams(loss: str, section: Any) -> Any:
    """{hyperparameter: value} of `loss` built from a `loss_args` section (the section itself if the
    loss cannot be built here, e.g. a module of the saved run that is not imported)."""
    from polopt.losses import get_loss, loss_hparams

    kwargs = _plain(section) or {}
    try:
        built = get_loss(loss, **kwargs)
    except (KeyError, ValueError, TypeError):
        return section
    return {name: _plain(getattr(built, name, None)) for name in sorted(loss_hparams(loss))}


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value
