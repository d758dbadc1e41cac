"""Text-to-image recipes as presets (configs/dmd2/{sd15,sdxl,flow-t2i}.yaml, configs/sid/{sd15-lsg,flow-t2i}.yaml):
(a) each resolves to the official values, cited below by file:line of the official repositories (tianweiy/DMD2 at
8d8fa55, mingyuanzhou/SiD-LSG); (b) each plans on the meta device against a config-only SD1.5 / SDXL folder (the
published configs of benchmarks/memory_table.py, no weights); (c) 3 iterations of each on a tiny random pipeline
through the CLI give finite losses, and the SDXL preset's student σ's are the teacher scheduler's σ at timesteps
999/749/499/249, computed here from diffusers' own alphas_cumprod."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import memory_table  # noqa: E402
from tiny_pipelines import build  # noqa: E402

from diffdistill.cli import main  # noqa: E402
from diffdistill.config import list_presets, load_preset  # noqa: E402
from diffdistill.diffusion.condition import Condition  # noqa: E402
from diffdistill.distill import distill, distill_config  # noqa: E402
from diffdistill.errors import UserError  # noqa: E402
from diffdistill.io.load import load_for_sampling  # noqa: E402
from diffdistill.methods.sid import sample_timestep_sigma  # noqa: E402
from diffdistill.nets.diffusers_cond import example_condition  # noqa: E402
from diffdistill.train.memory import estimate_memory  # noqa: E402

DMD2_SH15 = "DMD2 experiments/sdv1.5/laion6.25_sd_baseline_8node_guidance1.75_lr1e-5_seed10_dfake10_from_scratch.sh"
DMD2_SHXL = ("DMD2 experiments/sdxl/sdxl_cond999_8node_lr5e-7_denoising4step_diffusion1000_gan5e-3_guidance8_"
             "noinit_noode_backsim_scratch.sh")
LSG_SH = "SiD-LSG run_sid.sh ('sd1.5')"

# (method, preset): {option: (official value, where it is stated)}
OFFICIAL = {
    ("dmd2", "sd15"): {
        "lr": (1e-5, f"{DMD2_SH15}:9 --generator_lr"),
        "lr_critic": (1e-5, f"{DMD2_SH15}:10 --guidance_lr"),
        "guidance_real": (1.75, f"{DMD2_SH15}:19 --real_guidance_scale"),
        "guidance_fake": (1.0, f"{DMD2_SH15}:20 --fake_guidance_scale"),
        "dfake_gen_update_ratio": (10, f"{DMD2_SH15}:30"),
        "gan_weight": (0.0, "no --gen_cls_loss in the script; main/train_sd.py:656 default 0"),
        "gan_critic_weight": (0.0, "main/train_sd.py:657 --guidance_cls_loss_weight default 0"),
        "betas": ((0.9, 0.999), "main/train_sd.py:191-201 AdamW"),
        "weight_decay": (0.01, "main/train_sd.py:195, :201"),
        "warmup_steps": (500, "main/train_sd.py:633 --warmup_step"),
        "student_steps": (1, "main/train_sd.py:661 --conditioning_timestep 999; sd_unified_model.py:246"),
        "noise_grid": ("teacher", "main/sd_guidance.py:77-85: DDPM timesteps of the SD scheduler"),
        "dm_t_min": (20, "main/train_sd.py:634 --min_step_percent 0.02; sd_guidance.py:84"),
        "dm_t_max": (980, "main/train_sd.py:635 --max_step_percent 0.98; sd_guidance.py:85, :179-181"),
        "critic_t_min": (0, "main/sd_guidance.py:271-273 randint(0, 1000)"),
        "critic_t_max": (999, "main/sd_guidance.py:271-273"),
        "fake_score_weighting": ("teacher", "main/sd_guidance.py:295-297 ε-MSE"),
        "critic_reduction": ("mean", "main/sd_guidance.py:295 torch.mean"),
    },
    ("dmd2", "sdxl"): {
        "lr": (5e-7, f"{DMD2_SHXL}:9"),
        "lr_critic": (5e-7, f"{DMD2_SHXL}:10"),
        "guidance_real": (8.0, f"{DMD2_SHXL}:19"),
        "guidance_fake": (1.0, f"{DMD2_SHXL}:20"),
        "dfake_gen_update_ratio": (5, f"{DMD2_SHXL}:28"),
        "gan_weight": (5e-3, f"{DMD2_SHXL}:34-35 --gen_cls_loss_weight"),
        "gan_critic_weight": (1e-2, f"{DMD2_SHXL}:36 --guidance_cls_loss_weight"),
        "gan_t_min": (0, f"{DMD2_SHXL}:37-38; sd_guidance.py:147-150 randint(0, 1000)"),
        "gan_t_max": (999, f"{DMD2_SHXL}:38 --diffusion_gan_max_timestep 1000"),
        "student_steps": (4, f"{DMD2_SHXL}:39-41; sd_unified_model.py:31-35"),
        "noise_grid": ("teacher", "main/sd_guidance.py:77-85"),
        "dm_t_min": (20, "main/train_sd.py:634"),
        "dm_t_max": (980, f"{DMD2_SHXL}:32 --max_step_percent 0.98"),
        "betas": ((0.9, 0.999), "main/train_sd.py:191-201"),
        "weight_decay": (0.01, "main/train_sd.py:195, :201"),
        "fake_score_weighting": ("teacher", "main/sd_guidance.py:295-297"),
    },
    ("sid", "sd15-lsg"): {
        "alpha": (1.0, f"{LSG_SH}:73 --alpha 1"),
        "guidance_fake_train": (2.0, f"{LSG_SH}:67 κ1 --cfg_train_fake"),
        "guidance_fake": (2.0, f"{LSG_SH}:68 κ2=κ3 --cfg_eval_fake"),
        "guidance_real": (2.0, f"{LSG_SH}:69 κ4 --cfg_eval_real"),
        "lr": (1e-6, f"{LSG_SH}:83 --glr"),
        "lr_critic": (1e-6, f"{LSG_SH}:82 --lr"),
        "betas": ((0.0, 0.999), "sid_train.py:220-221 Adam"),
        "eps": (1e-8, "sid_train.py:220-221 (fp32, run_sid.sh:76 --fp16 0)"),
        "init_timestep": (625, f"{LSG_SH}:74"),
        "noise_grid": ("teacher", "training/sid_training_loop.py:484 randint(tmin, tmax) DDPM timesteps"),
        "tmin": (20.0, "sid_train.py:131 --tmin default"),
        "tmax": (980.0, "sid_train.py:130 --tmax default"),
        "fake_sigma": ("generator", "training/sid_training_loop.py:413"),
        "loss_scale_g": (1.0, "sid_train.py:128 --lsg default 1"),
        "ema_halflife_kimg": (50.0, f"{LSG_SH}:88 --ema 0.05; sid_train.py:261"),
        "fake_score_weighting": ("teacher", "training/sid_training_loop.py:441 ε-MSE"),
    },
    # No official flow-teacher recipe was found: the noise levels are the project's flow-family defaults, the
    # optimisation the SD1.5 recipes' (the YAML comments say so).
    ("dmd2", "flow-t2i"): {
        "noise_grid": ("karras", "project default for flow teachers (no DDPM table)"),
        "lr": (1e-5, f"{DMD2_SH15}:9"),
        "dfake_gen_update_ratio": (10, f"{DMD2_SH15}:30"),
        "gan_weight": (0.0, "main/train_sd.py:656"),
        "guidance_real": (1.0, "not verified for flow teachers: none"),
    },
    ("sid", "flow-t2i"): {
        "noise_grid": ("karras", "project default for flow teachers"),
        "sigma_init": (2.5, "mingyuanzhou/SiD sid_train.py:95 (EDM default)"),
        "tmax": (800.0, "mingyuanzhou/SiD sid_train.py:100 (EDM default)"),
        "fake_sigma": ("lognormal", "mingyuanzhou/SiD training/sid_loss.py:18"),
        "alpha": (1.0, f"{LSG_SH}:73"),
        "lr": (1e-6, f"{LSG_SH}:83"),
        "loss_scale_g": (1.0, "sid_train.py:128"),
    },
}

SIGMA_DATA = ["--set", "net.sigma_data=1.0"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _state():
    return {"config": {}, "net_config": {"img_resolution": 8, "img_channels": 4}}


@pytest.mark.parametrize("method,preset", sorted(OFFICIAL))
def test_each_recipe_resolves_to_the_official_values(method, preset):
    assert preset in list_presets(method)
    m = distill_config(method, _state(), preset=preset)["method"]
    for key, (want, where) in OFFICIAL[method, preset].items():
        got = tuple(m[key]) if isinstance(m[key], list) else m[key]
        assert got == pytest.approx(want) if isinstance(want, float) else got == want, (key, got, want, where)
    # a recipe is a delta: what it does not name keeps the method's dataclass default (official)
    plain = distill_config(method, _state(), preset="none")["method"]
    named = set(load_preset(method, preset)["method"])
    assert {k: v for k, v in m.items() if k not in named} == {k: v for k, v in plain.items() if k not in named}
    # and the official preset stays the dataclass defaults
    assert distill_config(method, _state(), preset="official")["method"] == plain


def _npz_condition(net, n, seed=0, length=4):
    """n random conditions that fit ``net`` with a null row (CFG needs one), as a Condition."""
    g = torch.Generator().manual_seed(seed)
    c = example_condition(net, n + 1, g, length=length)
    return Condition(c.embeds[1:], None if c.mask is None else c.mask[1:],
                     None if c.pooled is None else c.pooled[1:], {k: v[1:] for k, v in c.extra.items()},
                     null=c.rows([0]))


def _files(root: Path, net, n=8):
    """(prompts.npz, latents.npz carrying them) for ``net``."""
    cond = _npz_condition(net, n)
    np.savez(root / "prompts.npz", **{k: v.numpy() for k, v in cond.state().items()})
    lat = torch.randn((n,) + tuple(net.sample_shape), generator=torch.Generator().manual_seed(3))
    np.savez(root / "latents.npz", latents=lat.numpy(), **{k: v.numpy() for k, v in cond.rows(slice(0, n))
                                                          .state().items() if not k.startswith("null.")})
    return root / "prompts.npz", root / "latents.npz"


def _config_only(root: Path, name: str) -> Path:
    """A config-only folder of memory_table's published configs, with a prompts file of CFG-ready conditions."""
    d = memory_table.write_folder(root, name)
    net, _ = load_for_sampling(d, "meta")
    cond = _npz_condition(net, 4, length=memory_table.MODELS[name][4])   # the latents' prompt length
    np.savez(d / "prompts.npz", **{k: v.numpy() for k, v in cond.state().items()})
    return d


