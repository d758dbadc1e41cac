"""Activation checkpointing (``run.activation_checkpointing``) and the bf16 frozen teacher (``run.teacher_dtype``).

Checkpointed backward equals plain backward (float64, every architecture, dropout included); a short distillation
with checkpointing ends on the same parameters; a bf16 teacher holds bf16 weights, answers in fp32 close to the
fp32 teacher, and the trained copies start from its fp32 weights."""

import math
import re

import pytest
import torch
from conftest import tiny_points_cfg

from diffdistill.errors import UserError
from diffdistill.nets.checkpointing import checkpointable, set_activation_checkpointing
from diffdistill.nets.dhariwalunet import DhariwalUNet
from diffdistill.nets.low_precision import store_in_bf16, stored_in_bf16
from diffdistill.nets.mlp import MLPDenoiserNet
from diffdistill.nets.songunet import SongUNet
from diffdistill.train.trainer import Trainer

DIGITS_TEACHER = "src/diffdistill/assets/teacher_digits.safetensors"


def _songunet(dropout, **kw):
    return SongUNet(img_resolution=8, in_channels=2, out_channels=2, label_dim=3, model_channels=16,
                    channel_mult=(1, 2), num_blocks=2, attn_resolutions=(4,), dropout=dropout, **kw)


def _diffusers(dropout):
    from diffusers import UNet2DModel
    return UNet2DModel(sample_size=8, in_channels=2, out_channels=2, layers_per_block=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D",
                                                                                            "UpBlock2D"),
                       norm_num_groups=8, attention_head_dim=8, dropout=dropout)


ARCHS = {
    "songunet": lambda p: _songunet(p),
    "songunet_skip_residual": lambda p: _songunet(p, encoder_type="residual", decoder_type="skip"),
    "dhariwalunet": lambda p: DhariwalUNet(img_resolution=8, in_channels=2, out_channels=2, label_dim=3,
                                           model_channels=16, channel_mult=(1, 2), num_blocks=1,
                                           attn_resolutions=(4,), dropout=p),
    "mlp": lambda p: MLPDenoiserNet(dim=2, hidden=32, depth=3, label_dim=3),
    "diffusers_unet2d": lambda p: _diffusers(p),
}


def _inputs(arch, gen):
    B = 5
    shape = (B, 2) if arch == "mlp" else (B, 2, 8, 8)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    c = torch.randn(B, generator=gen, dtype=torch.float64)
    y = torch.nn.functional.one_hot(torch.arange(B) % 3, 3).double()
    return x, c, y


def _call(arch, net, x, c, y):
    if arch == "diffusers_unet2d":
        return net(x, c.exp() * 100, class_labels=None).sample
    return net(x, c, y)


def _grads(arch, net, x, c, y, seed):
    """The gradient of a fixed nonlinear loss w.r.t. every parameter and the input, and the output, with the
    global RNG (dropout's) seeded."""
    net.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = _call(arch, net, x, c, y)
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    (out.square() * w + out.sin()).sum().backward()
    after = torch.rand(1)   # the RNG stream after the pass: checkpointing must not change what comes next
    return {"out": out.detach(), "x": x.grad, "rng_after": after,
            **{n: p.grad for n, p in net.named_parameters() if p.grad is not None}}


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_checkpointed_backward_equals_plain_backward_float64(arch, dropout):
    if arch == "mlp" and dropout:
        pytest.skip("the MLP denoiser has no dropout")
    torch.manual_seed(0)
    net = ARCHS[arch](dropout).double().train()
    with torch.no_grad():   # no zero-initialised layer: every parameter gets a gradient that depends on the rest
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, c, y = _inputs(arch, torch.Generator().manual_seed(1))
    plain = _grads(arch, net, x, c, y, seed=7)
    assert set_activation_checkpointing(net) == 1 and checkpointable(net)
    # checkpoints are really taken: backward recomputes every block (a pre-hook, since the recomputation stops
    # once the last tensor it needs is rebuilt)
    calls = []
    blocks = [m for m in net.modules() if type(m).__name__ in ("UNetBlock", "MLPBlock", "ResnetBlock2D")]
    hooks = [b.register_forward_pre_hook(lambda m, i: calls.append(m)) for b in blocks]
    ckpt = _grads(arch, net, x, c, y, seed=7)
    for h in hooks:
        h.remove()
    twice = [b for b in blocks if calls.count(b) == 2]
    if arch == "diffusers_unet2d":   # diffusers' UNetMidBlock2D runs its first ResNet outside a checkpoint
        assert twice == [b for b in blocks if b is not net.mid_block.resnets[0]], (len(twice), len(blocks))
    else:
        assert blocks and twice == blocks and len(calls) == 2 * len(blocks), (len(calls), len(blocks))
    assert set(ckpt) == set(plain) and len(plain) == len(list(net.parameters())) + 3
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=0, atol=0, msg=f"{arch} {k}")
    if dropout:   # dropout really acts: another seed gives another output
        other = _grads(arch, net, x, c, y, seed=8)
        assert not torch.allclose(other["out"], plain["out"])
    set_activation_checkpointing(net, False)
    torch.testing.assert_close(_grads(arch, net, x, c, y, seed=7)["x"], plain["x"], rtol=0, atol=0)


