"""`diffdistill export --format diffusers` for students of text-to-image / latent DiT / video teachers
(io/diffusers_export.py): the exported folder loads in diffusers' own pipeline class, and that pipeline's own
sampling loop — with the exported scheduler and the call written in diffdistill_sampling.json — reproduces
`diffdistill sample` for the same seeds and prompts."""

import json

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers import AutoencoderKL, DiffusionPipeline, StableDiffusionPipeline
from test_diffusers_t2i import CASES, save  # the tiny random teachers of every class

from diffdistill.cli import main
from diffdistill.diffusion.condition import Condition
from diffdistill.errors import UserError
from diffdistill.eval.generate import generate
from diffdistill.io.diffusers import export_diffusers
from diffdistill.io.load import load_teacher

SEEDS = [0, 1, 2, 3]
PROMPTS = ["a cat", "a red dog"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def tiny_clip(tmp_path, dim=16, length=16):
    """A CLIP tokenizer with a hand-written letter vocabulary (no merges) and a 1-layer CLIPTextModel: a real
    text encoder built offline, as the pipeline folder of an SD1.5-like teacher holds one."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in letters:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=length)
    torch.manual_seed(0)
    enc = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=dim, intermediate_size=32,
                                       num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=length,
                                       bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    return tok, enc


def sd15_pipeline(tmp_path):
    """A full StableDiffusionPipeline folder (model_index.json, unet, scheduler, text_encoder, tokenizer, vae) around
    test_diffusers_t2i's tiny SD1.5-like ε UNet, and the prompts encoded by its own text encoder."""
    case = CASES["sd15"]()
    tok, enc = tiny_clip(tmp_path)
    torch.manual_seed(1)
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                        sample_size=16).eval()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=enc, tokenizer=tok, unet=case["model"],
                                   scheduler=case["sched"], safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    root = tmp_path / "sd15"
    pipe.save_pretrained(str(root))
    with torch.no_grad():
        pos, neg = pipe.encode_prompt(PROMPTS, "cpu", 1, True)   # negative: the empty prompt
    return root, Condition(pos, null=Condition(neg[:1]))


def prompt_files(tmp_path, cond, shape, n=8):
    """prompts.npz (the bank `sample` reads: seed s gets prompt s mod N) and a latent data set carrying them."""
    np.savez(tmp_path / "prompts.npz", **{k: v.numpy() for k, v in cond.state().items()})
    rows = cond.rows(torch.arange(n) % len(cond))
    latents = torch.randn((n,) + tuple(shape), generator=torch.Generator().manual_seed(3)).numpy()
    np.savez(tmp_path / "latents.npz", latents=latents, **{k: v.numpy() for k, v in rows.state().items()})
    return tmp_path / "prompts.npz", tmp_path / "latents.npz"


def distil_export_sample(tmp_path, tag, teacher, prompts, latents, extra):
    """2 DMD2 iterations through the CLI, `sample` of seeds 0-3 (raw latents) and `export --format diffusers`."""
    run = tmp_path / tag
    assert main(["distill", "--method", "dmd2", "--teacher", str(teacher), "--out", str(run), "--prompts",
                 str(prompts), "--data", str(latents), "--iters", "2", "--batch-size", "2", "--no-progress",
                 "--set", "run.ckpt_every=0", "--set", "run.sample_every=0", "--set", "net.sigma_data=1.0",
                 "--set", "method.gan_weight=0.01", "--set", "method.guidance_real=2"] + extra) == 0
    ckpt = max((run / "checkpoints").glob("ckpt-*.pt"))
    assert main(["sample", str(ckpt), "--seeds", "0-3", "--raw", "--out", str(tmp_path / f"{tag}.npz")]) == 0
    out = tmp_path / f"{tag}_diffusers"
    assert main(["export", str(ckpt), str(out), "--format", "diffusers"]) == 0
    ours = torch.from_numpy(np.load(tmp_path / f"{tag}.npz")["samples"])
    return ours, out, json.loads((out / "diffdistill_sampling.json").read_text())


def seed_noise(shape, seeds):
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return torch.stack([torch.randn(shape, generator=g) for g in gens]), gens


