"""What a data file declares, read before any of its arrays: names, shapes, dtypes, sizes.

A data file is checked before it costs memory, so a file that declares more than the machine
can hold (a 5 MB `.npz` that inflates to 4.8 GB) is refused before the allocation, not by
the allocator::

    .npz   a zip of .npy members   each member's header (magic, then {shape, dtype, order})
                                   is read with numpy's own read_magic /
                                   read_array_header_{1,2}_0; nothing else is decompressed
    .pt    torch.save's zip        the zip directory says how many bytes every record
                                   expands to; records stored as torch writes them
                                   (uncompressed) load with mmap=True, weights_only=True:
                                   tensors mapped onto the file, shapes known, no byte
                                   read; compressed records (torch never writes them) are
                                   read only if they fit `limit`
    .pt    legacy (non-zip)        read only if the file fits `limit` (its bytes are the
                                   tensors' bytes)

`read_header` gives a `FileHeader`; `read_arrays` then reads X and y themselves, lazily where
the format allows (an `.npz` member is decompressed when taken; a mapped `.pt` tensor is read
page by page when copied).
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from splitgraph.errors import DataError
from splitgraph.units import format_bytes

#: numpy dtype.kind -> what splitgraph calls it
_NP_KINDS = {
    "f": "float",
    "i": "int",
    "u": "int",
    "b": "bool",
    "c": "complex",
    "U": "text",
    "S": "text",
    "O": "object",
}
#: the largest .npy header numpy reads without allow_pickle (numpy's own default)
_MAX_HEADER = 10000


@dataclass(frozen=True)
class ArrayInfo:
    """One entry of a data file: an array's shape and dtype, or what the entry is instead."""

    name: str
    shape: tuple[int, ...] | None  # None: not an array (see `what`)
    dtype: str = ""  # "float64", "int64", "<U5", ...
    kind: str = "other"  # float, int, bool, complex, text, object, other
    itemsize: int = 0
    layout: str = "strided"  # torch's layout for a .pt tensor (sparse_coo, sparse_csr, ...)
    what: str = ""  # for a non-array: its type ("list", "str")

    @property
    def numel(self) -> int:
        return math.prod(self.shape) if self.shape is not None else 0

    @property
    def nbytes(self) -> int:
        """Bytes of the array as stored (dense), which reading it allocates."""
        return self.numel * self.itemsize

    def describe(self) -> str:
        if self.shape is None:
            return f"{self.name} is a {self.what}"
        dims = " x ".join(f"{d:,}" for d in self.shape) or "a scalar"
        sparse = f", {self.layout}" if self.layout != "strided" else ""
        return f"{self.name} [{dims}] {self.dtype}{sparse} ({format_bytes(self.nbytes)})"


@dataclass(frozen=True)
class FileHeader:
    """What `path` declares: its X and y (if present), every name it holds, and its size."""

    path: Path
    format: str  # "npz" or "pt"
    file_bytes: int
    names: tuple[str, ...]
    arrays: dict[str, ArrayInfo]
    mapped: bool = False  # .pt mapped onto the file: reading X and y allocates nothing more

    def get(self, name: str) -> ArrayInfo | None:
        return self.arrays.get(name)

    def declared_bytes(self) -> int:
        """Bytes reading X and y allocates (as stored, dense)."""
        return sum(a.nbytes for n, a in self.arrays.items() if n in ("X", "y"))


def read_header(path: Path, limit: int | None = None) -> FileHeader:
    """The header of a `.npz` or `.pt` data file, read without loading its arrays.

    `limit`: a `.pt` that can only be read whole (compressed records, legacy format) is
    refused if it would expand beyond it. Raises DataError naming the file and the reason.
    """
    if not path.exists():
        raise DataError(f"data.path={str(path)!r} does not exist.")
    if not path.is_file():
        raise DataError(f"data.path={str(path)!r} is not a file.")
    if path.suffix not in (".npz", ".pt"):
        raise DataError(f"data.path={str(path)!r}: use a .pt or .npz file holding X and y.")
    try:
        if path.suffix == ".npz":
            return _npz_header(path)
        return _pt_header(path, limit)
    except DataError:
        raise
    except Exception as e:  # damaged, not this format, or holding objects (never unpickled)
        raise DataError(f"{path} cannot be read as a {path.suffix} file: {_reason(e)}") from e


