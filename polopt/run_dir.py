"""A training run's output folder: who may use it, and what the recipe writes in it.

    fresh = claim_output_dir(output_dir, cfg)      # every rank, before any work; raises ConfigError
    write_run_config(output_dir, cfg)              # rank 0, once setup succeeded
    write_results(output_dir, history, summary, title=...)   # rank 0, at the end
    remove_unstarted_run(output_dir)               # rank 0, after a failure before the first step

The policy (docs/recipe.md, "Resume a stopped run"): a non-empty output_dir is continued with
`resume=true` (if the saved `config.yaml` agrees on RESUME_FIXED_KEYS, or `resume_allow_changes=true`),
replaced with `overwrite=true` (only if it holds a polopt run), and refused otherwise. With several
ranks every rank must see the same folder (one filesystem shared by all nodes): checkpoints are
written by every rank into one folder, so per-node folders are refused before anything is written.
Every refusal is the same ConfigError on every rank, so that no rank waits for one that has left.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torchtune import utils

from polopt.config.resume import resume_config_changes
from polopt.errors import ConfigError

log = utils.get_logger("INFO")

RUN_CONFIG = "config.yaml"
HISTORY = "history.json"
SUMMARY = "summary.json"
TRAINING_CURVES = "training_curves.png"
# The shared-folder check's file: `<prefix><token>`, written by rank 0 and removed once every rank
# has looked. A leftover (a run killed in between) is ignored by the resume/overwrite rules.
SHARED_CHECK_PREFIX = ".polopt_shared_check."
# How long a rank waits to see rank 0's file: on a network filesystem a new file can take a moment
# to appear on the other nodes.
SHARED_CHECK_WAIT_S = 5.0

T = TypeVar("T")


def claim_output_dir(output_dir: str | Path, cfg: DictConfig) -> bool:
    """Take `output_dir` for this run (collective: every rank calls it). Returns whether the run
    starts afresh (False: `resume=true` continues what is there).

    Refuses, with the same one-line ConfigError on every rank: a file in place of the folder; with
    several ranks, a folder that is not the same on every node; a non-empty folder without
    `resume=true` or `overwrite=true`; `resume=true` with a config that changes the saved run;
    `overwrite=true` on a folder that holds no polopt run. Only `overwrite=true` deletes anything
    (rank 0, after every rank has looked), and only after every check has passed.
    """
    out = Path(output_dir)
    _agreed(lambda: _refuse_a_file(out))
    if _world_size() > 1:
        check_output_dir_is_shared(out)
    decision = _agreed(lambda: _resume_or_overwrite(out, cfg))
    if decision == "overwrite":
        if _rank() == 0:
            log.warning(f"overwrite=true: deleting the previous run in {out}")
            shutil.rmtree(out)
        _barrier()
    return decision != "resume"


def check_output_dir_is_shared(output_dir: str | Path) -> None:
    """Refuse a run whose ranks do not all see one `output_dir` (collective; with several nodes,
    `output_dir` must be on a filesystem every node mounts).

    Rank 0 writes a file with a random token into the folder (creating the folder if needed),
    every rank looks for it, and all ranks agree on the outcome. The file is removed afterwards,
    and on a refusal so is a folder rank 0 created for the check; no other rank writes anything.
    """
    out = Path(output_dir)
    rank = _rank()
    token, created, problem = None, False, None
    if rank == 0:
        token = secrets.token_hex(16)
        try:
            created = not out.exists()
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{SHARED_CHECK_PREFIX}{token}").write_text(token)  # readers wait for the whole token
        except OSError as e:
            problem = f"output_dir={out} cannot be written ({e.strerror or e}); set output_dir to a folder this run may write"
    shared = [token, problem]
    dist.broadcast_object_list(shared, src=0)
    token, problem = shared
    seen = problem is None and _sees_token(out / f"{SHARED_CHECK_PREFIX}{token}", token)
    views = _gather({"rank": rank, "host": socket.gethostname(), "output_dir": str(out), "seen": seen})
    if rank == 0 and problem is None:  # every rank has looked (the gather above waited for all of them)
        for leftover in out.glob(f"{SHARED_CHECK_PREFIX}*"):  # this run's, and any of a run killed here
            leftover.unlink(missing_ok=True)
    blind = [v for v in views if not v["seen"]]
    if problem is None and not blind:
        return
    if rank == 0 and created:
        shutil.rmtree(out, ignore_errors=True)  # only the empty folder made for the check
    _barrier()
    if problem is not None:
        raise ConfigError(problem, "output_dir")
    where = "; ".join(f"rank {v['rank']} on {v['host']} (output_dir={v['output_dir']})" for v in blind[:4])
    more = f" and {len(blind) - 4} more" if len(blind) > 4 else ""
    raise ConfigError(
        f"output_dir must be a folder every node sees (a shared filesystem): the file rank 0 on {views[0]['host']} "
        f"wrote into output_dir={views[0]['output_dir']} is not there for {where}{more}; set output_dir to a folder "
        "on a filesystem all nodes mount (checkpoints are written by every rank into one folder)",
        "output_dir",
    )


def write_run_config(output_dir: str | Path, cfg: DictConfig) -> None:
    """`output_dir/config.yaml`: the resolved config, which `resume=true` compares against (atomic)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_text_atomic(out / RUN_CONFIG, OmegaConf.to_yaml(OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))))


