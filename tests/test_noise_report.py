"""The per-teacher noise levels printed at the start of a distillation (`Trainer.noise_report`, also in
`--dry-run`): the teacher's family and σ range and the σ's each method chose from it — the student's sampling σ
(its one-step input capped where the teacher's output gain exceeds 2.5), the DM / fake-score / generator loss
ranges — equal to what the method uses, and overridable by its options."""

import pytest
import torch
from helpers.dm_helpers import MLP_CFG, tiny_teacher

from diffdistill.config import validate_run
from diffdistill.diffusion.precond import conditioned_sigma_max
from diffdistill.methods.sid import sid_sigma
from diffdistill.train.trainer import Trainer


def _trainer(tmp_path, teacher, cfg, method, data=None, **opts):
    run = validate_run({"out": str(tmp_path / method), "steps": 1, "batch_size": 4, "ckpt_every": 0,
                        "sample_every": 0, "progress": False})
    return Trainer({"run": run, "data": data or {}, "net": cfg, "method": {"name": method, **opts}},
                   teacher=teacher, teacher_path="mem")


def test_edm_teacher_report_is_what_dmd2_and_sid_use(tmp_path):
    teacher, cfg = tiny_teacher(MLP_CFG)
    tr = _trainer(tmp_path, teacher, cfg, "dmd2", gan_weight=0)
    line = tr.noise_report()
    m = tr.method
    lo, hi = float(m.grid[m.dm_t_range[0]]), float(m.grid[m.dm_t_range[1]])
    assert line.startswith("teacher EDM, σ [0.002, 80], σ_d 0.5; student samples at σ 80;")
    assert f"DM loss σ [{lo:.4g}, {hi:.4g}]" in line
    sid = _trainer(tmp_path, teacher, cfg, "sid", tmax=600).noise_report()
    assert "student samples at σ 2.5" in sid and f"generator loss σ [0.002, {float(sid_sigma(0.6)):.4g}]" in sid
    assert "fake-score loss σ log-normal(-1.2, 1.2)" in sid


def test_flow_teacher_family_and_cd_grid(tmp_path):
    teacher, cfg = tiny_teacher(dict(MLP_CFG, precond="flow"))
    line = _trainer(tmp_path, teacher, cfg, "cd", data={"name": "ring8", "n": 64}, num_scales=11).noise_report()
    assert line.startswith("teacher flow (velocity, timestep ×1000), σ [0.002, 80]")
    assert "consistency grid σ [0.002, 80]; grid points N 11" in line


def test_an_eps_teacher_caps_the_student_input_and_an_option_overrides_it(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from diffdistill.io.load import load_teacher
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8)
    unet.save_pretrained(str(tmp_path / "pipe" / "unet"))
    diffusers.DDPMScheduler(beta_schedule="linear").save_pretrained(str(tmp_path / "pipe" / "scheduler"))
    teacher, state = load_teacher(tmp_path / "pipe")
    cfg = dict(state["net_config"], sigma_data=0.5)
    line = _trainer(tmp_path, teacher, cfg, "dmd2", gan_weight=0).noise_report()
    cap = conditioned_sigma_max(teacher)
    assert abs(cap - 2.5) < 0.01
    assert line.startswith("teacher diffusers DDPMScheduler (DDPM linear T=1000, epsilon), σ [0.01")
    assert f"student samples at σ {cap:.4g};" in line
    line = _trainer(tmp_path, teacher, cfg, "dmd2", gan_weight=0, student_sigma_max=1.5).noise_report()
    assert "student samples at σ 1.5;" in line


def test_dry_run_prints_the_noise_levels(tmp_path):
    from diffdistill.train.memory import dry_run_report
    teacher, cfg = tiny_teacher(MLP_CFG)
    tr = _trainer(tmp_path, teacher, cfg, "diff_instruct")
    assert ("noise levels: teacher EDM, σ [0.002, 80], σ_d 0.5; student samples at σ 1; loss σ "
            "log-normal(-1.2, 1.2)") in dry_run_report(tr)