def read_arrays(header: FileHeader, names: tuple[str, ...] = ("X", "y")) -> list[Any]:
    """The named arrays as the file holds them: numpy arrays (.npz) or tensors (.pt), not
    yet copied.

    Call only after `header` passed the memory checks: this is where bytes are read (an
    .npz member is decompressed only if named).
    """
    path = header.path
    try:
        if header.format == "npz":
            with np.load(path, allow_pickle=False) as z:
                return [z[n] for n in names]  # each decompressed once, here, not copied
        obj = _torch_load(path, header.mapped)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path} cannot be read as a {path.suffix} file: {_reason(e)}") from e
    return [obj[n] for n in names]


# -- .npz --------------------------------------------------------------------------------


def _npz_header(path: Path) -> FileHeader:
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path} cannot be read as a .npz file: it is not a zip archive.")
    arrays: dict[str, ArrayInfo] = {}
    names: list[str] = []
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                names.append(info.filename)
                continue
            name = info.filename[: -len(".npy")]
            names.append(name)
            if name not in ("X", "y"):
                continue
            with zf.open(info) as f:
                arrays[name], header_len = _npy_header(name, f, path)
            stored = info.file_size - header_len
            if arrays[name].kind != "object" and stored < arrays[name].nbytes:
                raise DataError(
                    f"{path} is damaged: {name} declares {arrays[name].describe()} but its "
                    f"member holds {format_bytes(max(stored, 0))} of data."
                )
    return FileHeader(path, "npz", path.stat().st_size, tuple(names), arrays, mapped=False)


def _npy_header(name: str, f: Any, path: Path) -> tuple[ArrayInfo, int]:
    """An .npy member's header through numpy's format helpers; (info, header bytes)."""
    fmt = np.lib.format
    version = fmt.read_magic(f)
    if version == (1, 0):
        shape, _, dtype = fmt.read_array_header_1_0(f, max_header_size=_MAX_HEADER)
    elif version == (2, 0):
        shape, _, dtype = fmt.read_array_header_2_0(f, max_header_size=_MAX_HEADER)
    else:
        raise DataError(
            f"{path}: {name} uses .npy format {version[0]}.{version[1]} (structured arrays "
            "with non-latin names); save X and y as plain numeric arrays."
        )
    consumed = f.tell() if hasattr(f, "tell") else 0
    kind = "other" if dtype.names else _NP_KINDS.get(dtype.kind, "other")
    return ArrayInfo(name, tuple(int(d) for d in shape), str(dtype), kind, dtype.itemsize), consumed


# -- .pt ---------------------------------------------------------------------------------


def _pt_header(path: Path, limit: int | None) -> FileHeader:
    size = path.stat().st_size
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            records = [i for i in zf.infolist() if "/data/" in i.filename]
        expands = sum(i.file_size for i in records)
        mapped = all(i.compress_type == zipfile.ZIP_STORED for i in records)
        if not mapped and limit is not None and expands > limit:
            raise DataError(
                f"{path} holds compressed tensor records that expand to "
                f"{format_bytes(expands)} (the file is {format_bytes(size)}), over the data "
                f"bound of {format_bytes(limit)} (data.max_memory): refused before reading. "
                "torch.save never compresses; re-save the tensors with torch.save."
            )
    else:
        mapped = False
        if limit is not None and size > limit:
            raise DataError(
                f"{path} ({format_bytes(size)}) is in torch's legacy format, which is read "
                f"whole, over the data bound of {format_bytes(limit)} (data.max_memory). "
                "Re-save it with a current torch.save, or raise data.max_memory."
            )
    obj = _torch_load(path, mapped)
    if not isinstance(obj, dict):
        raise DataError(
            f"{path} must hold a dict with tensors 'X' and 'y'; found a {type(obj).__name__}."
        )
    names = tuple(map(str, obj))
    arrays = {n: _tensor_info(n, obj[n]) for n in ("X", "y") if n in obj}
    return FileHeader(path, "pt", size, names, arrays, mapped)


def _torch_load(path: Path, mapped: bool) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mapped)


def _tensor_info(name: str, value: Any) -> ArrayInfo:
    if not isinstance(value, torch.Tensor):
        kinds, inner = [type(value).__name__], value
        while isinstance(inner, (list, tuple)) and inner and len(kinds) < 4:
            inner = inner[0]
            kinds.append(type(inner).__name__)
        return ArrayInfo(name, None, what=" of ".join(kinds))
    dt = value.dtype
    if dt.is_complex:
        kind = "complex"
    elif dt.is_floating_point:
        kind = "float"
    elif dt == torch.bool:
        kind = "bool"
    else:
        kind = "int"
    layout = str(value.layout).removeprefix("torch.")
    return ArrayInfo(
        name, tuple(value.shape), str(dt).removeprefix("torch."), kind, dt.itemsize, layout
    )


def _reason(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
