"""diffusers text-to-image / latent DiT / video teachers (nets/diffusers_cond.py): for each class a tiny
random-weight instance (small configs, as diffusers' own model tests build them) is saved as a pipeline-like
folder, loaded through the CLI's teacher path (``io.load_teacher``), and our σ-space Euler sampler with that
Denoiser must reproduce diffusers' own scheduler loop — the network called exactly as its pipeline calls it
(timestep, packing, ids, masks, added conditions, CFG) — on the same noise and conditioning."""

import json

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

from diffdistill.diffusion import condition as C
from diffdistill.diffusion.condition import Condition
from diffdistill.diffusion.precond import flow_sigma, shift_sigma
from diffdistill.diffusion.samplers import euler_sampler
from diffdistill.errors import UserError
from diffdistill.io.load import convert_teacher, load_teacher
from diffdistill.lora import resolve_targets
from diffdistill.nets.factory import build_denoiser

B = 2


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def perturbed(model, seed=0):
    """Random weights everywhere (diffusers zero-initialises some output layers, which would make the output
    independent of the rest and the checks blind to it)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def save(root, component, model, scheduler, model_index=None):
    model.save_pretrained(str(root / component))
    scheduler.save_pretrained(str(root / "scheduler"))   # scheduler_config.json from the real class's config
    if model_index is not None:
        (root / "model_index.json").write_text(json.dumps(model_index))
    return root


def randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def text_condition(L, D, pooled=None, mask=False, extra=None, seed=1):
    """A batch of B prompts and the null (empty-prompt) row, each with its own embeddings."""
    m = (torch.ones(B, L, dtype=torch.long) if mask else None)
    if mask:
        m[1, -2:] = 0   # padding tokens of the second prompt
    null = Condition(randn(1, L, D, seed=seed + 10), None if not mask else torch.tensor([[1] + [0] * (L - 1)]),
                     None if pooled is None else randn(1, pooled, seed=seed + 11))
    return Condition(randn(B, L, D, seed=seed), m, None if pooled is None else randn(B, pooled, seed=seed + 1),
                     dict(extra or {}), null)


def guided(net, w):
    """D_w(x; σ, c) = D(x; σ, ∅) + w·(D(x; σ, c) − D(x; σ, ∅)), one batch of 2B (w None: D itself)."""
    def D(x, sigma, cond):
        if w is None:
            return net(x, sigma, cond)
        both = net(torch.cat([x, x]), torch.cat([sigma, sigma]), C.cat([C.null_of(cond), cond]))
        d_null, d_cond = both.chunk(2)
        return d_null + w * (d_cond - d_null)
    return D


def cfg_output(call, w, x, t, cond, null):
    """The pipelines' CFG on the network output: [negative; positive] in one batch, uncond + w·(text − uncond)."""
    if w is None:
        return call(x, t, cond)
    out = call(torch.cat([x, x]), torch.cat([t, t]), (null, cond))
    u, c = out.chunk(2)
    return u + w * (c - u)


def both(pair, get):
    """The [negative; positive] batch of one field (the pipelines' concatenation)."""
    if not isinstance(pair, tuple):
        return get(pair)
    return torch.cat([get(pair[0]), get(pair[1])])


# ------------------------------------------------------------------------------------------------ the cases
def unet_case(kind):
    from diffusers import UNet2DConditionModel
    kw = dict(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D",
                                                                                       "CrossAttnUpBlock2D"),
              cross_attention_dim=16, attention_head_dim=2, norm_num_groups=8)
    extra, pooled = {}, None
    if kind == "sdxl":
        kw.update(addition_embed_type="text_time", addition_time_embed_dim=4,
                  projection_class_embeddings_input_dim=8 + 6 * 4, use_linear_projection=True)
        pooled, extra = 8, {"time_ids": torch.tensor([[8., 8., 0., 0., 8., 8.], [16., 12., 2., 0., 8., 8.]])}
    model = perturbed(UNet2DConditionModel(**kw))
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   prediction_type="v_prediction" if kind == "sd2v" else "epsilon")
    cond = text_condition(5, 16, pooled=pooled, extra=extra)

    def call(x, t, c):
        kwargs = {}
        if kind == "sdxl":
            kwargs["added_cond_kwargs"] = {"text_embeds": both(c, lambda v: v.pooled),
                                           "time_ids": both(c, lambda v: extra["time_ids"])}
        return model(x, t, encoder_hidden_states=both(c, lambda v: v.embeds), **kwargs).sample
    return dict(component="unet", model=model, sched=sched, cond=cond, call=call, shape=(4, 8, 8), w=2.5)


