"""LoRA students through peft (``diffdistill.lora``): a fresh adapter is exactly the teacher, the frozen base never
receives a gradient, role adapters on one shared base train exactly as the same adapters on separate copies,
merge → export → reload computes the adapter's function, checkpoints hold adapters only and resume exactly, the
dry run shows the plan, and a short LoRA distillation of the ring8 teacher moves its student toward the teacher."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from dm_helpers import MLP_CFG, tiny_teacher  # noqa: E402

pytest.importorskip("peft")

from diffdistill.errors import UserError  # noqa: E402
from diffdistill.lora import (LoRAOptions, LoRARole, load_adapter, lora_copies, merged_network,  # noqa: E402
                              resolve_targets)
from diffdistill.nets.factory import build_denoiser  # noqa: E402

SONG_CFG = {"arch": "songunet", "img_channels": 1, "img_resolution": 8, "label_dim": 0, "sigma_data": 0.5,
            "kwargs": {"model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4],
                       "dropout": 0.0}}
DHARIWAL_CFG = {"arch": "dhariwalunet", "img_channels": 2, "img_resolution": 8, "label_dim": 0,
                "kwargs": {"model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4],
                           "dropout": 0.0}}


def _diffusers_cfg():
    from diffusers import UNet2DModel
    unet = UNet2DModel(sample_size=8, in_channels=2, out_channels=2, layers_per_block=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8)
    return {"arch": "diffusers_unet2d", "img_channels": 2, "img_resolution": 8,
            "kwargs": {**unet.config, "_class_name": "UNet2DModel"},
            "precond_kwargs": {"schedule": {"family": "ddpm", "beta_schedule": "linear"}}}


CONFIGS = {"mlp": lambda: MLP_CFG, "songunet": lambda: SONG_CFG, "dhariwalunet": lambda: DHARIWAL_CFG,
           "diffusers_unet2d": _diffusers_cfg}


def _teacher(arch, seed=0):
    """A frozen random teacher of ``arch`` whose every layer matters (no zero-initialised output layer)."""
    torch.manual_seed(seed)
    net = build_denoiser(CONFIGS[arch]())
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval().requires_grad_(False)


def _inputs(net, n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n,) + tuple(net.sample_shape), generator=g)
    return x, torch.tensor([0.05, 0.7, 3.0, 40.0])[:n]


def _perturb(role, scale=0.3, seed=2):
    """Give an adapter non-zero A and B (a fresh one has B = 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in role.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


# ------------------------------------------------------------------------------------------------ options
def test_lora_options_are_validated_and_off_by_default():
    assert not LoRAOptions().enabled()
    assert LoRAOptions(rank=8).scale_alpha() == 8.0
    for bad, msg in [({"rank": 0}, "lora.rank must be"), ({"alpha": 4.0}, "lora.alpha is set but lora.rank is not"),
                     ({"shared_base": False}, "lora.shared_base is set but lora.rank"),
                     ({"rank": 4, "dropout": 1.0}, "lora.dropout must be"),
                     ({"rank": 4, "target_modules": []}, "lora.target_modules is empty"),
                     ({"rnak": 4}, "did you mean 'rank'")]:
        with pytest.raises(UserError, match=msg):
            LoRAOptions.from_dict(bad, owner="lora")


def test_default_and_explicit_targets():
    song = _teacher("songunet")
    paths = resolve_targets(song, "songunet", None)
    # the residual blocks' and attention's convs and linears, the up/down-sampling convs among them
    assert any(p.endswith("_down.conv0") for p in paths) and any(p.endswith(".qkv") for p in paths)
    assert all(p.rsplit(".", 1)[-1] in ("conv0", "conv1", "affine", "skip", "qkv", "proj") for p in paths)
    assert resolve_targets(song, "songunet", ["qkv"]) == [p for p in paths if p.endswith(".qkv")]
    with pytest.raises(UserError, match="no layer matches 'qvk'.*did you mean 'qkv'"):
        resolve_targets(song, "songunet", ["qvk"])
    with pytest.raises(UserError, match="matches only GroupNorm"):
        resolve_targets(song, "songunet", ["norm0"])
    with pytest.raises(UserError, match="no default layers for architecture 'foo'"):
        resolve_targets(song, "foo", None)


# ------------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("arch", ["mlp", "songunet", "dhariwalunet", "diffusers_unet2d"])
@pytest.mark.parametrize("shared", [True, False])
def test_fresh_adapter_is_exactly_the_teacher(arch, shared):
    teacher = _teacher(arch)
    x, sigma = _inputs(teacher)
    with torch.no_grad():
        ref = teacher(x, sigma)
    t, (g, f) = lora_copies(teacher, ["generator", "fake_score"], LoRAOptions(rank=4, shared_base=shared), arch,
                            None, "cpu")
    assert (t is teacher) != shared and g.stack.targets
    with torch.no_grad():
        for role in (t, g.eval(), f.eval()):
            assert torch.equal(role(x, sigma), ref)
        _perturb(g)
        assert not torch.equal(g(x, sigma), ref)      # the adapter is live …
        assert torch.equal(t(x, sigma), ref) and torch.equal(f(x, sigma), ref)   # … and only in its own role


@pytest.mark.parametrize("arch", ["mlp", "songunet"])
def test_roles_own_only_their_adapters_and_the_base_gets_no_gradient(arch):
    teacher = _teacher(arch)
    t, (g, f) = lora_copies(teacher, ["generator", "fake_score"], LoRAOptions(rank=4), arch, None, "cpu")
    base = [p for _, p in g.stack.base_parameters()]
    assert {id(p) for p in t.parameters()} == {id(p) for p in base}
    assert not {id(p) for p in g.parameters()} & {id(p) for p in f.parameters()}
    assert all(p.requires_grad for p in g.parameters()) and not any(p.requires_grad for p in base)
    # the state dicts: the adapter's in peft's key layout; the teacher role's as the plain teacher's
    from peft import get_peft_model_state_dict
    peft_sd = get_peft_model_state_dict(g.net, adapter_name="generator")
    assert list(g.state_dict()) == list(peft_sd) and all(torch.equal(peft_sd[k], v) for k, v in g.state_dict().items())
    assert list(t.state_dict()) == list(build_denoiser(CONFIGS[arch]()).state_dict())
    _perturb(f)
    x, sigma = _inputs(teacher)
    (g(x, sigma).square().mean() + f(x, sigma).square().mean()).backward()
    assert all(p.grad is None for p in base)
    assert all(p.grad is not None for p in g.parameters()) and all(p.grad is not None for p in f.parameters())


def test_ema_copy_is_one_more_adapter_on_the_same_base():
    teacher = _teacher("mlp")
    _, (g,) = lora_copies(teacher, ["generator"], LoRAOptions(rank=4), "mlp", None, "cpu")
    _perturb(g)
    e = copy.deepcopy(g).eval().requires_grad_(False)
    assert isinstance(e, LoRARole) and e.net is g.net and e.adapter == "generator_copy0"
    assert all(torch.equal(a, b) for a, b in zip(e.parameters(), g.parameters()))
    assert all(p.requires_grad for p in g.parameters()) and not any(p.requires_grad for p in e.parameters())
    x, sigma = _inputs(teacher)
    with torch.no_grad():
        assert torch.equal(e(x, sigma), g.eval()(x, sigma))


def test_activation_checkpointing_replays_the_active_adapter():
    """A checkpointed block of the shared base recomputes in backward with the adapter its forward had, though
    another role ran the base in between: gradients equal the plain ones bit for bit."""
    from diffdistill.nets.checkpointing import set_activation_checkpointing
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        teacher = _teacher("mlp")
        _, (g, f) = lora_copies(teacher, ["generator", "fake_score"], LoRAOptions(rank=4, dropout=0.2), "mlp",
                                None, "cpu")
        _perturb(g)
        _perturb(f, seed=3)
        if ckpt:
            assert set_activation_checkpointing(g) == 1
        x, sigma = _inputs(teacher)
        torch.manual_seed(5)
        loss = g(x, sigma).square().sum()
        with torch.no_grad():
            f(x, sigma)                      # the fake score's pass leaves the base switched back
        loss.backward()
        grads.append([p.grad.clone() for p in g.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("arch", ["mlp", "songunet", "diffusers_unet2d"])
def test_merged_network_computes_the_adapter_function(arch):
    teacher = _teacher(arch)
    plain = copy.deepcopy(teacher)
    _, (g,) = lora_copies(teacher, ["generator"], LoRAOptions(rank=4, alpha=2.0), arch, None, "cpu")
    _perturb(g, scale=0.2)
    rec = g.lora_record()
    merged = merged_network(plain, rec, g.state_dict()).eval()
    assert not any("lora" in k for k in merged.state_dict())
    x, sigma = _inputs(teacher)
    with torch.no_grad():
        a, b = g.eval()(x, sigma), merged(x, sigma)
    assert not torch.equal(a, teacher(x, sigma))
    # Compared on the raw network's scale: an ε-network's D = x − σ·ε̂ multiplies float32 rounding by σ (up to 40).
    gain = torch.tensor([max(1.0, teacher.output_gain(float(s))) for s in sigma]).reshape(-1, *[1] * (a.ndim - 1))
    assert torch.allclose(a / gain, b / gain, rtol=1e-4, atol=1e-5), float(((a - b) / gain).abs().max())


# ------------------------------------------------------------------------------------------------ training
def _trainer(tmp_path, method, steps, lora=None, run=None, **opts):
    from diffdistill.config import validate_run
    from diffdistill.train.trainer import Trainer
    teacher, cfg = tiny_teacher(MLP_CFG)
    run = validate_run({"out": str(tmp_path), "steps": steps, "batch_size": 32, "log_every": 1, "ckpt_every": 0,
                        "sample_every": 0, "progress": False, "grad_clip": 10.0, **(run or {})})
    full = {"run": run, "data": {"name": "ring8", "n": 500, "seed": 0}, "net": cfg,
            "method": {"name": method, "lr": 1e-2, **opts}}
    if lora is not None:
        full["lora"] = lora
    return Trainer(full, teacher=teacher, teacher_path="mem")


METHOD_OPTS = {"dmd2": {"warmup_steps": 0, "dfake_gen_update_ratio": 1, "gan_weight": 0.1},
               "sid": {"ema_halflife_kimg": 0.05}, "dmd": {"warmup_steps": 0, "num_pairs": 32},
               "diff_instruct": {}, "cd": {"warmup_kimg": 0.0}}


def _record_phases(tr):
    """Log each phase's loss, and check after every phase's backward that no base parameter holds a gradient."""
    base = [p for net in tr.method.nets.values() if isinstance(net, LoRARole)
            for _, p in net.stack.base_parameters()]
    trained = {id(p) for opt in tr.method.optimizers.values() for g in opt.param_groups for p in g["params"]}
    assert not trained & {id(p) for p in base}
    seen = []
    for phase, opt in tr.method.optimizers.items():
        def hook(o, args, kwargs, phase=phase):
            assert all(p.grad is None for p in base), phase
            seen.append(phase)
        opt.register_step_pre_hook(hook)
    return seen


@pytest.mark.parametrize("method", ["dmd2", "sid", "dmd", "diff_instruct", "cd"])
def test_lora_training_trains_adapters_only(tmp_path, method):
    tr = _trainer(tmp_path, method, 3, {"rank": 4}, **METHOD_OPTS[method])
    nets = tr.method.nets
    roles = [n for n in nets.values() if isinstance(n, LoRARole)]
    assert roles and all(r.adapter for r in roles)
    base = {id(p) for _, p in roles[0].stack.base_parameters()}
    before = {k: {n: v.clone() for n, v in net.state_dict().items()} for k, net in nets.items()}
    seen = _record_phases(tr)
    tr.run()
    assert set(seen) == set(tr.method.optimizers)
    for opt in tr.method.optimizers.values():   # adapters (and a GAN head) only
        assert not {id(p) for g in opt.param_groups for p in g["params"]} & base
    for k, net in nets.items():
        assert any(not torch.equal(before[k][n], v) for n, v in net.state_dict().items()), k
    assert tr.cfg["lora"]["rank"] == 4 and json.loads((tmp_path / "config.json").read_text())["lora"]["rank"] == 4


@pytest.mark.parametrize("method", ["dmd2", "sid"])
def test_shared_base_equals_separate_copies(tmp_path, method):
    """Three iterations of the same run with the adapters on one shared base and on separate frozen copies of the
    teacher: every phase's loss and every adapter parameter after each iteration are identical (same operations in
    the same order on the same values, so exactly equal, not merely close)."""
    runs = []
    for shared in (True, False):
        tr = _trainer(tmp_path / str(shared), method, 3, {"rank": 4, "dropout": 0.1, "shared_base": shared},
                      **METHOD_OPTS[method])
        m = tr.method
        assert (m.G.stack is m.fake.stack) == shared and (m.teacher is m.G.stack.base_role) == shared
        history = []
        for _ in range(3):
            logs = tr.train_step()
            tr.step += 1
            tr.update_emas(tr.nimg)
            tr.nimg += 32
            history.append((logs, {k: [p.detach().clone() for p in net.parameters()]
                                   for k, net in m.nets.items()}))
        runs.append(history)
    for (logs_a, params_a), (logs_b, params_b) in zip(*runs):
        assert logs_a == logs_b
        for k in params_a:
            assert all(torch.equal(a, b) for a, b in zip(params_a[k], params_b[k])), k
    first, last = runs[0][0][1], runs[0][-1][1]
    assert not all(torch.equal(a, b) for a, b in zip(first["generator"], last["generator"]))   # it did train


def test_bf16_teacher_with_a_shared_base(tmp_path):
    """run.teacher_dtype=bf16 stores the one shared base in bf16; the adapters stay fp32 and train, every role
    answers in fp32."""
    from diffdistill.nets.low_precision import stored_in_bf16
    tr = _trainer(tmp_path, "dmd2", 2, {"rank": 4}, run={"teacher_dtype": "bf16"}, **METHOD_OPTS["dmd2"])
    m = tr.method
    assert tr.teacher is m.teacher and stored_in_bf16(m.teacher) and m.G.stack.base_in_bf16()
    assert {p.dtype for _, p in m.G.stack.base_parameters() if p.ndim >= 2} == {torch.bfloat16}
    assert {p.dtype for net in (m.G, m.fake) for p in net.parameters()} == {torch.float32}
    before = [p.detach().clone() for p in m.G.parameters()]
    tr.run()
    assert not all(torch.equal(a, b) for a, b in zip(before, m.G.parameters()))
    x, sigma = _inputs(m.teacher)
    with torch.no_grad():
        assert {m.G(x, sigma).dtype, m.teacher(x, sigma).dtype} == {torch.float32}


def test_unsupported_method_is_refused_in_one_line(tmp_path):
    teacher, cfg = tiny_teacher(MLP_CFG)
    from diffdistill.config import validate_run
    from diffdistill.train.trainer import Trainer
    base = {"run": validate_run({"out": str(tmp_path / "r"), "steps": 1, "batch_size": 8, "progress": False}),
            "data": {"name": "ring8", "n": 100}, "net": cfg, "lora": {"rank": 4}}
    for method in ("pd", "edm"):
        with pytest.raises(UserError, match=f"method '{method}' does not train LoRA adapters .*cd, diff_instruct, "
                                            f"dmd, dmd2, sid\\): remove the lora section"):
            Trainer({**base, "method": {"name": method}}, teacher=teacher if method == "pd" else None,
                    teacher_path="mem")
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------------ files
@pytest.fixture(scope="module")
def lora_run(ring8_teacher, tmp_path_factory):
    """A short LoRA DMD2 run of the ring8 teacher (its checkpoint file is the base), with a checkpoint at 2 and 4."""
    from diffdistill.distill import distill
    out = tmp_path_factory.mktemp("lora_run")
    run = {"out": str(out), "steps": 4, "batch_size": 64, "ckpt_every": 2, "sample_every": 0, "progress": False}
    tr = distill("dmd2", ring8_teacher.path, flags={"run": run},
                 overrides=["lora.rank=4", "method.lr=1e-2", "method.warmup_steps=0",
                            "method.dfake_gen_update_ratio=1"])
    return tr, out


def test_checkpoint_holds_adapters_only_and_resume_is_exact(lora_run, ring8_teacher, tmp_path):
    from diffdistill.distill import distill
    from diffdistill.io.checkpoint import list_checkpoints, load_checkpoint
    tr, out = lora_run
    ckpts = list_checkpoints(out / "checkpoints")
    state = load_checkpoint(ckpts[-1])
    base_keys = set(load_checkpoint(ring8_teacher.path)["sample_net"])
    for k, sd in state["method_state"]["nets"].items():
        assert all(".lora_" in n for n in sd) or k == "gan_head", k    # no copy of the base's weights
    assert not set(state["sample_net"]) & base_keys and all(".lora_" in n for n in state["sample_net"])
    assert state["lora"]["rank"] == 4 and state["lora"]["base"]["path"] == str(Path(ring8_teacher.path).resolve())
    # resume from step 2 in a copy of the run folder: ends exactly where the uninterrupted run ended
    import shutil
    split = tmp_path / "split"
    shutil.copytree(out, split)
    for p in list_checkpoints(split / "checkpoints")[1:]:
        p.unlink()
    run = {"out": str(split), "steps": 4, "batch_size": 64, "ckpt_every": 2, "sample_every": 0, "progress": False,
           "resume": "auto"}
    steps = []
    resumed = distill("dmd2", ring8_teacher.path, flags={"run": run}, on_step=lambda t: steps.append(t.step),
                      overrides=["lora.rank=4", "method.lr=1e-2", "method.warmup_steps=0",
                                 "method.dfake_gen_update_ratio=1"])
    assert steps == [3, 4]      # really resumed at step 2, not retrained from 0
    a, b = tr.method.state_dict(), resumed.method.state_dict()
    for net in a["nets"]:
        for k, v in a["nets"][net].items():
            assert torch.equal(v, b["nets"][net][k]), (net, k)
    with pytest.raises(UserError, match="resume with the same lora options"):
        distill("dmd2", ring8_teacher.path, flags={"run": {**run, "out": str(split)}},
                overrides=["lora.rank=8", "method.dfake_gen_update_ratio=1"])


def test_merge_export_reload_equals_the_adapter_forward(lora_run, tmp_path):
    from diffdistill.io import export_checkpoint, load_for_sampling
    from diffdistill.io.checkpoint import list_checkpoints
    from diffdistill.io.load import export_lora_adapter
    tr, out = lora_run
    ckpt = list_checkpoints(out / "checkpoints")[-1]
    student = tr.method.sampling_net().eval()
    x, sigma = _inputs(student, n=4)
    with torch.no_grad():
        want = student(x, sigma)
        assert not torch.equal(want, tr.method.teacher(x, sigma))
    # the checkpoint itself samples (merged with its base on load), and so does the merged export
    export_checkpoint(ckpt, tmp_path / "merged.safetensors")
    for path in (ckpt, tmp_path / "merged.safetensors"):
        net, state = load_for_sampling(path)
        assert state["lora"]["merged"] and not any("lora" in k for k in state["sample_net"])
        with torch.no_grad():
            got = net(x, sigma)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), float((got - want).abs().max())
    # the adapter alone, in peft's layout, onto a plain copy of the teacher
    info = export_lora_adapter(ckpt, tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "diffdistill_lora.json"]
    from safetensors.torch import load_file
    assert set(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))) == set(student.state_dict())
    teacher = load_for_sampling(info["lora"]["base"]["path"])[0]
    with torch.no_grad():
        got = load_adapter(teacher, tmp_path / "adapter").eval()(x, sigma)
    assert torch.equal(got, want)


