"""--device / --dtype: explicit cpu works, a GPU this machine lacks is one readable line (CLI exit 2,
before any model loads), fp16 is refused on CPU, and a non-fp32 model is a different identity."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from workbench import cli as cli_module
from workbench.models import DeviceError, load_model, resolve_device, resolve_dtype

NO_GPU = "CUDA was asked for (--device cuda) but torch sees no GPU; use --device cpu"


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_explicit_cpu_and_the_default(no_gpu, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("WORKBENCH_DEVICE", "")
    assert resolve_device() == "cpu"  # no GPU: the default is the CPU
    assert resolve_device("cpu") == "cpu"
    monkeypatch.setenv("WORKBENCH_DEVICE", "cpu")  # what --device sets for the process
    model = load_model(str(tiny_model_dir), device="cpu")
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert "dtype" not in model.workbench.identity()  # fp32 keys are unchanged


def test_cuda_without_a_gpu_is_one_line(no_gpu):
    with pytest.raises(DeviceError) as err:
        resolve_device("cuda")
    assert str(err.value) == NO_GPU
    with pytest.raises(DeviceError, match=r"^unknown device 'tpu'; use cpu, cuda or cuda:N$"):
        resolve_device("tpu")


def test_fp16_on_cpu_is_refused_bf16_is_its_own_identity(tiny_model_dir):
    with pytest.raises(DeviceError) as err:
        resolve_dtype("fp16", "cpu")
    assert str(err.value) == "--dtype fp16 is for GPUs; on CPU use fp32 (default) or bf16"
    assert resolve_dtype(None, "cpu") is torch.float32
    model = load_model(str(tiny_model_dir), device="cpu", dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.workbench.identity()["dtype"] == "bfloat16"


def test_cli_refuses_before_any_work(no_gpu, monkeypatch):
    for name in ("WORKBENCH_DEVICE", "WORKBENCH_DTYPE"):  # restored after: the CLI sets them
        monkeypatch.setenv(name, "")
    runner = CliRunner()
    done = runner.invoke(cli_module.cli, ["--device", "cuda", "models"])
    assert done.exit_code == 2
    assert done.output.strip() == f"error: {NO_GPU}"
    done = runner.invoke(cli_module.cli, ["--device", "cpu", "--dtype", "fp16", "models"])
    assert done.exit_code == 2
    assert done.output.strip() == "error: --dtype fp16 is for GPUs; on CPU use fp32 (default) or bf16"
    done = runner.invoke(cli_module.cli, ["--device", "cpu", "models"])
    assert done.exit_code == 0, done.output
    assert "smollm2-135m" in done.output
