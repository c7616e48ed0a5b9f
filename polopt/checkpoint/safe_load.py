"""Checkpoint loading that unpickles nothing but tensors and plain data.

DCP itself reads `.metadata` with `pickle.load` and non-tensor items with
`torch.load(weights_only=False)`, so whoever can write into `checkpoints/` could run code in the next
resumed job; here `.metadata` goes through an unpickler that admits only DCP's own metadata classes,
non-tensor items through `torch.load(weights_only=True)`, and everything else is JSON. Anything else is refused with `UnsafeCheckpointError`.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from polopt.errors import UnsafeCheckpointError


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