# ------------------------------------------------------------------------------------------------ SD1.5-like
def test_sd15_students_run_in_stable_diffusion_pipeline_like_diffdistill_sample(tmp_path):
    """A full SD1.5-like pipeline folder (real CLIP tokenizer + text encoder, VAE) is the teacher; DMD2 students
    of 1 step (EulerDiscreteScheduler, sigmas=[σ_0, 0]) and of 4 steps with backward simulation on the teacher's
    timesteps 999/749/499/249 (LCMScheduler, re-noising from the pipeline's generator) are exported and loaded
    with DiffusionPipeline.from_pretrained alone; the pipeline, given the prompt strings, reproduces `diffdistill
    sample` (prompt embeddings from the same text encoder) for seeds 0-3."""
    root, cond = sd15_pipeline(tmp_path)
    prompts, latents = prompt_files(tmp_path, cond, (4, 8, 8))
    sched = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    from diffusers import EulerDiscreteScheduler
    ac = EulerDiscreteScheduler.from_config(sched).alphas_cumprod.double()
    grid = [float(((1 - ac[t]) / ac[t]).sqrt()) for t in (999, 749, 499, 249)]   # DMD2-SDXL's timesteps
    runs = {"one": [], "four": ["--set", "method.student_steps=4", "--set", f"method.sigmas={json.dumps(grid)}"]}
    for tag, extra in runs.items():
        ours, out, info = distil_export_sample(tmp_path, tag, root, prompts, latents, extra)
        p = info["pipeline"]
        assert (tmp_path / tag / "checkpoints").is_dir() and (out / "unet" / "config.json").is_file()
        assert {"text_encoder", "tokenizer", "vae"} <= set(info["copied_components"]) and not p["missing_components"]
        pipe = DiffusionPipeline.from_pretrained(str(out), local_files_only=True)
        assert type(pipe) is StableDiffusionPipeline and pipe.vae is not None and pipe.text_encoder is not None
        assert type(pipe.scheduler).__name__ == p["scheduler"] == ("EulerDiscreteScheduler" if tag == "one"
                                                                    else "LCMScheduler")
        pipe.set_progress_bar_config(disable=True)
        z, gens = seed_noise(info["sample_shape"], SEEDS)
        with torch.no_grad():
            got = pipe(prompt=[PROMPTS[s % 2] for s in SEEDS], latents=p["latents_scale"] * z, generator=gens,
                       **p["kwargs"]).images
        diff = (got - ours).abs().max().item()
        print(f"sd15 {tag}: max |Δ| {diff:.3g} (|x| ≤ {ours.abs().max().item():.3g})")
        assert got.shape == ours.shape and diff <= 1e-4, (tag, diff)
        assert len(info["steps"]) == (1 if tag == "one" else 4)
        if tag == "four":
            assert p["kwargs"]["timesteps"] == [999, 749, 499, 249]
            assert info["sigmas"] == pytest.approx(grid, rel=1e-6)
            # the re-noise draws matter: other generators give other samples
            with torch.no_grad():
                other = pipe(prompt=[PROMPTS[s % 2] for s in SEEDS], latents=p["latents_scale"] * z,
                             generator=[torch.Generator().manual_seed(100 + s) for s in SEEDS],
                             **p["kwargs"]).images
            assert (other - ours).abs().max() > 1e-3
        assert info["guidance"]["baked_in"] and info["guidance"]["teacher_guidance_in_training"]["guidance_real"] == 2


