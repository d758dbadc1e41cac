"""benchmarks/gpu_t2i.py (full-size SDXL / FLUX DMD2 timing, for a lent GPU) runs its whole code path on the CPU
with --tiny: the same classes at test size, the Trainer's generator and critic phases with bf16 autocast, a bf16
teacher, activation checkpointing, full copies (SDXL) and a shared-base LoRA (FLUX); without CUDA the full-size run
refuses in one line."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_t2i.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_t2i", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_run_times_both_configurations(tmp_path, capsys):
    mod = load_script()
    assert mod.main(["--tiny", "--iters", "6", "--out", str(tmp_path)]) == 0
    rows = {r["config"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert set(rows) == {"sdxl", "flux"}
    for r in rows.values():
        assert r["losses_finite"] and r["sec_critic"] > 0 and r["sec_generator+critic"] > 0
        assert r["n_critic"] == 3 and r["n_generator+critic"] == 1   # DMD2's ratio 5: generator at 0 and 5
    # SDXL: full copies (generator + fake score + GAN head) train more than the teacher has; FLUX: adapters only
    assert rows["sdxl"]["trained_params"] > 2 * rows["sdxl"]["teacher_params"] and rows["sdxl"]["lora_rank"] is None
    assert rows["flux"]["trained_params"] < rows["flux"]["teacher_params"] and rows["flux"]["lora_rank"] == 4
    assert rows["sdxl"]["student_steps"] == 4
    assert "| sdxl |" in capsys.readouterr().out


def test_full_size_run_refuses_without_cuda(capsys):
    mod = load_script()
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert mod.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert mod.main(["--tiny", "--configs", "sd9"]) == 2
    # the published configurations the full-size run builds
    assert mod.SDXL_UNET["projection_class_embeddings_input_dim"] == 2816 and mod.FLUX_DEV["num_single_layers"] == 38