def test_no_grad_and_eval_passes_are_untouched():
    """Without a graph (sampling, the frozen teacher) nothing is checkpointed: the blocks run once."""
    net = ARCHS["songunet"](0.0).eval()
    set_activation_checkpointing(net)
    x, c, y = (t.float() for t in _inputs("songunet", torch.Generator().manual_seed(0)))
    calls = []
    for b in net.modules():
        if type(b).__name__ == "UNetBlock":
            b.register_forward_hook(lambda m, i, o: calls.append(m))
    with torch.no_grad():
        out = net(x, c, y)
    assert out.grad_fn is None and len(calls) == sum(type(b).__name__ == "UNetBlock" for b in net.modules())


# ------------------------------------------------------------------------------------------------ training runs
def _ring8_teacher(root):
    from diffdistill.io.checkpoint import list_checkpoints
    tr = Trainer(tiny_points_cfg(root, steps=30))
    tr.run()
    return list_checkpoints(root / "checkpoints")[-1]


@pytest.fixture(scope="module")
def ring8_tiny_teacher(tmp_path_factory):
    return _ring8_teacher(tmp_path_factory.mktemp("ring8_tiny"))


def _distill(method, teacher, out, *overrides, steps=4, batch=32):
    from diffdistill.distill import distill
    run = {"out": str(out), "steps": steps, "batch_size": batch, "progress": False, "ckpt_every": 0,
           "sample_every": 0, "log_every": 1}
    return distill(method, teacher, flags={"run": run}, overrides=list(overrides))


def _state(tr):
    return {f"{k}.{n}": v.detach().clone() for k, net in tr.method.nets.items() for n, v in net.state_dict().items()}


@pytest.mark.parametrize("method,roles,extra", [
    ("dmd2", "[generator,fake_score]", ["method.dfake_gen_update_ratio=2", "method.gan_weight=0.003",
                                        "method.dropout=0.2"]),
    ("sid", "[generator,fake_score]", []),
    ("cd", "student", []),
])
def test_training_with_checkpointing_ends_on_the_same_parameters(ring8_tiny_teacher, tmp_path, method, roles, extra):
    """A few iterations of a distillation (dropout in the trained copies for DMD2) with the named networks
    checkpointed end on the parameters of the run without (float32)."""
    a = _distill(method, ring8_tiny_teacher, tmp_path / "a", *extra)
    b = _distill(method, ring8_tiny_teacher, tmp_path / "b", *extra, f"run.activation_checkpointing={roles}")
    names = roles.strip("[]").split(",")
    assert all(b.method.nets[n].model.activation_checkpointing for n in names)
    assert not any(getattr(e.net.model, "activation_checkpointing", False) for e in b.method.emas.values())
    sa, sb = _state(a), _state(b)
    assert list(sa) == list(sb)
    for k in sa:   # bit-identical: the recomputation repeats the forward's operations exactly
        assert torch.equal(sa[k], sb[k]), (k, float((sa[k] - sb[k]).abs().max()))
    assert any(not torch.equal(sa[k], v) for k, v in _state(_distill(method, ring8_tiny_teacher, tmp_path / "c",
                                                                        *extra, steps=1)).items())