def write_results(output_dir: str | Path, history: list[dict[str, float]], summary: dict[str, Any], title: str) -> None:
    """`history.json` (per-step metrics), `summary.json` and `training_curves.png` in `output_dir`."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_text_atomic(out / HISTORY, json.dumps(history, indent=1))
    _write_text_atomic(out / SUMMARY, json.dumps(summary, indent=2))
    plot_training_curves(history, out / TRAINING_CURVES, title=title)


def remove_unstarted_run(output_dir: str | Path) -> None:
    """Delete the folder of a run that failed before its first step (nothing in it is worth keeping).
    Call only for a folder this run started afresh (`claim_output_dir` returned True), on rank 0."""
    out = Path(output_dir)
    if out.is_dir():
        shutil.rmtree(out, ignore_errors=True)


def plot_training_curves(history: list[dict[str, float]], path: str | Path, title: str) -> None:
    """Rollout mean reward per step (left) and held-out avg@k (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = [h["step"] for h in history if "reward/mean" in h]
    axes[0].plot(steps, [h["reward/mean"] for h in history if "reward/mean" in h], label="mean reward (rollout)")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("reward")
    axes[0].legend()
    val = [h for h in history if "val/accuracy" in h]
    axes[1].plot([h["step"] for h in val], [h["val/accuracy"] for h in val], marker="o", label="held-out avg@k")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("accuracy")
    axes[1].set_ylim(0, 1)
    axes[1].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------- internals
def _refuse_a_file(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir={out} is a file, not a folder; set output_dir to a folder", "output_dir")


def _resume_or_overwrite(out: Path, cfg: DictConfig) -> str:
    """What to do with `out`: "new" (empty or absent), "resume" or "overwrite"; or a ConfigError."""
    existing = sorted(p.name for p in out.iterdir() if not p.name.startswith(SHARED_CHECK_PREFIX)) if out.is_dir() else []
    if not existing:
        return "new"
    saved_config = out / RUN_CONFIG
    if cfg.resume:
        changes = resume_config_changes(saved_config, cfg) if saved_config.is_file() else []
        if changes and not cfg.resume_allow_changes:
            raise ConfigError(
                f"resume=true would change the run saved in {saved_config}: {'; '.join(changes)}; set these "
                "back, or resume_allow_changes=true to continue with the new values, or another output_dir"
            )
        if changes:
            log.warning(f"resume_allow_changes=true: continuing {out} with {'; '.join(changes)}")
        return "resume"
    shown = ", ".join(existing[:5]) + (", ..." if len(existing) > 5 else "")
    if not cfg.overwrite:
        raise ConfigError(
            f"output_dir={out} already holds files ({shown}); set resume=true to continue that run, "
            "overwrite=true to delete it and start again, or another output_dir", "output_dir"
        )
    if not (saved_config.is_file() or (out / SUMMARY).is_file()):
        raise ConfigError(f"output_dir={out} holds files ({shown}) but no polopt run (no config.yaml): "
                          "overwrite=true deletes only a polopt run's folder; set another output_dir", "output_dir")
    return "overwrite"


def _sees_token(path: Path, token: str) -> bool:
    deadline = time.monotonic() + SHARED_CHECK_WAIT_S
    while True:
        try:
            if path.read_text() == token:
                return True
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def _agreed(check: Callable[[], T]) -> T:
    """`check()` on every rank; if it raised a ConfigError on any rank, raise the lowest such rank's
    error on every rank (a collective, so that no rank goes on to wait for one that has left)."""
    if _world_size() == 1:
        return check()
    result, error = None, None
    try:
        result = check()
    except ConfigError as e:
        error = (str(e), e.key)
    first = next((e for e in _gather(error) if e is not None), None)
    if first is not None:
        _barrier()
        raise ConfigError(*first)
    return result


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _world_size() -> int:
    return dist.get_world_size() if _distributed() else 1


def _gather(obj: Any) -> list[Any]:
    gathered: list[Optional[Any]] = [None] * _world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def _barrier() -> None:
    if _distributed():
        dist.barrier()