@pytest.fixture(scope="module")
def sd15_configs(tmp_path_factory):
    return _config_only(tmp_path_factory.mktemp("sd15-configs"), "sd15")


@pytest.mark.parametrize("method,preset,t0", [("dmd2", "sd15", 999), ("sid", "sd15-lsg", 625)])
def test_sd15_recipes_build_on_meta_from_the_published_config(method, preset, t0, sd15_configs):
    """The fast half of the plan below: the run builds on the meta device from SD1.5's config.json alone, and its
    student starts at the teacher's σ at the recipe's timestep."""
    d = sd15_configs
    tr = distill(method, str(d), dry_run=True, preset=preset, overrides=["net.sigma_data=1.0"],
                 flags={"run": {"device": "meta", "batch_size": 1, "out": "/nonexistent/plan", "progress": False},
                        "data": {"prompts": str(d / "prompts.npz")}})
    assert all(p.device.type == "meta" for net in tr.method.nets.values() for p in net.parameters())
    ac = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2, 0).double()
    assert tr.method.sampling_spec()["sigmas"] == pytest.approx([float(((1 - ac[t0]) / ac[t0]).sqrt())], rel=1e-6)
    assert tr.cfg["preset"]["name"] == preset


@pytest.mark.slow   # 20-60 s each on a 2-core CPU: the meta forward passes of the full SD1.5 / SDXL UNets
@pytest.mark.parametrize("method,preset,model", [("dmd2", "sd15", "sd15"), ("sid", "sd15-lsg", "sd15"),
                                                 ("dmd2", "sdxl", "sdxl")])
