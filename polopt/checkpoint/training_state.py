"""Sharded training-state checkpoints that survive a crash.

Resumable state (`save_training_state` / `load_training_state`) is one folder per step,
`<output_dir>/checkpoints/step_<N>/`, written by every rank together:
- model and optimiser through `torch.distributed.checkpoint` (DCP): `get_state_dict` gives each
  rank's shards under FSDP2 (whole tensors on one process), each rank writes its own `__<rank>_0.distcp`
  and rank 0 the `.metadata` index, so no rank ever holds the full state;
- `trainer_state.json` (rank 0): step, rank count, LR scheduler, metric history, NaN count, config;
- `rank_<r>.json` (each rank): its prompt stream's position and its RNG states.
The folder is written as `.step_<N>.partial/` and renamed once every rank has finished (a rename is
atomic on POSIX): a run killed mid-write leaves the previous checkpoint intact and nothing under a
final name. Older folders beyond `keep_last` are deleted after the rename; an existing `step_<N>/`
is never overwritten.

Loading reads through `polopt.checkpoint.safe_load`: nothing but tensors and plain data is unpickled.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, FileSystemWriter
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from polopt.checkpoint.safe_load import _PlainDataLoadPlanner, _PlainDataReader
from polopt.errors import CheckpointError, UnsafeCheckpointError

CHECKPOINT_DIRNAME = "checkpoints"
TRAINER_STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_OLD_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


def save_training_state(
    output_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    rank_state: dict[str, Any],
    keep_last: int = 2,
) -> Path:
    """Write the checkpoint of `step` (collective: every rank calls it) and prune to `keep_last`.

    `trainer_state` (rank 0's, the same on every rank) and `rank_state` (this rank's) must be
    JSON data; model and optimiser go through DCP. Returns the checkpoint folder.
    """
    rank, world_size = _rank_and_world_size()
    folder = Path(output_dir) / CHECKPOINT_DIRNAME
    final, staging = folder / f"step_{step}", folder / f".step_{step}.partial"
    if final.exists():  # every rank sees the same filesystem, so every rank raises
        raise CheckpointError(
            f"{final} already exists (left by an earlier run in output_dir={output_dir}): "
            "refusing to overwrite it; set resume=true to continue that run or choose a new output_dir"
        )
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)  # a leftover of a run killed while writing
        staging.mkdir(parents=True)
    _barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    with _single_process_warning_silenced():
        dcp.save({"model": model_state, "optimizer": optim_state}, storage_writer=FileSystemWriter(staging))
    _write_json(staging / f"rank_{rank}.json", rank_state)
    if rank == 0:
        _write_json(staging / TRAINER_STATE_FILE, {"step": step, "world_size": world_size, **trainer_state})
    _barrier()
    if rank == 0:
        _fsync_dir(staging)
        os.rename(staging, final)
        _fsync_dir(folder)
        for old in list_checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old)
    _barrier()
    return final


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders under `output_dir`, oldest first (`.partial` ones are ignored)."""
    folder = Path(output_dir) / CHECKPOINT_DIRNAME
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Optional[Path]:
    """The newest complete checkpoint, or None; refuses the old single-file `step_<N>.pt` format."""
    checkpoints = list_checkpoints(output_dir)
    if checkpoints:
        return checkpoints[-1]
    folder = Path(output_dir) / CHECKPOINT_DIRNAME
    old = sorted(p.name for p in folder.iterdir() if _OLD_STEP_FILE.match(p.name)) if folder.is_dir() else []
    if old:
        raise CheckpointError(
            f"{folder} holds only old single-file checkpoints ({', '.join(old)}), which resume no longer "
            "reads (they need unrestricted unpickling); set resume=false or choose a new output_dir"
        )
    return None


# ---------------------------------------------------------------------------------- load
def load_training_state(
    path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load model and optimiser in place from the checkpoint folder `path` (collective).

    Returns `(trainer_state, rank_state)` as written by `save_training_state`. A checkpoint written
    by another number of ranks is refused: DCP would reshard model and optimiser, but each rank's
    prompt-stream position and RNG state belong to that rank's share of the data.
    """
    path = Path(path)
    rank, world_size = _rank_and_world_size()
    trainer_state = _read_json(path / TRAINER_STATE_FILE)
    saved_world_size = trainer_state.get("world_size")
    if saved_world_size != world_size:
        raise CheckpointError(
            f"{path} was written by {saved_world_size} rank(s) and this run has {world_size}: model and "
            "optimiser would reshard, but each rank's prompt-stream position and RNG state cannot be "
            f"re-split; resume with --nproc_per_node {saved_world_size}, or set resume=false"
        )
    rank_state = _read_json(path / f"rank_{rank}.json")
    load_model_and_optimizer(path, model, optimizer)
    return trainer_state, rank_state


def load_model_and_optimizer(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load the DCP part of a checkpoint into `model` and `optimizer` (any sharding; collective)."""
    reader = _PlainDataReader(path)
    # Every rank checks the index before the collective load: a refusal is the same on every rank.
    reader.read_metadata()
    model_state, optim_state = get_state_dict(model, optimizer)  # the layout to load into
    state = {"model": model_state, "optimizer": optim_state}
    try:
        with _single_process_warning_silenced():
            dcp.load(state, storage_reader=reader, planner=_PlainDataLoadPlanner(Path(path)))
    except CheckpointException as e:
        refused = [exc for exc, _ in e.failures.values() if isinstance(exc, UnsafeCheckpointError)]
        if refused:
            raise refused[0] from None
        raise
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the checkpoint {path.parent} is incomplete; delete it or set resume=false") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); delete the checkpoint {path.parent} or set resume=false") from None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rank_and_world_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def _single_process_warning_silenced():
    """DCP warns on every call without a process group, which is how one-process runs use it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
