"""diffusers teachers: a tiny UNet2DModel saved in the test, wrapped as a Denoiser for each prediction type and
both schedule families, checked against diffusers' own schedulers; convert-teacher, a student, diffusers export."""

import json

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DDPMScheduler, EDMEulerScheduler, UNet2DModel  # noqa: E402

from diffdistill.cli import main  # noqa: E402
from diffdistill.errors import UserError  # noqa: E402
from diffdistill.io.diffusers import load_diffusers_teacher  # noqa: E402
from diffdistill.nets.diffusers_unet import ddpm_alphas_cumprod  # noqa: E402


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def tiny_unet(num_class_embeds=None, out_channels=3, seed=0):
    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=out_channels, layers_per_block=1,
                       block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8,
                       num_class_embeds=num_class_embeds)
    with torch.no_grad():  # diffusers zero-inits nothing important, but make sure outputs depend on every layer
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return unet.eval()


def save_pipeline(root, unet, scheduler):
    unet.save_pretrained(str(root / "unet"))
    scheduler.save_pretrained(str(root / "scheduler"))
    return root


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_match_diffusers(kind):
    sched = DDPMScheduler(beta_schedule=kind, beta_start=1e-4, beta_end=0.02, num_train_timesteps=1000)
    ours = ddpm_alphas_cumprod(dict(sched.config))
    assert torch.equal(ours.float(), sched.alphas_cumprod)  # same float32 arithmetic


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_ddpm_teacher_matches_diffusers_x0_prediction(pred, tmp_path):
    """At σ = σ_t the wrapper must give diffusers' own pred_original_sample for the VP input √ᾱ_t·x."""
    unet = tiny_unet()
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type=pred, clip_sample=False)
    state = load_diffusers_teacher(save_pipeline(tmp_path / "pipe", unet, sched))
    from diffdistill.nets.factory import build_denoiser
    net = build_denoiser(state["net_config"])
    net.load_state_dict(state["sample_net"])
    net.eval()
    ac = sched.alphas_cumprod.double()
    ts = [3, 200, 999]
    sig = ((1 - ac[ts]) / ac[ts]).sqrt()
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * sig.float().reshape(-1, 1, 1, 1)
    with torch.no_grad():
        D = net(x, sig.float())
        for i, t in enumerate(ts):
            x_vp = x[i:i + 1] * ac[t].sqrt().float()  # x_vp = α x_edm with α = √ᾱ_t = 1/√(1 + σ²)
            out = unet(x_vp, t).sample
            want = sched.step(out, t, x_vp).pred_original_sample
            assert torch.allclose(D[i:i + 1], want, atol=2e-5 * max(1.0, float(sig[i]))), (pred, t)
    # between grid points the timestep interpolates in ln σ
    mid = (sig[1] * ((1 - ac[201]) / ac[201]).sqrt()).sqrt().float()
    assert float(net.sigma_to_t(mid.reshape(1))) == pytest.approx(200.5, abs=1e-3)
    assert net.sigma_min == pytest.approx(float(((1 - ac[0]) / ac[0]).sqrt())) and net.sigma_max == 80.0