def test_resume_with_checkpointing_turned_on_continues_exactly(ring8_tiny_teacher, tmp_path, capsys):
    """Memory ran short: resume a run with checkpointing on; it continues as the uninterrupted run (no warning
    that the configuration changed)."""
    from diffdistill.distill import distill
    run = {"progress": False, "sample_every": 0, "log_every": 1, "batch_size": 32}
    full = _distill("sid", ring8_tiny_teacher, tmp_path / "full", steps=4)
    distill("sid", ring8_tiny_teacher, flags={"run": {**run, "out": str(tmp_path / "r"), "steps": 2}})
    capsys.readouterr()
    resumed = distill("sid", ring8_tiny_teacher, flags={"run": {**run, "out": str(tmp_path / "r"), "steps": 4,
                                                               "resume": "auto"}},
                      overrides=["run.activation_checkpointing=[generator,fake_score]"])
    out = capsys.readouterr().out
    assert "resumed from" in out and "configuration differs" not in out, out
    for (k, p), q in zip(_state(full).items(), _state(resumed).values()):
        assert torch.equal(p, q), k


def test_digits_songunet_distillation_with_checkpointing(tmp_path):
    """The shipped digits teacher (SongUNet, attention at 4×4): DMD2 with its GAN (the generator's GAN term runs
    the checkpointed fake score with frozen parameters) and dropout, both trained networks checkpointed."""
    extra = ["method.gan_weight=0.003", "method.dfake_gen_update_ratio=1", "method.dropout=0.1"]
    a = _distill("dmd2", DIGITS_TEACHER, tmp_path / "a", *extra, steps=2, batch=8)
    b = _distill("dmd2", DIGITS_TEACHER, tmp_path / "b", *extra,
                 "run.activation_checkpointing=[generator,fake_score]", steps=2, batch=8)
    sa, sb = _state(a), _state(b)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), (k, float((sa[k] - sb[k]).abs().max()))


def test_bad_role_names_are_one_line_user_errors(ring8_tiny_teacher, tmp_path):
    for role, said in (("genrator", "has no network 'genrator' (did you mean 'generator'?)"),
                       ("gan_head", "network 'gan_head' (ImageGANHead) has no blocks to checkpoint")):
        overrides = [f"run.activation_checkpointing={role}"]
        if role == "gan_head":
            overrides += ["method.gan_weight=0.003"]
        with pytest.raises(UserError) as e:
            _distill("dmd2", DIGITS_TEACHER if role == "gan_head" else ring8_tiny_teacher, tmp_path / role,
                     *overrides, steps=1, batch=4)
        msg = str(e.value)
        assert "\n" not in msg and said in msg and msg.endswith("valid: generator, fake_score"), msg
    with pytest.raises(UserError, match=r"network 'teacher' is frozen .*valid: student$"):
        _distill("pd", ring8_tiny_teacher, tmp_path / "pd", "run.activation_checkpointing=teacher", steps=8)
    with pytest.raises(UserError, match=r"run.activation_checkpointing must be list of string"):
        Trainer(tiny_points_cfg(tmp_path / "t", activation_checkpointing=3))


def test_teacher_training_checkpoints_its_net(tmp_path):
    a = Trainer(tiny_points_cfg(tmp_path / "a", steps=3))
    b = Trainer(tiny_points_cfg(tmp_path / "b", steps=3, activation_checkpointing=["net"]))
    assert b.method.nets["net"].model.activation_checkpointing
    a.run()
    b.run()
    for (k, p), q in zip(_state(a).items(), _state(b).values()):
        assert torch.equal(p, q), k