def sd3_case():
    from diffusers import SD3Transformer2DModel
    model = perturbed(SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                            caption_projection_dim=16, pooled_projection_dim=12, out_channels=4,
                                            pos_embed_max_size=8))
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    cond = text_condition(6, 16, pooled=12)

    def call(x, t, c):   # pipeline_stable_diffusion_3.py: timestep = t.expand(B), the scheduler's 1000·t
        return model(hidden_states=x, timestep=t, encoder_hidden_states=both(c, lambda v: v.embeds),
                     pooled_projections=both(c, lambda v: v.pooled)).sample
    return dict(component="transformer", model=model, sched=sched, cond=cond, call=call, shape=(4, 8, 8), w=3.0)


def sana_case():
    from diffusers import SanaTransformer2DModel
    model = perturbed(SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                             attention_head_dim=4, num_layers=2, num_cross_attention_heads=2,
                                             cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=12,
                                             sample_size=8, patch_size=1, timestep_scale=0.5))
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    cond = text_condition(5, 12, mask=True)

    def call(x, t, c):   # pipeline_sana.py:913-921: timestep · config.timestep_scale, encoder_attention_mask
        return model(x, encoder_hidden_states=both(c, lambda v: v.embeds),
                     encoder_attention_mask=both(c, lambda v: v.mask),
                     timestep=t * model.config.timestep_scale).sample
    return dict(component="transformer", model=model, sched=sched, cond=cond, call=call, shape=(4, 8, 8), w=2.0)


def flux_case():
    from diffusers import FluxPipeline, FluxTransformer2DModel
    model = perturbed(FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                             pooled_projection_dim=12, guidance_embeds=True,
                                             axes_dims_rope=(4, 4, 8)))
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    guidance = torch.tensor([3.5, 1.0])   # the embedded guidance scale, per sample
    cond = text_condition(7, 24, pooled=12, extra={"guidance": guidance})
    H = W = 8
    img_ids = FluxPipeline._prepare_latent_image_ids(B, H // 2, W // 2, "cpu", torch.float32)

    def call(x, t, c):   # pipeline_flux.py:898-908 on packed latents; txt_ids as encode_prompt makes them
        packed = FluxPipeline._pack_latents(x, x.shape[0], 4, H, W)
        out = model(hidden_states=packed, timestep=t / 1000, guidance=guidance, pooled_projections=c.pooled,
                    encoder_hidden_states=c.embeds, txt_ids=torch.zeros(c.embeds.shape[1], 3),
                    img_ids=img_ids).sample
        return FluxPipeline._unpack_latents(out, H * 8, W * 8, 8)
    return dict(component="transformer", model=model, sched=sched, cond=cond, call=call, shape=(4, H, W), w=None,
                mu=True, sample_shape=(4, H, W))


def dit_case(cls_name):
    from diffusers import DiTTransformer2DModel, Transformer2DModel
    kw = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
              sample_size=8, patch_size=2, num_embeds_ada_norm=5)
    model = perturbed(DiTTransformer2DModel(**kw) if cls_name == "DiT" else
                      Transformer2DModel(**kw, norm_type="ada_norm_zero", norm_elementwise_affine=False,
                                         activation_fn="gelu-approximate"))
    sched = EulerDiscreteScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    cls = torch.tensor([3, 0])
    labels = torch.nn.functional.one_hot(cls, 5).float()

    def call(x, t, c):   # pipeline_dit.py: class_null = num classes; learned sigma: the first C channels are ε
        idx = torch.cat([torch.full((B,), 5), cls]) if isinstance(c, tuple) else cls
        return model(x, timestep=t, class_labels=idx).sample[:, :4]
    return dict(component="transformer", model=model, sched=sched, cond=labels, call=call, shape=(4, 8, 8), w=4.0)


def wan_case():
    from diffusers import WanTransformer3DModel
    model = perturbed(WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                            in_channels=4, out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32,
                                            num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                            rope_max_seq_len=32))
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    cond = text_condition(6, 16)

    def call(x, t, c):   # pipeline_wan.py:613-624
        return model(hidden_states=x, timestep=t, encoder_hidden_states=both(c, lambda v: v.embeds)).sample
    return dict(component="transformer", model=model, sched=sched, cond=cond, call=call, shape=(4, 3, 4, 4),
                w=2.0, sample_shape=(4, 3, 4, 4))


