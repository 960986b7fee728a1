"""Reading checkpoint files that anyone may have written: tensors only, never arbitrary objects.

A pickle can run any code while it is read. splitgraph reads two kinds of checkpoint files:

- `model.pt` (`checkpoint.init_from`): `torch.load(weights_only=True)`, whose unpickler admits
  tensors and plain containers only; the result must be a flat `{name: tensor}` dict.
- `torch.distributed.checkpoint` directories: the tensor data is read by DCP with
  `weights_only=True`, but DCP reads its `.metadata` file with plain `pickle.load` (torch 2.13,
  `FileSystemReader.read_metadata`), and would unpickle "bytes" entries with
  `weights_only=False`. `SafeReader` replaces the first with an unpickler that admits only
  DCP's metadata classes for tensors (not `BytesStorageMetadata`: so no bytes entry can be
  declared), torch.Size and dtypes, and refuses stream transforms and data files outside the
  checkpoint directory.

Every refusal is a `CheckpointError` naming the file and what was refused.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata

from splitgraph.errors import CheckpointError

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
#: every global a DCP .metadata of tensors needs (found by recording a real file's find_class)
_ALLOWED = {
    (_DCP_METADATA, "Metadata"),
    (_DCP_METADATA, "MetadataIndex"),
    (_DCP_METADATA, "StorageMeta"),
    (_DCP_METADATA, "TensorProperties"),
    (_DCP_METADATA, "TensorStorageMetadata"),
    (_DCP_METADATA, "ChunkStorageMetadata"),
    (_DCP_METADATA, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a lookup of torch's layouts by name
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "Path"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}")


def read_metadata(path: str | Path) -> Metadata:
    """The `.metadata` of a DCP checkpoint directory, read without running foreign code."""
    file = Path(path) / ".metadata"
    try:
        data = file.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path} is not a readable checkpoint: {e}") from e
    try:
        meta = _MetadataUnpickler(io.BytesIO(data)).load()
    except Exception as e:
        raise CheckpointError(
            f"{file} was refused: it is damaged or holds objects other than checkpoint "
            f"metadata ({e})."
        ) from e
    if not isinstance(meta, Metadata):
        raise CheckpointError(f"{file} holds a {type(meta).__name__}, not checkpoint metadata.")
    for info in (meta.storage_data or {}).values():
        rel = str(getattr(info, "relative_path", ""))
        if not rel or "/" in rel or "\\" in rel or rel.startswith("."):
            raise CheckpointError(f"{file} points at a data file outside the checkpoint: {rel!r}.")
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"{file} asks for stream transforms; refused.")
    return meta


class SafeReader(FileSystemReader):
    """DCP's file reader with the metadata read by `read_metadata` above."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:
            raise CheckpointError("per-rank metadata files are not used by splitgraph.")
        meta = read_metadata(Path(self.path))
        if meta.storage_meta is not None:
            meta.storage_meta.load_id = self.load_id
        return meta


def load_tensor_dict(path: str | Path, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A flat `{name: tensor}` dict from a `torch.save` file, with `weights_only=True`."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{what} {str(p)!r} does not exist or is not a file.")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{what} {str(p)!r} was refused: it is damaged or holds objects other than "
            f"tensors, which splitgraph never unpickles ({_reason(e)})."
        ) from e
    except Exception as e:
        raise CheckpointError(f"{what} {str(p)!r} is not a readable torch file: {e}") from e
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        kind = type(obj).__name__ if not isinstance(obj, dict) else "a dict of other things"
        raise CheckpointError(
            f"{what} {str(p)!r} must be a state dict {{name: tensor}} such as a run's "
            f"model.pt; found {kind}."
        )
    return obj


def _reason(e: Exception) -> str:
    """The one line of torch's long weights_only message that says what was refused."""
    text = str(e)
    tail = text.split("WeightsUnpickler error:", 1)[-1]
    lines = [x.strip() for x in tail.splitlines() if x.strip()]
    return lines[0].split(". Please use")[0] if lines else type(e).__name__
