"""The GGUF header (metadata and tensor table), read with struct: the one GGUF parser of the project.

The decoder reads single rows of the token-embedding table through it (`LlamaDecoder.token_embeddings`,
metadata values skipped); the tests read every key of an export with it.
"""

from __future__ import annotations

import dataclasses
import mmap
import struct
from pathlib import Path
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"


class GGUFError(ValueError):
    """Not a GGUF file, or a header this reader does not understand (one line naming the file)."""


_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    name: str
    ggml_type: int
    shape: tuple[int, ...]  # numpy order (outermost first), as written from the torch shape
    offset: int  # absolute file offset of the data


@dataclasses.dataclass
class GGUFContents:
    kv: dict[str, Any]
    tensors: dict[str, GGUFTensor]
    path: Path

    def raw(self, name: str, nbytes: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self.tensors[name].offset)
            return f.read(nbytes)


def read_gguf(path: Path | str, *, values: bool = True) -> GGUFContents:
    """Parse a GGUF header (metadata + tensor table) in well under a second.

    gguf-py's GGUFReader builds numpy views per array element and needs ~20 s
    for a 151,936-token vocabulary; this reader is also independent of the
    gguf-py writer the exporter uses (the tests read exports with it).
    `values=False` skips the metadata values (only `general.alignment` is read):
    the tensor table of a large vocabulary in milliseconds.
    """
    path = Path(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        buf = memoryview(mm)
        try:
            pos = 0

            def take(fmt: str) -> Any:
                nonlocal pos
                (value,) = struct.unpack_from(fmt, buf, pos)
                pos += struct.calcsize(fmt)
                return value

            def string() -> str:
                nonlocal pos
                n = take("<Q")
                s = bytes(buf[pos : pos + n]).decode("utf-8")
                pos += n
                return s

            def skip(vtype: int) -> None:
                nonlocal pos
                if vtype in _SCALARS:
                    pos += struct.calcsize(_SCALARS[vtype])
                elif vtype == _STRING:
                    n = take("<Q")
                    pos += n
                elif vtype == _ARRAY:
                    itype, n = take("<I"), take("<Q")
                    if itype in _SCALARS:
                        pos += n * struct.calcsize(_SCALARS[itype])
                    else:
                        for _ in range(n):
                            skip(itype)
                else:
                    raise GGUFError(f"{path}: unknown GGUF value type {vtype}")

            def value(vtype: int) -> Any:
                nonlocal pos
                if vtype in _SCALARS:
                    return take(_SCALARS[vtype])
                if vtype == _STRING:
                    return string()
                if vtype == _ARRAY:
                    itype, n = take("<I"), take("<Q")
                    if itype in _SCALARS:
                        dt = np.dtype(_SCALARS[itype].replace("?", "b1"))
                        arr = np.frombuffer(buf, dtype=dt, count=n, offset=pos).copy()
                        pos += n * dt.itemsize
                        return arr.tolist()
                    return [value(itype) for _ in range(n)]
                raise GGUFError(f"{path}: unknown GGUF value type {vtype}")

            if bytes(buf[:4]) != GGUF_MAGIC:
                raise GGUFError(f"{path}: not a GGUF file")
            pos = 4
            take("<I")  # version
            n_tensors, n_kv = take("<Q"), take("<Q")
            kv: dict[str, Any] = {}
            for _ in range(n_kv):
                key = string()
                vtype = take("<I")
                if values or key == "general.alignment":
                    kv[key] = value(vtype)
                else:
                    skip(vtype)
            infos = []
            for _ in range(n_tensors):
                name = string()
                dims = [take("<Q") for _ in range(take("<I"))]
                infos.append((name, take("<I"), tuple(reversed(dims)), take("<Q")))
            align = int(kv.get("general.alignment", 32))
            data_start = (pos + align - 1) // align * align
        finally:
            buf.release()
    tensors = {n: GGUFTensor(n, t, s, data_start + off) for n, t, s, off in infos}
    return GGUFContents(kv=kv, tensors=tensors, path=path)
