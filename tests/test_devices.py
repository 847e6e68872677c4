"""Device choice: defaults per device, the CPU fallback for CUDA, and `cxr worker --gpus`.

This machine has no GPU, so the fallback and the refusal below are the real behaviour here;
on a GPU host the CUDA-only branches are skipped and the GPU benchmark covers them."""

from __future__ import annotations

import logging

import pytest
import torch

from cxr.cli import gpu_children
from cxr.settings import Settings
from tests.stack import clean_env, cxr
from worker.screening.model import load_bundle

NO_GPU = not torch.cuda.is_available()


def test_defaults_follow_the_device():
    cpu = Settings(_env_file=None)
    assert (cpu.engine, cpu.max_batch) == ("onnx", 16)
    gpu = Settings(_env_file=None, device="cuda:1")
    assert (gpu.engine, gpu.max_batch) == ("torch", 64)
    explicit = Settings(_env_file=None, engine="torch", max_batch=1)
    assert (explicit.engine, explicit.max_batch) == ("torch", 1)


def test_gpu_children_maps_the_option_to_one_process_per_gpu():
    assert gpu_children("all", 4) == ["0", "1", "2", "3"]
    assert gpu_children("2,0,2", 4) == ["2", "0"]
    with pytest.raises(ValueError, match="no CUDA GPU is visible"):
        gpu_children("all", 0)
    with pytest.raises(ValueError, match="numbered 0-1"):
        gpu_children("0,5", 2)
    with pytest.raises(ValueError, match="indices such as 0,1"):
        gpu_children("first", 2)


@pytest.mark.skipif(not NO_GPU, reason="a GPU is present: the fallback path cannot be taken")
def test_cuda_request_without_a_gpu_falls_back_to_the_cpu_with_a_log_line(tiny_bundle, caplog):
    with caplog.at_level(logging.WARNING, logger="worker.screening.model"):
        loaded = load_bundle(tiny_bundle, device="cuda")
    assert loaded.device.type == "cpu"
    assert "no CUDA GPU is usable here" in caplog.text and "running on the CPU" in caplog.text


@pytest.mark.skipif(not NO_GPU, reason="a GPU is present")
def test_worker_gpus_without_a_gpu_exits_2_and_says_what_to_do(tmp_path, tiny_bundle):
    env = clean_env(CXR_HOME=str(tmp_path / "var"), CXR_CHECKPOINT=str(tiny_bundle))
    proc = cxr("worker", "--gpus", "all", env=env, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "no CUDA GPU is visible" in proc.stderr and "without --gpus" in proc.stderr


def test_prefork_concurrency_turns_off_the_default_batching_but_refuses_an_explicit_one(tmp_path, tiny_bundle):
    env = clean_env(CXR_HOME=str(tmp_path / "var"), CXR_CHECKPOINT=str(tiny_bundle), CXR_MAX_BATCH="8")
    proc = cxr("worker", "--concurrency", "2", env=env, timeout=120, check=False)
    assert proc.returncode == 2 and "CXR_MAX_BATCH > 1 runs one process" in proc.stderr
    assert Settings(_env_file=None).max_batch_is_default
    assert not Settings(_env_file=None, max_batch=16).max_batch_is_default