def test_flow_scheduler_teacher_samples_as_diffusers(tmp_path):
    """A UNet2DModel with a FlowMatchEulerDiscreteScheduler (shift 3) is a velocity network in σ-space: our Euler
    sampler on σ = t/(1 − t) of the scheduler's own grid reproduces diffusers' denoising loop
    (x ← scheduler.step(unet(x, t·1000), t, x)), and its denoised output at a single step equals x_t − t·v̂."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffdistill.diffusion.precond import flow_sigma
    from diffdistill.diffusion.samplers import euler_sampler
    from diffdistill.nets.factory import build_denoiser
    unet = tiny_unet()
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    state = load_diffusers_teacher(save_pipeline(tmp_path / "pipe", unet, sched))
    assert state["net_config"]["precond_kwargs"]["prediction_type"] == "velocity"
    assert state["net_config"]["sigma_data"] is None        # not stated: a distillation run measures it
    net = build_denoiser(state["net_config"])
    net.load_state_dict(state["sample_net"])
    net.eval()
    sched.set_timesteps(6)
    sched.set_timesteps(sigmas=[min(float(v), 0.99) for v in sched.sigmas[:-1]])   # t_0 < 1 (σ_0 finite)
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    x = sched.sigmas[0] * z
    with torch.no_grad():
        t0 = float(sched.sigmas[1])
        x_t = (1 - t0) * z * 1.3 + t0 * z
        D = net(x_t / (1 - t0), torch.tensor([t0 / (1 - t0)]))
        assert torch.allclose(D, x_t - t0 * unet(x_t, torch.tensor([1000 * t0])).sample, atol=1e-5)
        for ts in sched.timesteps:
            x = sched.step(unet(x, ts.reshape(1)).sample, ts, x).prev_sample
        ours, _ = euler_sampler(net, z, flow_sigma(sched.sigmas.double()).tolist()[:-1] + [0.0])
    assert torch.allclose(ours, x, atol=1e-4), (ours - x).abs().max()


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_edm_scheduler_teacher_matches_diffusers_preconditioning(pred, tmp_path):
    unet = tiny_unet()
    sched = EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, prediction_type=pred)
    state = load_diffusers_teacher(save_pipeline(tmp_path / "pipe", unet, sched))
    from diffdistill.nets.factory import build_denoiser
    net = build_denoiser(state["net_config"])
    net.load_state_dict(state["sample_net"])
    net.eval()
    x = torch.randn(1, 3, 8, 8)
    for s in (0.01, 1.3, 60.0):
        sigma = torch.tensor(s)
        with torch.no_grad():
            out = unet(sched.precondition_inputs(x, sigma), sched.precondition_noise(sigma)).sample
            want = sched.precondition_outputs(x, out, sigma)
            assert torch.allclose(net(x, torch.tensor([s])), want, atol=1e-5)


def test_class_conditional_learned_variance_and_bottleneck(tmp_path):
    unet = tiny_unet(num_class_embeds=4, out_channels=6)  # learned variance: the first 3 channels are ε
    sched = DDPMScheduler(num_train_timesteps=1000, clip_sample=False, variance_type="learned_range")
    state = load_diffusers_teacher(save_pipeline(tmp_path / "pipe", unet, sched))
    assert state["net_config"]["label_dim"] == 4
    from diffdistill.nets.factory import build_denoiser
    net = build_denoiser(state["net_config"])
    net.load_state_dict(state["sample_net"])
    net.eval()
    ac = sched.alphas_cumprod.double()
    t, y = 500, torch.tensor([2])
    sig = float(((1 - ac[t]) / ac[t]).sqrt())
    x = torch.randn(1, 3, 8, 8) * sig
    with torch.no_grad():
        D, feats = net(x, torch.tensor([sig]), torch.nn.functional.one_hot(y, 4).float(), return_bottleneck=True)
        eps = unet(x * ac[t].sqrt().float(), t, class_labels=y).sample[:, :3]
    assert torch.allclose(D, x - sig * eps, atol=2e-4) and feats.shape == (1, 32, 4, 4)
    with torch.no_grad():
        assert torch.equal(net(x, torch.tensor([sig]), torch.eye(4)[2:3], bottleneck_only=True), feats)


def test_missing_scheduler_or_foreign_folder_is_a_user_error(tmp_path):
    tiny_unet().save_pretrained(str(tmp_path / "unet_only"))
    with pytest.raises(UserError, match="no scheduler config"):
        load_diffusers_teacher(tmp_path / "unet_only")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a diffusers model folder"):
        load_diffusers_teacher(tmp_path / "empty")
    # a bare UNet folder with scheduler_config.json beside config.json is accepted
    DDPMScheduler().save_pretrained(str(tmp_path / "unet_only"))
    assert load_diffusers_teacher(tmp_path / "unet_only")["net_config"]["precond"] == "diffusers"


def test_convert_distill_and_export_as_diffusers(tmp_path):
    """convert-teacher → .safetensors equals the folder; a SiD student exported --format diffusers is loaded with
    UNet2DModel.from_pretrained and sampled in a few lines exactly like `diffdistill sample`."""
    from diffdistill.distill import distill
    from diffdistill.io import load_for_sampling
    from diffdistill.eval.generate import generate
    from diffdistill.io.checkpoint import list_checkpoints
    pipe = save_pipeline(tmp_path / "pipe", tiny_unet(), DDPMScheduler(num_train_timesteps=1000,
                                                                       prediction_type="v_prediction"))
    teacher = tmp_path / "teacher.safetensors"
    assert main(["convert-teacher", str(pipe), str(teacher), "--dropout", "0"]) == 0
    a, _ = load_for_sampling(pipe)
    b, st = load_for_sampling(teacher)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(a(x, torch.tensor([0.3, 30.0])), b(x, torch.tensor([0.3, 30.0])))
    assert st["source"]["prediction_type"] == "v_prediction"
    assert main(["sample", str(pipe), "--steps", "2", "--num-samples", "2", "--out", str(tmp_path / "t.npz")]) == 0

    distill("sid", teacher, flags={"run": {"out": str(tmp_path / "sid"), "steps": 2, "batch_size": 4,
                                           "progress": False, "ckpt_every": 2, "sample_every": 0}})
    ckpt = list_checkpoints(tmp_path / "sid" / "checkpoints")[-1]
    out = tmp_path / "student_diffusers"
    assert main(["export", str(ckpt), str(out), "--format", "diffusers"]) == 0
    assert main(["export", str(ckpt), str(tmp_path / "student.safetensors")]) == 0
    student, state = load_for_sampling(tmp_path / "student.safetensors")
    ours, _, _ = generate(student, [7], state["sampling"])

    # what a diffusers user writes (the README snippet): one step from σ_0
    info = json.loads((out / "diffdistill_sampling.json").read_text())
    unet = UNet2DModel.from_pretrained(str(out / "unet"), local_files_only=True).eval()
    step = info["steps"][0]
    z = torch.randn((3, 8, 8), generator=torch.Generator().manual_seed(7))[None]  # seed 7, as `sample --seed 7`
    x = step["sigma"] * z
    with torch.no_grad():
        t = torch.tensor([step["timestep"]])  # a tensor: UNet2DModel casts a Python float timestep to long
        x0 = step["c_skip"] * x + step["c_out"] * unet(step["input_scale"] * x, t).sample
    assert len(info["steps"]) == 1 and torch.allclose(x0, ours, atol=1e-5)
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "DDPMScheduler" and sched["prediction_type"] == "v_prediction"
    # a SongUNet student cannot be written in diffusers layout
    from diffdistill.io.diffusers import export_diffusers
    with pytest.raises(UserError, match="no UNet2DModel layout"):
        export_diffusers({"net_config": {"arch": "songunet"}}, tmp_path / "x")
    assert np.isfinite(ours.numpy()).all()
