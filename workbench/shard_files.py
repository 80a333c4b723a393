"""Shard files: one tensor in the safetensors format, written straight from its memory.

A capture writes ~250 KB of fp32 activations per token while the forward pass keeps both cores
busy, so how the bytes reach the disk decides its cost. Through the page cache each GB costs a
kernel copy plus flusher-thread writeback, which past ~2 GB of dirty pages competes with the
forward pass (capture 1.67x the blocks-only forward at 16k tokens here). With O_DIRECT the disk
reads our buffer: 1.21x on the same run (BENCHMARKS.md §1). Where O_DIRECT is not available
(macOS, tmpfs, an unaligned tensor) the file goes through the page cache in 1 MiB pieces.
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
from pathlib import Path

import torch

from workbench import paths

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
# Shard checksums guard against corruption, not tampering: a 128-bit xxh3 is enough and costs
# ~0.05 s per GB where sha256 cost 0.7 s, taken from the forward pass a capture overlaps with.
# Stored as "<algorithm>:<hex>"; manifests written before carry sha256.
SHARD_CHECKSUM = "xxh3_128"
# O_DIRECT wants block-aligned memory, file offsets and lengths; 4 KiB covers every block size.
_ALIGN = 4096
# Buffered writes in 1 MiB pieces: one multi-MB write() cost the kernel 1.4 s of CPU per GB on a
# VM, 1 MiB pieces 0.5 s. Direct writes wait for the device, so they go in larger pieces.
_BUFFERED_CHUNK = 1 << 20
_DIRECT_CHUNK = 1 << 22


def aligned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor whose data starts on a 4 KiB boundary, so that it (and any slice
    of leading rows) can be written with O_DIRECT."""
    nbytes = math.prod(shape) * dtype.itemsize
    raw = torch.empty(nbytes + _ALIGN, dtype=torch.uint8)
    start = -raw.data_ptr() % _ALIGN
    return raw[start : start + nbytes].view(dtype).view(shape)


def write_safetensors(
    path: Path, name: str, tensor: torch.Tensor, metadata: dict[str, str]
) -> tuple[int, str]:
    """Write one tensor as a safetensors file via a temp file + rename, with no serialised copy;
    returns (bytes written, "<algorithm>:<hex>" checksum of the file)."""
    tensor = tensor.contiguous()
    raw = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor  # numpy has no bf16
    body = memoryview(raw.numpy()).cast("B")
    prefix = _header(name, tensor, len(body), metadata)
    digest = paths.new_digest(SHARD_CHECKSUM, prefix)
    digest.update(body)
    tmp = paths.temp_path_for(path)
    try:
        if not _write_direct(tmp, prefix, body, tensor.data_ptr()):
            _write_buffered(tmp, prefix, body)
    except BaseException:
        tmp.unlink(missing_ok=True)  # e.g. a full disk: leave no half-written temp file behind
        raise
    tmp.replace(path)
    return len(prefix) + len(body), f"{SHARD_CHECKSUM}:{digest.hexdigest()}"


def _header(name: str, tensor: torch.Tensor, nbytes: int, metadata: dict[str, str]) -> bytes:
    header = {
        name: {"dtype": _ST_DTYPES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [0, nbytes]},
        "__metadata__": metadata,
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    # The format allows trailing spaces in the header: pad it so the data starts on a block
    # boundary (for O_DIRECT; also the 8-byte alignment the format asks for).
    head += b" " * (-(len(head) + 8) % _ALIGN)
    return len(head).to_bytes(8, "little") + head


def _write_direct(tmp: Path, prefix: bytes, body: memoryview, address: int) -> bool:
    """Write the file with O_DIRECT; False (nothing written) where it is not possible here."""
    direct = getattr(os, "O_DIRECT", 0)
    if not direct or body.nbytes < _ALIGN or address % _ALIGN:
        return False
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC | direct)
    except OSError:
        return False
    try:
        with mmap.mmap(-1, len(prefix)) as head:  # anonymous maps are page-aligned
            head.write(prefix)
            with memoryview(head) as view:
                _write_pieces(fd, view, _DIRECT_CHUNK)
        cut = body.nbytes // _ALIGN * _ALIGN
        _write_pieces(fd, body[:cut], _DIRECT_CHUNK)
        if cut < body.nbytes:  # the unaligned tail goes through the page cache
            import fcntl  # POSIX only, like O_DIRECT

            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~direct)
            _write_pieces(fd, body[cut:], _BUFFERED_CHUNK)
        return True
    except OSError as err:
        if err.errno == errno.EINVAL:  # the filesystem refused O_DIRECT after all (tmpfs…)
            return False
        raise
    finally:
        os.close(fd)


def _write_buffered(tmp: Path, prefix: bytes, body: memoryview) -> None:
    fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
    try:
        _write_pieces(fd, memoryview(prefix), _BUFFERED_CHUNK)
        _write_pieces(fd, body, _BUFFERED_CHUNK)
    finally:
        os.close(fd)


def _write_pieces(fd: int, data: memoryview, chunk: int) -> None:
    while data.nbytes:
        data = data[os.write(fd, data[:chunk]) :]