# ------------------------------------------------------------------------------------------------ bf16 teacher
def test_store_in_bf16_halves_the_weights_and_answers_in_fp32():
    from diffdistill.distill import load_teacher
    t32, _ = load_teacher(DIGITS_TEACHER, "cpu")
    t16, _ = load_teacher(DIGITS_TEACHER, "cpu")
    t16.requires_grad_(False)
    size = lambda n: sum(p.numel() * p.element_size() for p in n.parameters())
    before = size(t16)
    store_in_bf16(t16)
    assert stored_in_bf16(t16) and list(t16.state_dict()) == list(t32.state_dict())
    assert {p.dtype for p in t16.parameters() if p.ndim >= 2} == {torch.bfloat16}
    assert {p.dtype for p in t16.parameters() if p.ndim < 2} == {torch.float32}
    assert all(b.dtype == torch.float32 for b in t16.buffers() if b.is_floating_point())
    assert 0.5 <= size(t16) / before < 0.51
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for sigma in (0.01, 0.3, 2.5, 80.0):
        x0 = torch.rand(64, 1, 8, 8, generator=g) * 2 - 1
        x = x0 + sigma * torch.randn(x0.shape, generator=g)
        y = torch.nn.functional.one_hot(torch.arange(64) % 10, 10).float() if t32.label_dim else None
        with torch.no_grad():
            d32, d16 = t32(x, sigma, y), t16(x, sigma, y)
        assert d16.dtype == torch.float32
        rel = float((d16 - d32).norm() / d32.norm())
        worst = max(worst, rel)
    assert worst < 2e-2, worst      # measured: 0.0054 (relative L2 error, at σ = 0.3; 0.0002 at σ = 0.01)
    assert not torch.is_autocast_enabled("cpu")   # the hooks leave autocast as they found it
    with pytest.raises(ValueError, match="frozen"):
        store_in_bf16(load_teacher(DIGITS_TEACHER, "cpu")[0].requires_grad_(True))


@pytest.mark.parametrize("arch", ["mlp", "diffusers_unet2d", "dhariwalunet"])
def test_bf16_storage_of_other_architectures(arch):
    """The MLP (nn.LayerNorm), a diffusers UNet2DModel (nn.Conv2d, nn.GroupNorm, its own time embedding) and
    DhariwalUNet run with bf16 weights and answer in fp32 near their fp32 outputs."""
    import copy

    from diffdistill.nets.factory import build_denoiser
    cfg = {"mlp": {"arch": "mlp", "img_channels": 2, "kwargs": {"hidden": 64, "depth": 2}},
           "dhariwalunet": {"arch": "dhariwalunet", "img_channels": 2, "img_resolution": 8,
                            "kwargs": {"model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1,
                                       "attn_resolutions": [4], "dropout": 0.0}},
           "diffusers_unet2d": {"arch": "diffusers_unet2d", "img_channels": 2, "img_resolution": 8,
                                "kwargs": {**_diffusers(0.0).config, "_class_name": "UNet2DModel"},
                                "precond_kwargs": {"schedule": {"family": "ddpm", "beta_schedule": "linear"}}}}[arch]
    torch.manual_seed(0)
    t32 = build_denoiser(cfg).eval().requires_grad_(False)
    with torch.no_grad():   # no zero-initialised output layer: the raw network's output matters
        for p in t32.parameters():
            p.add_(0.05 * torch.randn_like(p))
    t16 = store_in_bf16(copy.deepcopy(t32))
    x = torch.randn((16,) + tuple(t32.sample_shape), generator=torch.Generator().manual_seed(1))
    for sigma in (0.1, 2.0):
        with torch.no_grad():
            d32, d16 = t32(x * sigma, sigma), t16(x * sigma, sigma)
        assert d16.dtype == torch.float32
        assert float((d16 - d32).norm() / d32.norm()) < 2e-2, (arch, sigma)


