"""scripts/gpu_checks*.sh without a GPU, the step-only benchmark's settings, and conftest's cuda_env."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import cpu_env, cuda_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))


@pytest.mark.parametrize("script", ["gpu_checks.sh", "gpu_checks_compiled.sh"])
def test_gpu_checks_without_a_gpu_say_so_and_exit_2(tmp_path, script):
    """On a machine where torch sees no GPU (hidden here): the machine's facts, one clear sentence, exit
    status 2, no traceback, and the log under $OUT."""
    out = tmp_path / "out"
    env = cpu_env(PYTHON=sys.executable, OUT=str(out))
    result = subprocess.run(["bash", os.path.join(ROOT, "scripts", script)], cwd=str(tmp_path), env=env,
                            capture_output=True, text=True, timeout=300)
    text = result.stdout + result.stderr
    assert result.returncode == 2, text
    assert "no CUDA GPU is visible to torch on this machine" in result.stdout
    assert "Traceback" not in text
    assert f"torch {torch.__version__}" in text and "/dev/shm" in text
    log = (out / ("gpu_checks.log" if script == "gpu_checks.sh" else "gpu_checks_compiled.log")).read_text()
    assert "no CUDA GPU" in log


def test_gpu_checks_without_torch_name_the_interpreter(tmp_path):
    env = cpu_env(PYTHON=os.path.join(str(tmp_path), "no-such-python"), OUT=str(tmp_path / "out"))
    result = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_checks.sh")], cwd=str(tmp_path), env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "cannot import torch and torchvision" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_step_benchmark_times_rounds_of_steps_with_main_moco_settings():
    """scripts/bench_step.py: rounds of N steps between two synchronisations, with main_moco's process
    settings (cuDNN autotuning on, as moco.distributed.setup_process sets it for a run without --seed)."""
    import bench_step
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        result = bench_step.run({"batch": 4, "crop": 32, "moco_k": 16, "moco_dim": 8, "steps": 2, "rounds": 2,
                                 "warmup": 1, "reference": False, "device": "cpu"})
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark = before
    ours = result["ours"]
    assert ours["steps_per_round"] == 2 and len(ours["step_times_s"]) == 2 and "reference" not in result
    assert ours["min_s"] <= ours["median_s"] <= ours["max_s"] and ours["images_per_s"] == 4 / ours["median_s"]


def test_e2e_ratio_above_one_is_flagged_as_a_measurement_error():
    import bench_e2e
    row = bench_e2e.compare([100.0, 80.0], 120.0)
    assert row["step_images_per_s"] == 100.0 and row["step_images_per_s_before_after"] == [100.0, 80.0]
    assert row["ratio_e2e_over_step"] == 1.2 and "measurement_error" in row and row["step_spread"] == 0.2
    row = bench_e2e.compare([100.0, 80.0], 90.0)
    assert row["ratio_e2e_over_step"] == 0.9 and "measurement_error" not in row


def test_cuda_env_keeps_the_callers_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,6")
    assert cuda_env()["CUDA_VISIBLE_DEVICES"] == "5,6"
    assert cuda_env(one_gpu=True)["CUDA_VISIBLE_DEVICES"] == "5"
    assert cuda_env(CUDA_VISIBLE_DEVICES="6")["CUDA_VISIBLE_DEVICES"] == "6"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert "CUDA_VISIBLE_DEVICES" not in cuda_env()
    assert cuda_env(one_gpu=True)["CUDA_VISIBLE_DEVICES"] == "0"