# ------------------------------------------------------------------------------------------------ SD3 (flow)
def test_sd3_students_run_in_stable_diffusion_3_pipeline_like_diffdistill_sample(tmp_path):
    """A bare SD3 transformer folder (FlowMatchEuler, shift 3) is the teacher; DMD2 students of 1 and 2 steps are
    exported with FlowMatchEulerDiscreteScheduler (shift 1: the σ list holds the shift; 2 steps: stochastic_sampling)
    and a model_index.json whose text encoders are null; StableDiffusion3Pipeline, given the prompt embeddings,
    reproduces `diffdistill sample` — the 2-step student one seed per call, its re-noise drawn from torch's global
    RNG (SD3's pipeline does not pass its generator to scheduler.step)."""
    case = CASES["sd3"]()
    root = save(tmp_path / "sd3", case["component"], case["model"], case["sched"])
    cond = case["cond"]
    prompts, latents = prompt_files(tmp_path, cond, case["shape"])
    for tag, extra in {"one": [], "two": ["--set", "method.student_steps=2"]}.items():
        ours, out, info = distil_export_sample(tmp_path, tag, root, prompts, latents, extra)
        p = info["pipeline"]
        assert p["class"] == "StableDiffusion3Pipeline" and not info["copied_components"]
        assert "text_encoder" in p["missing_components"] and "vae" in p["missing_components"]
        pipe = DiffusionPipeline.from_pretrained(str(out), local_files_only=True,
                                                 **{k: None for k in p["missing_components"]})
        assert type(pipe).__name__ == "StableDiffusion3Pipeline"
        assert pipe.scheduler.config.shift == 1.0 and pipe.scheduler.config.stochastic_sampling == (tag == "two")
        assert info["shift"]["teacher"] == {"kind": "static", "shift": 3.0, "sigma_scale": 3.0}
        pipe.set_progress_bar_config(disable=True)
        rows = cond.rows(torch.tensor(SEEDS) % len(cond))
        shape = info["sample_shape"]
        if tag == "one":
            z, _ = seed_noise(shape, SEEDS)
            with torch.no_grad():
                got = pipe(prompt_embeds=rows.embeds, pooled_prompt_embeds=rows.pooled,
                           latents=p["latents_scale"] * z, **p["kwargs"]).images
        else:
            assert p["renoise"].startswith("torch's global RNG")
            got = []
            for i, s in enumerate(SEEDS):
                torch.manual_seed(s)
                z = torch.randn([1] + shape)
                with torch.no_grad():
                    got.append(pipe(prompt_embeds=rows.embeds[i:i + 1], pooled_prompt_embeds=rows.pooled[i:i + 1],
                                    latents=p["latents_scale"] * z, **p["kwargs"]).images)
            got = torch.cat(got)
        diff = (got - ours).abs().max().item()
        print(f"sd3 {tag}: max |Δ| {diff:.3g} (|x| ≤ {ours.abs().max().item():.3g})")
        assert got.shape == ours.shape and diff <= 1e-4, (tag, diff)
        assert p["kwargs"]["sigmas"] == pytest.approx([s / (1 + s) for s in info["sigmas"]])


# ------------------------------------------------------------------------------------------------ every class
def as_student(tmp_path, name, sigmas):
    """A teacher folder of test_diffusers_t2i's class ``name`` and a student state of the same network sampled
    with the multistep sampler on ``sigmas`` (the exporter reads nothing else of a student)."""
    case = CASES[name]()
    root = save(tmp_path / name, case["component"], case["model"], case["sched"])
    net, state = load_teacher(root, sample_shape=case.get("sample_shape"))
    state = {**state, "role": "student", "method": "dmd2", "teacher_path": str(root),
             "sampling": {"sampler": "multistep", "sigmas": list(sigmas)}}
    return case, net, state


def run_pipeline(out, info, calls):
    """The exported pipeline, loaded by DiffusionPipeline, called once per entry of ``calls`` (keyword dicts)."""
    p = info["pipeline"]
    pipe = DiffusionPipeline.from_pretrained(str(out), local_files_only=True,
                                             **{k: None for k in p["missing_components"]})
    assert type(pipe).__name__ == p["class"]
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe, [pipe(**p["kwargs"], **c).images for c in calls]


def test_sdxl_flux_and_sana_students_run_in_their_pipelines(tmp_path):
    """SDXL (pooled embeds, time ids as the pipeline's size arguments), FLUX (packed latents, the embedded guidance
    as guidance_scale) and SANA (attention mask; 2 steps re-noised from the pipeline's generator): each exported
    pipeline reproduces our multistep sampler for the same seeds and prompts."""
    from diffusers import FluxPipeline
    results = {}
    for name, sigmas in (("sdxl", [3.0]), ("flux", [40.0]), ("sana", [20.0, 0.7])):
        case, net, state = as_student(tmp_path, name, sigmas)
        out = tmp_path / f"{name}_out"
        info = export_diffusers(state, out)
        p = info["pipeline"]
        cond = case["cond"]
        ours, _, _ = generate(net, SEEDS, state["sampling"], conditions=cond)
        z, gens = seed_noise(info["sample_shape"], SEEDS)
        rows = cond.rows(torch.tensor(SEEDS) % len(cond))
        if name == "sdxl":   # one call per seed: the pipeline takes one set of size ids per call
            ids = rows.extra["time_ids"]
            calls = [{"prompt_embeds": rows.embeds[i:i + 1], "pooled_prompt_embeds": rows.pooled[i:i + 1],
                      "original_size": tuple(ids[i, :2].tolist()), "crops_coords_top_left": tuple(ids[i, 2:4].tolist()),
                      "target_size": tuple(ids[i, 4:].tolist()), "latents": p["latents_scale"] * z[i:i + 1]}
                     for i in range(len(SEEDS))]
        elif name == "flux":   # one call per seed: one embedded guidance value per call; latents packed
            C, H, W = info["sample_shape"]
            assert p["pack_latents"] and "guidance_scale" not in p["kwargs"]
            calls = [{"prompt_embeds": rows.embeds[i:i + 1], "pooled_prompt_embeds": rows.pooled[i:i + 1],
                      "guidance_scale": float(rows.extra["guidance"][i]),
                      "latents": FluxPipeline._pack_latents(p["latents_scale"] * z[i:i + 1], 1, C, H, W)}
                     for i in range(len(SEEDS))]
        else:
            assert p["renoise"].startswith("the pipeline's generator")
            calls = [{"prompt_embeds": rows.embeds, "prompt_attention_mask": rows.mask,
                      "latents": p["latents_scale"] * z, "generator": gens}]
        pipe, imgs = run_pipeline(out, info, calls)
        got = torch.cat(imgs)
        if name == "flux":
            got = FluxPipeline._unpack_latents(got, p["kwargs"]["height"], p["kwargs"]["width"], pipe.vae_scale_factor)
        results[name] = (got - ours).abs().max().item()
        assert got.shape == ours.shape
    print("max |Δ|:", {k: f"{v:.3g}" for k, v in results.items()})
    assert all(v <= 1e-4 for v in results.values()), results