@pytest.mark.parametrize("method", ["dmd2", "cd", "pd"])
def test_bf16_teacher_distillation(tmp_path, method):
    from diffdistill.distill import load_teacher
    fp32 = load_teacher(DIGITS_TEACHER, "cpu")[0].state_dict()
    extra = {"pd": ["method.start_steps=4", "method.iters_per_halving=1"]}.get(method, [])
    tr = _distill(method, DIGITS_TEACHER, tmp_path / method, "run.teacher_dtype=bf16", *extra, steps=2, batch=8)
    teachers = tr.method.teacher_networks()
    assert teachers and all(stored_in_bf16(t) for t in teachers)
    for t in teachers:
        assert {p.dtype for p in t.parameters() if p.ndim >= 2} == {torch.bfloat16}
    assert tr.teacher is teachers[0]
    trained = [net for net in tr.method.nets.values() if any(p.requires_grad for p in net.parameters())]
    assert trained and all(p.dtype == torch.float32 for net in trained for p in net.parameters())
    logs = [line for line in (tmp_path / method / "log.jsonl").read_text().splitlines()]
    assert len(logs) == 2 and all(math.isfinite(v) for line in logs
                                  for k, v in __import__("json").loads(line).items() if k.startswith("loss/"))
    # the trained copies start from the fp32 weights, not the bf16 ones (the built trainer, before any step)
    from diffdistill.distill import distill
    init = distill(method, DIGITS_TEACHER, flags={"run": {"out": str(tmp_path / "init")}}, dry_run=True,
                   overrides=["run.teacher_dtype=bf16", *extra])
    assert all(stored_in_bf16(t) for t in init.method.teacher_networks())
    first = "generator" if "generator" in init.method.nets else "student"
    for k, v in init.method.nets[first].state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, fp32[k]), k


def test_bf16_teacher_in_the_dry_run_plan(tmp_path, capsys):
    from diffdistill.cli import main
    sizes = {}
    for dtype in ("fp32", "bf16"):
        assert main(["distill", "--method", "dmd2", "--teacher", DIGITS_TEACHER, "--dry-run", "--out",
                     str(tmp_path / dtype), "--set", f"run.teacher_dtype={dtype}", "--set",
                     "run.activation_checkpointing=generator"]) == 0
        out = capsys.readouterr().out
        row = next(line for line in out.splitlines() if line.startswith("teacher "))
        value, unit = re.search(r"([\d.]+) (KiB|MiB)", row).groups()
        sizes[dtype] = float(value) * (1024 if unit == "MiB" else 1)
        assert ("bfloat16" in row) == (dtype == "bf16"), row
        gen = next(line for line in out.splitlines() if line.startswith("generator "))
        fake = next(line for line in out.splitlines() if line.startswith("fake_score "))
        assert "bfloat16" not in gen and "activation checkpointing" in gen and "checkpointing" not in fake
    assert 0.49 < sizes["bf16"] / sizes["fp32"] < 0.52, sizes


def test_dry_run_estimate_with_checkpointing(tmp_path, capsys):
    """The plan shows the checkpointed networks, the smaller activations and the recomputed block."""
    from diffdistill.cli import main

    def plan(*sets):
        args = ["distill", "--method", "dmd2", "--teacher", DIGITS_TEACHER, "--dry-run", "--batch-size", "64",
                "--out", str(tmp_path / "plan")]
        assert main(args + [a for s in sets for a in ("--set", s)]) == 0
        out = capsys.readouterr().out
        acts = {m.group(1): float(m.group(2)) for m in re.finditer(r"phase (\w+) +gradients .* activations +([\d.]+) MiB",
                                                                   out)}
        return out, acts
    out0, plain = plan()
    out1, ckpt = plan("run.activation_checkpointing=[generator,fake_score]")
    assert set(plain) == set(ckpt) == {"generator", "critic"}
    assert "recomputed in backward" not in out0 and "recomputed in backward" in out1
    for ph in plain:
        assert 0.1 < ckpt[ph] / plain[ph] < 0.5, (ph, plain, ckpt)
    assert not (tmp_path / "fp32").exists()


def test_teacher_dtype_without_a_teacher_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="has no teacher"):
        Trainer(tiny_points_cfg(tmp_path, teacher_dtype="bf16"))
    with pytest.raises(UserError, match="teacher_dtype must be one of 'fp32', 'bf16'"):
        Trainer(tiny_points_cfg(tmp_path, teacher_dtype="fp16"))
