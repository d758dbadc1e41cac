"""Teachers of other parameterisations (issue: an ε-prediction DDPM teacher must distil out of the box).

* the fake score is trained in the teacher's own weighting: for a diffusers ε-teacher, ``fake_score_loss`` is the
  ε-MSE that DMD2's Stable Diffusion code computes (tianweiy/DMD2 ``main/sd_guidance.py:271-297``, ``compute_loss_fake``:
  ``add_noise`` at t ~ U{0..999}, loss = mean((ε̂ − ε)²)), computed here with diffusers' own scheduler and UNet;
  for EDM teachers it is EDM's λ, bit for bit as before;
* the student's input noise level follows the teacher's output gain |c_out| (``conditioned_sigma_max``);
* the start-of-run health check fires on a student whose initial samples are off the data's scale.
"""

from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DDPMScheduler, UNet2DModel  # noqa: E402

from diffdistill.diffusion.losses import edm_loss_weight, loss_weight  # noqa: E402
from diffdistill.diffusion.precond import EDMPrecond, VPPrecond, conditioned_sigma_max  # noqa: E402
from diffdistill.io.diffusers import load_diffusers_teacher  # noqa: E402
from diffdistill.methods.score_distill import fake_score_loss  # noqa: E402
from diffdistill.nets.factory import build_denoiser  # noqa: E402
from diffdistill.nets.mlp import MLPDenoiserNet  # noqa: E402
from diffdistill.train.health import initial_output_check  # noqa: E402


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def ddpm_teacher(tmp_path, pred="epsilon", beta_schedule="linear", seed=0):
    """A random-weight 1×8×8 UNet2DModel + DDPMScheduler pipeline folder, loaded as diffdistill loads it."""
    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, attention_head_dim=8).eval()
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule, prediction_type=pred)
    root = tmp_path / f"pipe-{pred}-{beta_schedule}"
    unet.save_pretrained(str(root / "unet"))
    sched.save_pretrained(str(root / "scheduler"))
    state = load_diffusers_teacher(root)
    net = build_denoiser(state["net_config"])
    net.load_state_dict(state["sample_net"])
    return net.eval(), unet, sched, state


def test_fake_score_loss_of_an_eps_teacher_is_dmd2_sd_eps_mse(tmp_path):
    """DMD2 sd_guidance.py compute_loss_fake: noisy = scheduler.add_noise(x0, ε, t); loss = mean((unet(noisy, t) −
    ε)²) — the same number as our fake_score_loss in the EDM frame (x0 + σ_t·ε at σ_t) with the teacher weighting."""
    net, unet, sched, _ = ddpm_teacher(tmp_path)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.rand(6, 1, 8, 8, generator=g) * 2 - 1, torch.randn(6, 1, 8, 8, generator=g)
    t = torch.tensor([0, 5, 120, 480, 800, 999])
    with torch.no_grad():
        official = (unet(sched.add_noise(x0, eps, t), t).sample - eps).square().mean()
        ac = sched.alphas_cumprod[t].double()
        sigma = ((1 - ac) / ac).sqrt().float()
        ours = fake_score_loss(net, x0, sigma, eps, reduction="mean", weighting="teacher")
    assert torch.allclose(ours, official, rtol=2e-4), (float(ours), float(official))
    # EDM's λ on the same ε-network weights the ε̂ error by 1 + σ²/σ_d² instead: a different (σ-dominated) loss
    with torch.no_grad():
        edm = fake_score_loss(net, x0, sigma, eps, reduction="mean", weighting="edm")
    assert float(edm) > 10 * float(official)


def test_teacher_weighting_is_edm_lambda_for_edm_nets_bit_for_bit():
    net = EDMPrecond(MLPDenoiserNet(2, hidden=8, depth=1), img_channels=2, sigma_data=0.7)
    sigma = torch.logspace(-2.7, 1.9, 50)
    assert torch.equal(loss_weight(net, sigma), edm_loss_weight(sigma, 0.7))
    vp = VPPrecond(MLPDenoiserNet(2, hidden=8, depth=1), img_channels=2)
    assert torch.allclose(loss_weight(vp, sigma), 1 / sigma ** 2, rtol=1e-6)   # EDM's VPLoss: 1/σ²


@pytest.mark.parametrize("pred,expected", [("epsilon", lambda s: 1 / s ** 2), ("v_prediction", lambda s: (1 + s ** 2) / s ** 2),
                                           ("sample", lambda s: torch.ones_like(s))])