def test_peft_export_of_a_diffusers_student_is_relative_to_the_unet(tmp_path):
    """A diffusers-UNet student's adapter exports with diffusers' ``unet.`` keys and an adapter_config whose targets
    are UNet module paths: peft puts it on a plain diffusers UNet, which then computes the student."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    from diffdistill.io.checkpoint import save_checkpoint
    from diffdistill.io.load import export_lora_adapter
    teacher = _teacher("diffusers_unet2d")
    plain = copy.deepcopy(teacher)
    _, (g,) = lora_copies(teacher, ["generator"], LoRAOptions(rank=4), "diffusers_unet2d", None, "cpu")
    _perturb(g, scale=0.2)
    save_checkpoint({"lora": g.lora_record(), "sample_net": g.state_dict(), "net_config": CONFIGS[
        "diffusers_unet2d"](), "role": "student", "method": "dmd2", "step": 1}, tmp_path / "c.pt")
    export_lora_adapter(tmp_path / "c.pt", tmp_path / "adapter")
    sd = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert sd and all(k.startswith("unet.") and ".lora_" in k for k in sd)
    cfg = LoraConfig.from_pretrained(str(tmp_path / "adapter"))
    unet = plain.model.unet
    inject_adapter_in_model(cfg, unet)
    res = set_peft_model_state_dict(unet, {k.removeprefix("unet."): v for k, v in sd.items()})
    assert not res.unexpected_keys
    x, sigma = _inputs(teacher)
    with torch.no_grad():
        assert torch.equal(plain(x, sigma), g.eval()(x, sigma))


def test_cli_export_and_sample_of_a_lora_checkpoint(lora_run, tmp_path):
    from diffdistill.cli import main
    from diffdistill.io.checkpoint import list_checkpoints
    _, out = lora_run
    ckpt = str(list_checkpoints(out / "checkpoints")[-1])
    assert main(["export", ckpt, str(tmp_path / "m.safetensors")]) == 0
    assert main(["sample", str(tmp_path / "m.safetensors"), "--num-samples", "8", "--out",
                 str(tmp_path / "s.npz")]) == 0
    assert main(["export", ckpt, str(tmp_path / "peft"), "--format", "peft"]) == 0
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["r"] == 4


def test_a_lora_checkpoint_without_its_base_says_so(lora_run, tmp_path):
    from diffdistill.io import load_for_sampling
    from diffdistill.io.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
    _, out = lora_run
    state = load_checkpoint(list_checkpoints(out / "checkpoints")[-1])
    state["lora"]["base"]["path"] = str(tmp_path / "gone.pt")
    save_checkpoint(state, tmp_path / "c.pt")
    with pytest.raises(UserError, match="holds the adapter only, and its base teacher .*gone.pt is not there"):
        load_for_sampling(tmp_path / "c.pt")
    other = load_checkpoint(state["teacher_path"])          # the teacher, one weight changed
    other["sample_net"] = {k: v + (k == "model.out.weight") for k, v in other["sample_net"].items()}
    save_checkpoint(other, tmp_path / "other_teacher.pt")
    state["lora"]["base"]["path"] = str(tmp_path / "other_teacher.pt")
    save_checkpoint(state, tmp_path / "d.pt")
    with pytest.raises(UserError, match="is not the base its LoRA adapter was trained on"):
        load_for_sampling(tmp_path / "d.pt")


# ------------------------------------------------------------------------------------------------ dry run
def test_dry_run_reports_the_lora_plan(ring8_teacher):
    from diffdistill.distill import distill
    from diffdistill.train.memory import dry_run_report, estimate_memory
    plans = {}
    for shared in (True, False):
        tr = distill("dmd2", ring8_teacher.path, dry_run=True, flags={"run": {"out": "/nonexistent/dry"}},
                     overrides=["lora.rank=4", f"lora.shared_base={str(shared).lower()}"])
        report, est = dry_run_report(tr), estimate_memory(tr)
        adapter = sum(p.numel() for p in tr.method.G.parameters())
        base = sum(p.numel() for _, p in tr.method.G.stack.base_parameters())
        rows = {i.name: i for i in est["networks"]}
        assert rows["generator"].params == rows["fake_score"].params == adapter
        assert "LoRA: rank 4" in report and f"generator {adapter:,d}" in report
        grads = sum(est["grads"].values())
        assert grads == 4 * (2 * adapter + sum(p.numel() for p in tr.method.head.parameters()))   # fp32 bytes
        plans[shared] = (est["weights"], base, report)
    (w_shared, base, rep_shared), (w_sep, _, rep_sep) = plans[True], plans[False]
    assert "one frozen base shared by the teacher and every adapter" in rep_shared
    assert "generator.base" in rep_sep and "fake_score.base" in rep_sep
    assert w_sep - w_shared == pytest.approx(2 * 4 * base, rel=0.01)     # two more copies of the base


# ------------------------------------------------------------------------------------------------ end to end
def test_short_lora_distillation_moves_toward_the_teacher(ring8_teacher, tmp_path):
    """SiD with rank-8 adapters on one shared base of the ring8 teacher: 40 iterations at batch 128 (lr 3e-3; ~6 s
    on one CPU thread) bring the one-step student's sliced W2 below half of where it starts, the teacher's own
    one-step output at σ_init = 2.5. Measured: 0.413 → 0.164 (teacher at 35 NFE: 0.036; 150 iterations at batch
    256 and the preset's lr 2e-4: 0.117)."""
    from diffdistill.eval.evaluate import evaluate_net
    res = ring8_teacher.distill_and_eval("sid", tmp_path, steps=40,
                                         overrides=["lora.rank=8", "run.batch_size=128", "method.lr=3e-3"])
    m = res["trainer"].method
    start = evaluate_net(m.teacher, m.sampling_spec(), ring8_teacher.data_cfg)["sliced_w2"]
    print("lora sid ring8", {"start": start, "student": res["student"], "teacher": res["teacher"]})
    assert isinstance(m.G, LoRARole) and m.G.stack is m.fake.stack
    assert res["student"] < 0.5 * start


@pytest.mark.slow
def test_lora_sid_digits_beside_the_full_weight_student(tmp_path):
    """SiD on the shipped digits teacher, 100 iterations at batch 64 (images preset otherwise): the full-weight
    student and a rank-8 LoRA student on one shared base at lr 2e-3 (LoRA takes a higher rate). Both fall far below
    the step-0 student's proxy-FID (the teacher at σ = 2.5); LoRA within 2× of the full student. Measured (one seed,
    README "LoRA students"): start 483, full 23.3, LoRA 28.3 (lr 5e-4: 43.6)."""
    from diffdistill.demo import SHIPPED_TEACHER
    from diffdistill.distill import distill
    from diffdistill.eval.evaluate import evaluate_net
    if not SHIPPED_TEACHER.exists():
        pytest.skip("no shipped teacher in this checkout")
    fid = {}
    for name, over in [("full", []), ("lora", ["lora.rank=8", "method.lr=2e-3"])]:
        tr = distill("sid", SHIPPED_TEACHER, overrides=over, flags={"run": {
            "out": str(tmp_path / name), "steps": 100, "batch_size": 64, "progress": False, "ckpt_every": 0,
            "sample_every": 0}})
        data = tr.cfg["data"]
        fid[name] = evaluate_net(tr.method.sampling_net(), tr.method.sampling_spec(), data, 2000, seed=0)["proxy_fid"]
        fid["start"] = evaluate_net(tr.method.teacher, tr.method.sampling_spec(), data, 2000, seed=0)["proxy_fid"]
    print("sid digits proxy-FID, 100 iterations:", fid)
    assert fid["full"] < 0.1 * fid["start"] and fid["lora"] < 0.1 * fid["start"]
    assert fid["lora"] < 2 * fid["full"]