CASES = {"sd15": lambda: unet_case("sd15"), "sd2v": lambda: unet_case("sd2v"), "sdxl": lambda: unet_case("sdxl"),
         "sd3": sd3_case, "sana": sana_case, "flux": flux_case, "dit": lambda: dit_case("DiT"),
         "transformer2d": lambda: dit_case("T2D"), "wan": wan_case}


def loaded(case, tmp_path, name):
    root = save(tmp_path / name, case["component"], case["model"], case["sched"])
    net, state = load_teacher(root, sample_shape=case.get("sample_shape"))
    return net, state, root


# ------------------------------------------------------------------------------------------------ the oracle
@pytest.mark.parametrize("name", list(CASES))
def test_sigma_space_euler_reproduces_the_diffusers_scheduler_loop(name, tmp_path):
    """Our σ-space Euler sampler (``euler_sampler``, CFG in D-space) on the teacher's own grid equals diffusers'
    loop x ← scheduler.step(net output, t, x) with the network called as its pipeline calls it. UNets and DiTs:
    EulerDiscreteScheduler on DMD2-SDXL's timesteps 999/749/499/249 (σ-space, scale_model_input); transformers:
    FlowMatchEulerDiscreteScheduler (x_t = x_σ/(1 + σ), σ = t/(1 − t)) with the static or dynamic shift."""
    case = CASES[name]()
    net, state, _ = loaded(case, tmp_path, name)
    sched, call, w, cond = case["sched"], case["call"], case["w"], case["cond"]
    null = cond.null_batch() if isinstance(cond, Condition) else None
    z = randn(B, *case["shape"], seed=7)
    flow = isinstance(sched, FlowMatchEulerDiscreteScheduler)
    with torch.no_grad():
        if flow:
            kw = {}
            if case.get("mu"):   # FLUX: the pipeline's resolution-dependent shift for this token count
                from diffusers.pipelines.flux.pipeline_flux import calculate_shift
                kw["mu"] = calculate_shift(int(np.prod(case["shape"][1:])) // 4, 256, 4096, 0.5, 1.15)
                info = state["source"]["shift"]
                assert info["kind"] == "dynamic" and info["mu"] == pytest.approx(kw["mu"], rel=1e-12)
            sched.set_timesteps(sigmas=np.linspace(0.9, 0.3, 4), **kw)   # t_0 < 1: σ_0 finite
            unshifted = flow_sigma(torch.tensor(np.linspace(0.9, 0.3, 4)))
            scale = state["source"]["shift"]["sigma_scale"]   # the recorded shift is the grid's σ multiplier
            assert torch.allclose(flow_sigma(sched.sigmas[:-1].double()), shift_sigma(unshifted, scale), rtol=1e-5)
            x = sched.sigmas[0] * z                               # x_t0 = t_0·z, i.e. x_σ0 = σ_0·z
            for t in sched.timesteps:
                out = cfg_output(call, w, x, t.expand(B), cond, null)
                x = sched.step(out, t, x).prev_sample
            sigmas = flow_sigma(sched.sigmas.double()).tolist()
        else:
            sched.set_timesteps(timesteps=[999, 749, 499, 249])
            x = sched.sigmas[0] * z
            for t in sched.timesteps:
                inp = sched.scale_model_input(x, t)
                out = cfg_output(call, w, inp, t.expand(B), cond, null if isinstance(cond, Condition) else "null")
                x = sched.step(out, t, x).prev_sample
            sigmas = sched.sigmas.tolist()
        ours, nfe = euler_sampler(guided(net, w), z, sigmas, cond)
    assert nfe == len(sigmas) - 1 and sigmas[-1] == 0
    assert ours.shape == x.shape == (B,) + tuple(net.sample_shape)
    diff = (ours - x).abs().max().item()
    assert diff <= 1e-5 * max(1.0, x.abs().max().item()), (name, diff)
    # the network's input and output depend on the condition (the check above is not blind to it)
    with torch.no_grad():
        s = torch.tensor([1.0, 1.0])
        other = C.null_of(cond) if isinstance(cond, Condition) else cond.flip(0)
        assert (net(z, s, cond) - net(z, s, other)).abs().max() > 1e-4


def test_recorded_timestep_conventions(tmp_path):
    """What each class is fed per σ (c_noise) and the shift record, as the docstring table states."""
    expect = {"sd3": 1000.0, "sana": 500.0, "flux": 1.0, "wan": 1000.0}
    for name, scale in expect.items():
        case = CASES[name]()
        net, state, _ = loaded(case, tmp_path, name)
        assert net.time_scale == scale and state["net_config"]["precond_kwargs"]["time_scale"] == scale
        t = net.coefficients(torch.tensor([3.0]))[3]
        assert float(t) == pytest.approx(scale * 0.75)   # σ = 3 is t = 0.75
        assert state["source"]["shift"]["kind"] == ("dynamic" if name == "flux" else "static")
    net, state, _ = loaded(CASES["dit"](), tmp_path, "dit")
    assert net.label_dim == 5 and net.embedding_signature is None and state["source"]["timestep"].startswith("the DDPM")
    # shape of one sample: the config's sample_size; video: (C, F, H, W); FLUX: the unpacked latent
    assert loaded(CASES["sd3"](), tmp_path, "sd3b")[0].sample_shape == (4, 8, 8)
    wan, st, root = loaded(CASES["wan"](), tmp_path, "wanb")
    assert wan.sample_shape == (4, 3, 4, 4) and st["net_config"]["sample_shape"] == [4, 3, 4, 4]
    # without one: the pipelines' defaults (Wan: 81 frames of 480×832 through the folder's VAE factors; FLUX: 1024²)
    assert load_teacher(root)[0].sample_shape == (4, 21, 60, 104)
    (root / "vae").mkdir()
    (root / "vae" / "config.json").write_text(json.dumps({"scale_factor_temporal": 4, "scale_factor_spatial": 16}))
    assert load_teacher(root)[0].sample_shape == (4, 21, 30, 52)
    case = CASES["flux"]()
    flux_root = save(tmp_path / "fluxb", "transformer", case["model"], case["sched"])
    assert load_teacher(flux_root)[0].sample_shape == (4, 128, 128)


# ------------------------------------------------------------------------------------------------ rebuild
@pytest.mark.parametrize("name", ["sdxl", "sd3", "flux", "sana", "dit", "wan"])
def test_rebuilt_from_net_config_equals_the_loaded_network(name, tmp_path):
    """net_config (through JSON, as checkpoints store it) + state dict rebuilds the network bit for bit; the
    weights are the folder's; the bottleneck is the documented shape and bottleneck_only stops at that block."""
    case = CASES[name]()
    net, state, _ = loaded(case, tmp_path, name)
    cfg = json.loads(json.dumps(state["net_config"]))
    assert cfg["arch"] == "diffusers_cond"
    again = build_denoiser(cfg)
    again.load_state_dict(state["sample_net"])
    again.eval().requires_grad_(False)   # as load_for_sampling: CPU kernels differ by requires_grad at 1e-6
    inner = getattr(again.model, case["component"])
    assert inner.state_dict().keys() == case["model"].state_dict().keys()
    assert all(torch.equal(v, case["model"].state_dict()[k]) for k, v in inner.state_dict().items())
    x, s, cond = randn(B, *case["shape"], seed=3), torch.tensor([0.4, 7.0]), case["cond"]
    with torch.no_grad():
        D = net(x, s, cond)
        assert torch.equal(D, again(x, s, cond))
        D2, feats = net(x, s, cond, return_bottleneck=True)
        seen = []   # the network's output layer, after every block
        inner = net.model.net
        last = next(getattr(inner, n) for n in ("conv_out", "proj_out_2", "proj_out") if hasattr(inner, n))
        h = last.register_forward_hook(lambda *a: seen.append(1))
        only = net(x, s, cond, bottleneck_only=True)
        h.remove()
    assert torch.equal(D2, D) and torch.equal(only, feats)
    assert not seen                                             # bottleneck_only stopped at the block
    if name == "sdxl":
        assert feats.shape == (B, 16, 4, 4)                     # the UNet's mid-block output
    else:
        assert net.model.bottleneck_block == len(net.model.blocks()) // 2   # the middle block
        grid = tuple(n // p for n, p in zip(case["shape"][1:], net.model.patch()))
        assert feats.shape[0] == B and feats.shape[2:] == grid
    # LoRA's default layers exist in every class
    assert any(t.endswith(".to_q") for t in resolve_targets(net, "diffusers_cond", None))
    tok = build_denoiser({**cfg, "adapter": {**cfg["adapter"], "bottleneck_layout": "tokens"}})
    tok.load_state_dict(state["sample_net"])
    with torch.no_grad():
        t = tok.eval().requires_grad_(False)(x, s, cond, bottleneck_only=True)
    assert t.ndim == 3 and torch.equal(t.transpose(1, 2).reshape(feats.shape), feats)


def test_convert_teacher_writes_a_verified_safetensors(tmp_path):
    """convert-teacher's reload check runs with an example condition that fits the signature."""
    case = CASES["sana"]()
    root = save(tmp_path / "sana", "transformer", case["model"], case["sched"])
    meta = convert_teacher(root, tmp_path / "t.safetensors", dropout=0.1)
    assert meta["verified_max_abs_diff"] == 0 and meta["source"]["format"] == "diffusers SanaTransformer2DModel"
    assert meta["net_config"]["kwargs"]["dropout"] == 0.1   # --dropout reaches the config of the network
    net, _ = load_teacher(tmp_path / "t.safetensors")
    assert net.embedding_signature == {"embeds": (None, 12), "mask": (None,)}


# ------------------------------------------------------------------------------------------------ bad input
def test_unsupported_class_or_layout_and_missing_scheduler_are_user_errors(tmp_path):
    bad = tmp_path / "bad"
    (bad / "transformer").mkdir(parents=True)
    (bad / "transformer" / "config.json").write_text(json.dumps({"_class_name": "HunyuanDiT2DModel"}))
    FlowMatchEulerDiscreteScheduler().save_pretrained(str(bad / "scheduler"))
    with pytest.raises(UserError, match="HunyuanDiT2DModel is not a supported diffusers network"):
        load_teacher(bad)        # refused from config.json alone: the folder has no weights
    (bad / "transformer" / "config.json").write_text(json.dumps(
        {"_class_name": "Transformer2DModel", "in_channels": 4, "patch_size": 2, "norm_type": "ada_norm_single",
         "caption_channels": 16, "sample_size": 8}))
    with pytest.raises(UserError, match="PixArt is not supported"):
        load_teacher(bad)
    (bad / "transformer" / "config.json").write_text(json.dumps(
        {"_class_name": "UNet2DConditionModel", "in_channels": 9, "out_channels": 4, "cross_attention_dim": 16}))
    with pytest.raises(UserError, match="inpainting"):
        load_teacher(bad)
    case = CASES["sd3"]()
    case["model"].save_pretrained(str(tmp_path / "nosched" / "transformer"))
    with pytest.raises(UserError, match="no scheduler config"):
        load_teacher(tmp_path / "nosched")


def test_a_condition_that_does_not_fit_the_config_is_refused_before_torch(tmp_path):
    nets = {n: loaded(CASES[n](), tmp_path, n)[0] for n in ("sd3", "flux", "sana", "sdxl")}
    x, s = randn(B, 4, 8, 8), torch.tensor([1.0, 1.0])
    cases = [("sd3", Condition(randn(B, 6, 15), None, randn(B, 12)), r"embeds: \[6, 15\].*takes.*embeds: \[L, 16\]"),
             ("sd3", Condition(randn(B, 6, 16)), "pooled"),
             ("flux", Condition(randn(B, 7, 24), None, randn(B, 12)), "extra.guidance"),
             ("sana", Condition(randn(B, 5, 12)), "mask"),
             ("sdxl", Condition(randn(B, 5, 16), None, randn(B, 8), {"time_ids": randn(B, 5)}), r"time_ids: \[6\]"),
             ("sd3", Condition(randn(B + 1, 6, 16), None, randn(B + 1, 12)), "3 conditions for a batch of 2")]
    for name, cond, msg in cases:
        with pytest.raises(UserError, match=msg):
            nets[name](x, s, cond)
    with pytest.raises(UserError, match="bottleneck_block"):
        cfg = loaded(CASES["sd3"](), tmp_path, "sd3c")[1]["net_config"]
        build_denoiser({**cfg, "adapter": {"bottleneck_block": 9}})


def test_flow_sigma_schedulers_of_sana_and_wan_are_flow_teachers():
    """SANA's DPMSolverMultistepScheduler and Wan's UniPCMultistepScheduler configs (use_flow_sigmas,
    flow_prediction, flow_shift) are velocity networks on t = σ_flow with a static shift; a one-step DPM-Solver++
    update on that grid is our σ-space Euler step (both are x_t′ = (t′/t)·x_t + (1 − t′/t)·x̂₀)."""
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    from diffdistill.nets.diffusers_unet import schedule_from_config, shift_info
    for cls, shift in ((DPMSolverMultistepScheduler, 3.0), (UniPCMultistepScheduler, 5.0)):
        sched = cls(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift, solver_order=1)
        schedule, pred = schedule_from_config(dict(sched.config, _class_name=cls.__name__))
        assert schedule["family"] == "flow" and pred == "velocity" and schedule["shift"] == shift
        assert shift_info(schedule) == {"kind": "static", "shift": shift, "sigma_scale": shift}
    with pytest.raises(UserError, match="go together"):
        schedule_from_config(dict(DPMSolverMultistepScheduler(use_flow_sigmas=True).config,
                                  _class_name="DPMSolverMultistepScheduler"))
    sched = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0,
                                        solver_order=1, final_sigmas_type="zero")
    sched.set_timesteps(4)
    x, v = randn(1, 4, 4, 4, seed=1), randn(1, 4, 4, 4, seed=2)
    t, t1 = float(sched.sigmas[1]), float(sched.sigmas[2])
    sched._step_index = 1
    got = sched.step(v, sched.timesteps[1], x).prev_sample
    sig, sig1 = t / (1 - t), t1 / (1 - t1)
    d_sigma = x / (1 - t) + (sig1 - sig) * ((x / (1 - t) - (x - t * v)) / sig)   # Euler in σ-space, D = x_t − t·v
    assert torch.allclose(got, d_sigma * (1 - t1), atol=1e-5)


# ------------------------------------------------------------------------------------------------ distillation
def _prompts_and_latents(tmp_path, case, n=8):
    """A prompts file (the case's B prompts and null) and a latent data set of n samples carrying them."""
    shape = case.get("sample_shape") or case["shape"]
    latents = randn(n, *shape, seed=3).numpy()
    c = case["cond"]
    if isinstance(c, Condition):
        rows = c.rows(torch.arange(n) % len(c))
        np.savez(tmp_path / "prompts.npz", **{k: v.numpy() for k, v in c.state().items()})
        np.savez(tmp_path / "latents.npz", latents=latents, **{k: v.numpy() for k, v in rows.state().items()})
        return ["--prompts", str(tmp_path / "prompts.npz")], tmp_path / "latents.npz"
    np.savez(tmp_path / "latents.npz", latents=latents, labels=(np.arange(n) % c.shape[1]))
    return [], tmp_path / "latents.npz"


@pytest.mark.parametrize("name", ["sd15", "sdxl", "sd3", "sana", "flux", "dit", "wan"])
def test_dmd2_and_sid_distil_each_teacher_class_through_the_cli(name, tmp_path):
    """3 iterations of DMD2 (with its GAN head on the fake score's bottleneck, real latents with their prompts,
    the real score guided) and of SiD (data-free, from the prompts) from a local folder: finite losses, and a
    checkpoint that `sample` reads."""
    from diffdistill.cli import main
    case = CASES[name]()
    root = save(tmp_path / name, case["component"], case["model"], case["sched"])
    prompts, latents = _prompts_and_latents(tmp_path, case)
    common = ["--iters", "3", "--batch-size", "4", "--no-progress", "--set", "run.ckpt_every=0",
              "--set", "run.sample_every=0", "--set", "run.log_every=1", "--set", "net.sigma_data=1.0"]
    guide = [] if name == "flux" else ["--set", "method.guidance_real=2"]   # FLUX: embedded guidance instead
    if case.get("sample_shape"):   # transformers take any latent size: the run's is given
        common += ["--sample-shape", ",".join(map(str, case["sample_shape"]))]
    runs = {"dmd2": ["--data", str(latents), "--set", "method.gan_weight=0.01"] + guide,
            "sid": guide}
    for method, extra in runs.items():
        out = tmp_path / method
        assert main(["distill", "--method", method, "--teacher", str(root), "--out", str(out)] + prompts + common
                    + extra) == 0, method
        logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        losses = [v for r in logs for k, v in r.items() if "/" in k and isinstance(v, float)]
        assert losses and all(np.isfinite(losses)), (method, logs)
        ckpt = sorted((out / "checkpoints").glob("ckpt-*.pt"))[-1]
        assert main(["sample", str(ckpt), "--num-samples", "3", "--out", str(tmp_path / f"{method}.npz")]) == 0
        x = np.load(tmp_path / f"{method}.npz")["samples"]
        assert x.shape == (3,) + tuple(case.get("sample_shape") or case["shape"]) and np.isfinite(x).all()
