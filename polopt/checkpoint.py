"""Sharded training-state checkpoints that survive a crash, and the final model in HF format.

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

Loading unpickles nothing but tensors and plain data. DCP itself reads `.metadata` with
`pickle.load` and non-tensor items with `torch.load(weights_only=False)`, so whoever can write into
`checkpoints/` could run code in the next resumed job; here `.metadata` goes through an unpickler
that admits only DCP's own metadata classes, non-tensor items through `torch.load(weights_only=True)`,
and everything else is JSON. Anything else is refused with `UnsafeCheckpointError`.

The final model is written with torchtune's `FullModelHFCheckpointer` (which converts torchtune's
parameter names to HF's and copies config and tokenizer files), into a temporary folder that is
then renamed to `<output_dir>/final`, so transformers and vLLM load it as a model directory.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import pickle
import random
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from polopt.recipe_config import ConfigError

CHECKPOINT_DIRNAME = "checkpoints"
TRAINER_STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_OLD_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


class CheckpointError(ConfigError):
    """A checkpoint cannot be resumed by this run; the message says why and what to set."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint holds a pickle that is not tensors or plain data: refused, never unpickled."""


# ---------------------------------------------------------------------------------- save
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


def _refused(path: Path, what: str, error: Exception) -> UnsafeCheckpointError:
    lines = str(error).strip().splitlines() or [type(error).__name__]
    detail = next((line for line in lines if "GLOBAL" in line), lines[0])  # torch names the global there
    return UnsafeCheckpointError(
        f"refusing to resume from {path}: {what} is a pickle that is not tensors or plain data ({detail}); "
        "it could run code when loaded, so it was not; delete that checkpoint or set resume=false"
    )


# DCP's `.metadata` is a pickle of these dataclasses (plus torch dtypes); nothing else is admitted.
_METADATA_GLOBALS = frozenset(
    [("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    )]
    + [("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
       ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath")]
)


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP's metadata")


class _PlainDataReader(FileSystemReader):
    """DCP's file reader with `.metadata` read by `_MetadataUnpickler` instead of `pickle.load`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as metadata_file:
            try:
                metadata = _MetadataUnpickler(metadata_file).load()
            except (pickle.UnpicklingError, AttributeError, TypeError, EOFError) as e:
                raise _refused(Path(self.path), f"its {Path(path).name}", e) from None
        if not isinstance(metadata, Metadata):
            raise _refused(Path(self.path), f"its {Path(path).name}", TypeError(f"a {type(metadata).__name__}"))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _PlainDataLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, reading non-tensor items with `torch.load(weights_only=True)`."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise _refused(self.path, f"its item {fqn!r}", e) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


# ---------------------------------------------------------------------------------- plain data
def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy, torch (and CUDA) RNG states as JSON data."""
    python_version, python_internal, python_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [python_version, list(python_internal), python_gauss],
        "numpy": [np_name, np_keys.tolist(), np_pos, np_has_gauss, np_gauss],
        "torch": _bytes_to_text(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_bytes_to_text(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    python_version, python_internal, python_gauss = state["python"]
    random.setstate((python_version, tuple(python_internal), python_gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np.asarray(np_keys, dtype=np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(_text_to_bytes(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_text_to_bytes(s) for s in state["cuda"]])


def _bytes_to_text(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode("ascii")


def _text_to_bytes(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


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

def save_hf_model(
    checkpointer_factory, state_dict: dict[str, torch.Tensor], output_dir: str | Path, loaded_checkpointer=None
) -> Path:
    """Write `state_dict` (torchtune names) as an HF model folder `<output_dir>/final`, atomically.

    `checkpointer_factory(output_dir)` builds the config's HF checkpointer writing into a temporary
    folder; its `epoch_0` output is renamed to `final`. torchtune's HF checkpointer only knows how
    to shard what it has loaded (its weight map): `loaded_checkpointer`, the one that loaded the
    starting weights, lends it that map instead of reading the whole checkpoint again.
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
        checkpointer.save_checkpoint({"model": state_dict}, epoch=0, intermediate_checkpoint=False)
        written = staging / "epoch_0"
        if final.exists():
            shutil.rmtree(final)
        os.replace(written, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final