def test_each_recipe_plans_on_meta_against_the_published_config(method, preset, model, tmp_path):
    d = _config_only(tmp_path, model)
    data = {"prompts": str(d / "prompts.npz"), "path": str(d / "latents.npz")}
    tr = distill(method, str(d), dry_run=True, preset=preset, overrides=["net.sigma_data=1.0"],
                 flags={"run": {"device": "meta", "batch_size": 1, "out": "/nonexistent/plan", "progress": False},
                        "data": data})
    plan = estimate_memory(tr, target="cpu")
    assert not plan["errors"], plan["errors"]
    # SD1.5's and SDXL's UNets (scaled_linear β 0.00085..0.012): σ_999 = 14.6146; the student starts there
    # (DMD2's conditioning timestep 999) or at σ_625 (SiD-LSG's init_timestep)
    ac = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2, 0).double()
    sig = ((1 - ac) / ac).sqrt()
    first = tr.method.sampling_spec()["sigmas"][0]
    assert first == pytest.approx(float(sig[625 if method == "sid" else 999]), rel=1e-6)
    assert plan["peak"] > 0


def _run(method, preset, root, prompts, latents, extra=()):
    out = root / f"{method}-{preset}"
    args = ["distill", "--method", method, "--teacher", str(root / "pipe"), "--preset", preset, "--out", str(out),
            "--prompts", str(prompts), "--iters", "3", "--batch-size", "2", "--no-progress",
            "--set", "run.ckpt_every=0", "--set", "run.sample_every=0", "--set", "run.log_every=1",
            *SIGMA_DATA, *extra]
    assert main(args) == 0, args
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [v for r in logs for k, v in r.items() if "/" in k and isinstance(v, float)]
    assert losses and all(math.isfinite(v) for v in losses), logs
    return out