def test_teacher_weighting_per_prediction_type(tmp_path, pred, expected):
    net = ddpm_teacher(tmp_path, pred)[0]
    sigma = torch.logspace(-2, 1.9, 20)
    assert torch.allclose(net.loss_weight(sigma), expected(sigma), rtol=1e-5)


def test_conditioned_sigma_max_per_teacher_kind(tmp_path):
    edm = EDMPrecond(MLPDenoiserNet(2, hidden=8, depth=1), img_channels=2)
    assert conditioned_sigma_max(edm) == edm.sigma_max == 80.0                     # official: σ_max
    for pred in ("v_prediction", "sample"):
        net = ddpm_teacher(tmp_path, pred)[0]
        assert conditioned_sigma_max(net) == net.sigma_max                          # |c_out| ≤ 1 everywhere
    for net in (ddpm_teacher(tmp_path, "epsilon")[0], ddpm_teacher(tmp_path, "epsilon", "scaled_linear")[0],
                VPPrecond(MLPDenoiserNet(2, hidden=8, depth=1), img_channels=2)):
        s = conditioned_sigma_max(net)
        assert s == pytest.approx(2.5, rel=1e-6) and net.output_gain(s) == pytest.approx(2.5, rel=1e-5)


def test_initial_output_check_fires_only_off_scale():
    g = torch.Generator().manual_seed(0)
    data = torch.rand(512, 1, 8, 8, generator=g) * 2 - 1
    assert initial_output_check(data.flip(0), data, "data", "fix") is None
    assert initial_output_check(0.3 * torch.randn(256, 1, 8, 8, generator=g), data, "data", "fix") is None  # blurry
    warning = initial_output_check(20 * torch.randn(256, 1, 8, 8, generator=g), data, "data", "lower it")
    assert warning and "health check" in warning and warning.endswith("lower it")
    assert initial_output_check(torch.full((4, 1, 8, 8), float("nan")), data, "data", "x")


# ------------------------------------------------------------------------------------------------ CLI: data, seeds
def test_parse_seeds_edm_style():
    from diffdistill.errors import UserError
    from diffdistill.eval.evaluate import parse_seeds
    assert parse_seeds("0-3") == [0, 1, 2, 3] and parse_seeds("5,7,10-11") == [5, 7, 10, 11]
    for bad in ("a-b", "3-1", "1,1", "-2"):
        with pytest.raises(UserError, match="--seeds"):
            parse_seeds(bad)


def test_sample_seeds_range_equals_seed_and_count(tmp_path):
    import numpy as np

    from diffdistill.cli import main
    from diffdistill.demo import SHIPPED_TEACHER
    assert main(["sample", str(SHIPPED_TEACHER), "--steps", "3", "--seeds", "7-9", "--out", str(tmp_path / "a.npz")]) == 0
    assert main(["sample", str(SHIPPED_TEACHER), "--steps", "3", "--seed", "7", "--num-samples", "3",
                 "--out", str(tmp_path / "b.npz")]) == 0
    a, b = np.load(tmp_path / "a.npz")["samples"], np.load(tmp_path / "b.npz")["samples"]
    assert a.shape[0] == 3 and np.array_equal(a, b)
    assert main(["sample", str(SHIPPED_TEACHER), "--seeds", "0-3", "--seed", "2", "--out", str(tmp_path / "c.npz")]) == 2


def test_eval_data_flag_scores_a_diffusers_teacher(tmp_path, capsys):
    """A diffusers folder records no data set: eval gives no score without --data, and digits figures with it."""
    import json

    from diffdistill.cli import main
    ddpm_teacher(tmp_path)
    pipe = tmp_path / "pipe-epsilon-linear"
    assert main(["eval", str(pipe), "--steps", "2", "--num-samples", "40", "--out", str(tmp_path / "m0.json")]) == 0
    assert "proxy_fid" not in json.loads((tmp_path / "m0.json").read_text())
    assert main(["eval", str(pipe), "--steps", "2", "--seeds", "100-139", "--data", "digits",
                 "--out", str(tmp_path / "m1.json")]) == 0
    m = json.loads((tmp_path / "m1.json").read_text())
    assert m["proxy_fid"] > 0 and m["num_samples"] == 40 and m["seeds"] == "100-139" and m["dataset"] == "digits"


