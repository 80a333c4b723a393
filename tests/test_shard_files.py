"""Shard files: valid safetensors (readable by safetensors itself) with a checksum of their bytes."""

import pytest
import torch
import xxhash
from safetensors import safe_open
from safetensors.torch import load_file

from workbench.store import write_safetensors


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
    assert (int.from_bytes(data[:8], "little") + 8) % 8 == 0  # the format's data alignment
    assert torch.equal(load_file(path)["acts"], tensor)
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"site": "x"}
    assert not list(tmp_path.glob(".*.tmp"))