def test_dit_and_wan_students_export_with_a_manual_loop(tmp_path):
    """DiTPipeline and WanPipeline cannot be given a σ list or scaled latents: the folder is still written (the
    component, scheduler, model_index.json) with pipeline null and the reason, and the manual loop of
    diffdistill_sampling.json on the reloaded component reproduces our sampler (Wan: 2 steps, 5-D latents)."""
    from diffusers import DiTTransformer2DModel, WanTransformer3DModel
    for name, sigmas in (("dit", [5.0]), ("wan", [30.0, 1.5])):
        case, net, state = as_student(tmp_path, name, sigmas)
        out = tmp_path / f"{name}_out"
        info = export_diffusers(state, out)
        assert info["pipeline"] is None and info["pipeline_note"].startswith(("DiTPipeline", "WanPipeline"))
        index = json.loads((out / "model_index.json").read_text())
        assert index["_class_name"] == ("DiTPipeline" if name == "dit" else "WanPipeline")
        cond = case["cond"] if name == "wan" else None
        ours, labels, _ = generate(net, SEEDS, state["sampling"], conditions=cond)
        cls = DiTTransformer2DModel if name == "dit" else WanTransformer3DModel
        model = cls.from_pretrained(str(out / "transformer"), local_files_only=True).eval()
        gens = [torch.Generator().manual_seed(s) for s in SEEDS]
        z = torch.stack([torch.randn(info["sample_shape"], generator=g) for g in gens])
        x = info["sigmas"][0] * z
        with torch.no_grad():
            for k, st in enumerate(info["steps"]):
                t = torch.full((len(SEEDS),), st["timestep"])
                if name == "dit":
                    F = model(st["input_scale"] * x, timestep=t, class_labels=labels.argmax(1)).sample[:, :4]
                else:
                    F = model(hidden_states=st["input_scale"] * x, timestep=t,
                              encoder_hidden_states=cond.rows(torch.tensor(SEEDS) % len(cond)).embeds).sample
                x0 = st["c_skip"] * x + st["c_out"] * F
                if k + 1 < len(info["steps"]):
                    x = x0 + info["sigmas"][k + 1] * torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens])
        diff = (x0 - ours).abs().max().item()
        print(f"{name} manual loop: max |Δ| {diff:.3g}")
        assert diff <= 1e-4, (name, diff)


def test_a_multistep_student_off_the_integer_timesteps_gets_a_note_not_a_pipeline_call(tmp_path):
    """LCMScheduler takes integer timesteps: a 2-step UNet student on σ's between them is exported with the note
    and the manual loop; a consistency student has no diffusers scheduler."""
    _, _, state = as_student(tmp_path, "sd15", [2.5, 0.5])
    info = export_diffusers(state, tmp_path / "off")
    assert info["pipeline"] is None and "integer timesteps" in info["pipeline_note"]
    sched = json.loads((tmp_path / "off" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "LCMScheduler"
    info = export_diffusers({**state, "sampling": {"sampler": "consistency", "sigmas": [2.5]}}, tmp_path / "cm")
    assert info["pipeline"] is None and "consistency" in info["pipeline_note"]
    with pytest.raises(UserError, match="no UNet2DModel layout"):
        export_diffusers({"net_config": {"arch": "songunet"}}, tmp_path / "x")
