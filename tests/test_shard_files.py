"""Shard files: valid safetensors (readable by safetensors itself) with a checksum of their bytes."""

import os

import pytest
import torch
import xxhash
from safetensors import safe_open
from safetensors.torch import load_file

from workbench import shard_files
from workbench.shard_files import aligned_empty, write_safetensors


@pytest.mark.parametrize(
    "shape,dtype",
    [((1024, 576), torch.float32), ((37, 5), torch.float32), ((300, 7, 11), torch.bfloat16)],
)
def test_shard_file_round_trip_and_checksum(tmp_path, shape, dtype):
    tensor = torch.randn(shape).to(dtype)
    path = tmp_path / "shard.safetensors"
    size, checksum = write_safetensors(path, "acts", tensor, {"site": "x"})
    data = path.read_bytes()
    assert size == len(data) and checksum == f"xxh3_128:{xxhash.xxh3_128(data).hexdigest()}"
    assert (int.from_bytes(data[:8], "little") + 8) % 4096 == 0  # data on a block boundary
    assert torch.equal(load_file(path)["acts"], tensor)
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"site": "x"}
    assert not list(tmp_path.glob(".*.tmp"))


def _direct_io_works(folder) -> bool:
    try:
        os.close(os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | getattr(os, "O_DIRECT", 0)))
        return hasattr(os, "O_DIRECT")
    except OSError:
        return False


@pytest.mark.parametrize("rows", [1024, 1000])  # 1000 x 7 floats: a tail that is not whole blocks
def test_aligned_buffers_are_written_with_o_direct(tmp_path, monkeypatch, rows):
    if not _direct_io_works(tmp_path):
        pytest.skip("no O_DIRECT on this filesystem")
    buffer = aligned_empty((rows + 5, 7), torch.float32)
    assert buffer.data_ptr() % 4096 == 0
    buffer.copy_(torch.randn(rows + 5, 7))
    monkeypatch.setattr(shard_files, "_write_buffered", None)  # fail loudly if taken
    path = tmp_path / "shard.safetensors"
    size, checksum = write_safetensors(path, "acts", buffer[:rows], {})
    data = path.read_bytes()
    assert size == len(data) and checksum == f"xxh3_128:{xxhash.xxh3_128(data).hexdigest()}"
    assert torch.equal(load_file(path)["acts"], buffer[:rows])


def test_unaligned_tensors_and_refusing_filesystems_fall_back_to_buffered_writes(tmp_path, monkeypatch):
    tensor = aligned_empty((2048 + 1, 3), torch.float32).copy_(torch.randn(2049, 3))[1:]  # 12 B off
    write_safetensors(tmp_path / "a.safetensors", "acts", tensor, {})
    assert torch.equal(load_file(tmp_path / "a.safetensors")["acts"], tensor)

    real_open = os.open

    def refuse_direct(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(22, "Invalid argument")  # what tmpfs-like filesystems answer
        return real_open(path, flags, *args)

    monkeypatch.setattr(shard_files.os, "open", refuse_direct)
    aligned = aligned_empty((1024, 3), torch.float32).copy_(torch.randn(1024, 3))
    write_safetensors(tmp_path / "b.safetensors", "acts", aligned, {})
    assert torch.equal(load_file(tmp_path / "b.safetensors")["acts"], aligned)