@pytest.mark.parametrize("kind,method,preset", [("sd", "dmd2", "sd15"), ("sd", "sid", "sd15-lsg"),
                                                ("sdxl", "dmd2", "sdxl"), ("sd3", "dmd2", "flow-t2i"),
                                                ("sd3", "sid", "flow-t2i"),
                                                ("flux", "sid", "flow-t2i")])
def test_three_iterations_of_each_recipe_on_a_tiny_pipeline(kind, method, preset, tmp_path):
    pipe = build(kind, tmp_path / "pipe")
    shape = (4, 8, 8) if kind == "flux" else None   # FLUX's transformer takes any size: a small one (16 tokens)
    net, _ = load_for_sampling(tmp_path / "pipe", sample_shape=shape)
    prompts, latents = _files(tmp_path, net)
    extra = ["--data", str(latents)] if load_preset(method, preset)["method"].get("gan_weight", 0) else []
    if kind == "flux":
        extra += ["--sample-shape", ",".join(map(str, net.sample_shape))]
    out = _run(method, preset, tmp_path, prompts, latents, extra)
    ckpt = sorted((out / "checkpoints").glob("ckpt-*.pt"))[-1]
    sigmas = torch.load(ckpt, map_location="cpu", weights_only=False)["sampling"]["sigmas"]
    if kind in ("sd", "sdxl"):
        # the teacher's σ_t at the student's timesteps, from diffusers' own scheduler
        ac = pipe.scheduler.alphas_cumprod.double()
        want_t = {"sd15": [999], "sdxl": [999, 749, 499, 249], "sd15-lsg": [625]}[preset]
        want = [float(((1 - ac[t]) / ac[t]).sqrt()) for t in want_t]
        assert sigmas == pytest.approx(want, rel=1e-6)
    else:   # flow teachers: the project's flow-family defaults (σ_max = 80 for DMD2, SiD's σ_init 2.5)
        assert sigmas == pytest.approx([80.0] if method == "dmd2" else [2.5])