def test_distill_says_which_data_and_measures_sigma_data(tmp_path, capsys):
    """Before anything runs: a method that reads data with a teacher that records none is refused with the flag
    to give; a data-free one says so; σ_d, which a DDPM-family teacher does not state, is measured and printed."""
    from diffdistill.cli import main
    ddpm_teacher(tmp_path)
    pipe = str(tmp_path / "pipe-epsilon-linear")
    assert main(["distill", "--method", "dmd2", "--teacher", pipe, "--out", str(tmp_path / "r1"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "reads real data" in err and "--data" in err and len(err.strip().splitlines()) == 1
    assert main(["distill", "--method", "sid", "--teacher", pipe, "--out", str(tmp_path / "r2"), "--dry-run",
                 "--data", "digits"]) == 0
    out = capsys.readouterr().out
    from diffdistill.data.digits import load_digits_dataset
    std = float(load_digits_dataset().x.std())
    assert "data: none (data-free" in out and f"σ_data = {round(std, 4)} measured from the data (digits" in out
    assert main(["distill", "--method", "cd", "--teacher", pipe, "--out", str(tmp_path / "r3"), "--dry-run",
                 "--data", "digits", "--set", "net.sigma_data=0.5"]) == 0
    out = capsys.readouterr().out
    assert "data: digits (from --data or the config)" in out and "σ_data =" not in out and "sigma_data: 0.5" in out


# ------------------------------------------------------------------------------------------------ health check
TINY_EPS_TEACHER = Path(__file__).parent / "assets" / "ddpm_eps_digits_tiny"   # scripts/train_diffusers_teacher.py
FEW_PAIRS = {"dmd": ["method.num_pairs=64"]}   # DMD's regression pairs: 64 teacher ODE solves, not the default


@pytest.mark.parametrize("method,bad", [("dmd2", "student_sigma_max=80"), ("dmd", "student_sigma_max=80"),
                                        ("cd", "sigma_max=80"), ("sid", None), ("diff_instruct", None)])
def test_health_check_fires_on_an_ill_conditioned_student_and_not_on_the_presets(method, bad, tmp_path, capsys):
    """A trained ε-prediction DDPM teacher (diffusers, 0.11 M parameters, 3,000 iterations of the diffusers recipe):
    with the presets the check is silent; a one-step input at σ_max = 80 (the teacher's output gain ×80) fires it
    in --dry-run, naming the option and the value to use."""
    from diffdistill.cli import main
    base = ["distill", "--method", method, "--teacher", str(TINY_EPS_TEACHER), "--data", "digits", "--dry-run",
            "--out", str(tmp_path / "run")] + [x for o in FEW_PAIRS.get(method, []) for x in ("--set", o)]
    assert main(base) == 0
    assert "health check" not in capsys.readouterr().out
    if bad:
        assert main(base + ["--set", f"method.{bad}"]) == 0
        out = capsys.readouterr().out
        line = next(ln for ln in out.splitlines() if "health check" in ln)
        assert line.startswith("[diffdistill] WARNING: health check") and f"--set method.{bad.split('=')[0]}=2.5" in line


def test_train_diffusers_teacher_script_writes_a_pipeline_diffdistill_reads(tmp_path):
    """scripts/train_diffusers_teacher.py (the plain diffusers recipe) for a few steps: a DDPMPipeline folder that
    ``load_diffusers_teacher`` reads with the scheduler's prediction type."""
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    for pred in ("v_prediction",):   # the committed ε-teacher asset is this script's output too
        out = tmp_path / pred
        r = subprocess.run([sys.executable, str(root / "scripts" / "train_diffusers_teacher.py"), "--out", str(out),
                            "--iters", "3", "--batch-size", "8", "--width", "8", "--prediction-type", pred],
                           capture_output=True, text=True, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
        assert r.returncode == 0, r.stderr[-2000:]
        state = load_diffusers_teacher(out)
        assert state["source"]["prediction_type"] == pred and state["net_config"]["sigma_data"] is None


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("method", ["dmd2", "sid", "diff_instruct", "cd"])
def test_eps_teacher_distils_with_its_preset(method, tmp_path):
    """The scenario of benchmarks/foreign_teacher.py, short: the committed ε-teacher (made by
    scripts/train_diffusers_teacher.py), each method's preset and only --data digits, 4 minutes of training. The
    student must start without a health warning and end far below the teacher's own one-step output at its input σ
    (< 0.3× its proxy-FID): the distillation moves it toward the teacher. (The issue's ≤ 2× the teacher's 35-NFE
    proxy-FID within 30 minutes is the benchmark's target, which SiD reaches and the others not yet: see README.)"""
    import contextlib
    import io

    from diffdistill.cli import main
    from diffdistill.eval.evaluate import evaluate_checkpoint, evaluate_net
    from diffdistill.io import load_for_sampling
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["distill", "--method", method, "--teacher", str(TINY_EPS_TEACHER), "--data", "digits",
                   "--budget-minutes", "4", "--no-progress", "--out", str(tmp_path / "run")])
    assert rc == 0 and "health check" not in out.getvalue()
    final = sorted((tmp_path / "run" / "checkpoints").glob("ckpt-*.pt"))[-1]
    student = evaluate_checkpoint(final, num_samples=1000)
    _, state = load_for_sampling(final)
    teacher = build_denoiser_from(TINY_EPS_TEACHER)
    one_step = evaluate_net(teacher, {"sampler": "multistep", "sigmas": state["sampling"]["sigmas"][:1]},
                            {"name": "digits"}, 1000)
    assert student["proxy_fid"] < 0.3 * one_step["proxy_fid"], (student["proxy_fid"], one_step["proxy_fid"])


def build_denoiser_from(folder):
    state = load_diffusers_teacher(folder)
    net = build_denoiser(state["net_config"])
    net.load_state_dict(state["sample_net"])
    return net.eval()


# ------------------------------------------------------------------------------------------------ learning rates
def test_gain_matched_lr_factor_per_teacher_kind(tmp_path):
    from diffdistill.diffusion.precond import gain_matched_lr_factor
    edm = EDMPrecond(MLPDenoiserNet(2, hidden=8, depth=1), img_channels=2)
    assert gain_matched_lr_factor(edm, 80.0) == 1.0 and gain_matched_lr_factor(edm, 2.5) == 1.0
    eps = ddpm_teacher(tmp_path, "epsilon")[0]
    assert gain_matched_lr_factor(eps, 2.5) == pytest.approx(2.5 * 0.5 / (2.5 ** 2 + 0.25) ** 0.5 / 2.5, rel=1e-5)


@pytest.mark.parametrize("method", ["dmd2", "dmd", "diff_instruct", "sid", "cd"])
def test_lr_gain_match_scales_every_optimizer(method, tmp_path, capsys):
    """Off by default (the official rates); on, every optimizer's base rate is the option's × the factor."""
    from diffdistill.diffusion.precond import gain_matched_lr_factor
    from diffdistill.distill import distill
    m = distill(method, TINY_EPS_TEACHER, flags={"data": {"name": "digits"}, "run": {"out": str(tmp_path / "b")}},
                dry_run=True, overrides=["method.lr_gain_match=true"] + FEW_PAIRS.get(method, [])).method
    f = gain_matched_lr_factor(m.teacher, m.sampling_spec()["sigmas"][0])
    assert f < 0.5 and f"{method}: learning rates × {f:.3g}" in capsys.readouterr().out
    for name, opt in m.optimizers.items():
        want = m.opts.lr if name != "critic" else (m.opts.lr_critic or m.opts.lr)
        assert opt.param_groups[0].get("initial_lr", opt.param_groups[0]["lr"]) == pytest.approx(want * f), name
    assert type(m.opts)().lr_gain_match is False


# ------------------------------------------------------------------------------------------------ SiD's input σ
def test_sid_max_input_gain_lowers_sigma_init_for_eps_teachers_only(tmp_path, capsys):
    """The images preset's ``max_input_gain: 1``: an ε-teacher's σ_init 2.5 (gain 2.5) becomes 1, said once; the
    shipped EDM teacher keeps SiD's official 2.5 (its gain there is 0.49); null (the official default) keeps 2.5."""
    from diffdistill.demo import SHIPPED_TEACHER
    from diffdistill.distill import distill
    flags = {"data": {"name": "digits"}, "run": {"out": str(tmp_path / "run")}}
    eps = distill("sid", TINY_EPS_TEACHER, flags=flags, dry_run=True).method
    assert eps.sigma_init == pytest.approx(1.0, rel=1e-6) and eps.sampling_spec()["sigmas"] == [eps.sigma_init]
    assert "sid: σ_init 2.5 → 1 (max_input_gain 1" in capsys.readouterr().out
    assert distill("sid", TINY_EPS_TEACHER, flags=flags, dry_run=True,
                   overrides=["method.max_input_gain=null"]).method.sigma_init == 2.5
    assert distill("sid", SHIPPED_TEACHER, flags=flags, dry_run=True).method.sigma_init == 2.5
    assert "σ_init 2.5 →" not in capsys.readouterr().out
    assert type(eps.opts)().max_input_gain is None