def test_teacher_timesteps_are_refused_for_a_flow_teacher(tmp_path):
    """noise_grid=teacher / init_timestep read a DDPM timestep table: a flow teacher has none, a clear error."""
    build("sd3", tmp_path / "pipe")
    net, _ = load_for_sampling(tmp_path / "pipe")
    prompts, _ = _files(tmp_path, net)
    for method, preset in (("dmd2", "sd15"), ("sid", "sd15-lsg")):
        with pytest.raises(UserError, match="DDPM timestep table"):
            distill(method, str(tmp_path / "pipe"), dry_run=True, preset=preset, overrides=["net.sigma_data=1.0"],
                    flags={"run": {"out": str(tmp_path / "x"), "batch_size": 2, "progress": False},
                           "data": {"prompts": str(prompts)}})


def test_teacher_timestep_noise_levels_are_the_schedulers(tmp_path):
    """With noise_grid=teacher every noise level is σ_t of the teacher's diffusers scheduler: DMD2's DM range
    t ∈ {20..980}, SiD-LSG's t ∈ {20..979} for both its losses, each draw on the table; an explicit
    student_sigma_max beside it is refused (the student's steps are the teacher's timesteps)."""
    pipe = build("sd", tmp_path / "pipe")
    net, _ = load_for_sampling(tmp_path / "pipe")
    prompts, _ = _files(tmp_path, net)
    ac = pipe.scheduler.alphas_cumprod.double()
    sig = ((1 - ac) / ac).sqrt()
    flags = {"run": {"out": str(tmp_path / "x"), "batch_size": 2, "progress": False},
             "data": {"prompts": str(prompts)}}
    dmd2 = distill("dmd2", str(tmp_path / "pipe"), dry_run=True, preset="sd15", overrides=SIGMA_DATA[1:],
                   flags=flags).method
    assert dmd2.noise_levels()["DM loss σ"] == pytest.approx([float(sig[20]), float(sig[980])], rel=1e-6)
    assert dmd2.noise_levels()["fake-score loss σ"] == pytest.approx([float(sig[0]), float(sig[999])], rel=1e-6)
    sid = distill("sid", str(tmp_path / "pipe"), dry_run=True, preset="sd15-lsg", overrides=SIGMA_DATA[1:],
                  flags=flags).method
    lv = sid.noise_levels()
    assert lv["generator loss σ"] == pytest.approx([float(sig[20]), float(sig[979])], rel=1e-6)
    assert lv["fake-score loss σ"] == lv["generator loss σ"]
    s = sample_timestep_sigma(20_000, torch.Generator().manual_seed(0), sig, 20, 980).double()
    on_table = (s[:, None] - sig.float().double()[None]).abs().min(1)
    assert (on_table.values == 0).all() and set(on_table.indices.tolist()) == set(range(20, 980))
    with pytest.raises(UserError, match="drop method.student_sigma_max"):
        distill("dmd2", str(tmp_path / "pipe"), dry_run=True, preset="sd15",
                overrides=SIGMA_DATA[1:] + ["method.student_sigma_max=2.5"], flags=flags)
