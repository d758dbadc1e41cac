"""The --dry-run memory plan on the meta device (networks built without memory, planned from shapes) and the
optimizer-step temporaries it counts (benchmarks/dry_run_vs_rss.py measures the plan against real runs)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffdistill.distill import distill
from diffdistill.errors import UserError
from diffdistill.nets.factory import build_denoiser
from diffdistill.nets.saved_tensors import MetaForward, count_saved
from diffdistill.nets.songunet import digits_unet_config
from diffdistill.train.memory import (
    _step_temporaries,
    estimate_memory,
    module_memory_plan,
    peak_at,
)

DIGITS_NET = {"arch": "songunet", "img_channels": 1, "img_resolution": 8, "label_dim": 0, "sigma_data": 0.5,
              "kwargs": {k: v for k, v in digits_unet_config().items()
                         if k not in ("img_resolution", "in_channels", "out_channels")}}


MLP_NET = {"arch": "mlp", "img_channels": 2, "img_resolution": 0, "label_dim": 0, "sigma_data": 0.5,
           "kwargs": {"hidden": 64, "depth": 3}}


def _teacher(device: str):
    """A random ring8 MLP teacher (the same shapes on cpu and meta) and its record."""
    torch.manual_seed(0)
    with torch.device(device):
        net = build_denoiser(MLP_NET)
    return net, {"net_config": MLP_NET, "config": {"data": {"name": "ring8", "n": 512}}}


def _plan(device: str, method: str = "dmd2", **run):
    tr = distill(method, "random-teacher", teacher=_teacher(device), dry_run=True,
                 flags={"run": {"out": "/nonexistent/plan", "device": device, "batch_size": 24, **run}})
    return tr, estimate_memory(tr, target="cpu")


@pytest.mark.parametrize("method,run", [("dmd2", {}), ("sid", {"activation_checkpointing": ["generator"]})])
def test_the_plan_on_meta_equals_the_plan_on_cpu(method, run):
    """Weights, optimizer state, gradients, data and the step's temporaries are equal; activations, measured by
    running each phase's forward on meta tensors, equal the CPU's to the byte (a 1 % tolerance is allowed)."""
    _, cpu = _plan("cpu", method, **run)
    meta_tr, meta = _plan("meta", method, **run)
    assert all(p.is_meta for p in meta_tr.method.nets["generator"].parameters())
    assert not meta["errors"] and not cpu["errors"], (meta["errors"], cpu["errors"])
    for key in ("weights", "optimizer_state", "grads", "loose_bytes", "step_temporaries", "worst_phase"):
        assert meta[key] == cpu[key], (key, meta[key], cpu[key])
    assert [(i.name, i.params, i.bytes, i.phases) for i in meta["networks"]] == \
        [(i.name, i.params, i.bytes, i.phases) for i in cpu["networks"]]
    for ph, b in cpu["activations"].items():
        assert b > 0 and abs(meta["activations"][ph] - b) <= 0.01 * b, (ph, meta["activations"][ph], b)
    if run:
        assert all(meta["recomputed"][ph] == cpu["recomputed"][ph] for ph in cpu["recomputed"])
        assert cpu["recomputed"]["generator"] > 0
    assert abs(meta["peak"] - cpu["peak"]) <= 0.01 * cpu["peak"]


def test_meta_is_for_dry_runs_and_refuses_bf16_autocast():
    with pytest.raises(UserError, match="meta.*--dry-run"):
        distill("dmd2", "random-teacher", teacher=_teacher("meta"), flags={"run": {"out": "/nonexistent/p",
                                                                                    "device": "meta"}})
    with pytest.raises(UserError, match="run.teacher_dtype=bf16 cannot be planned on the meta device"):
        _plan("meta", teacher_dtype="bf16")


def test_meta_forward_reads_placeholders_and_counts_attention_as_a_fused_kernel():
    x = torch.randn(3, device="meta")
    with MetaForward():
        assert (float(x.sum()), x.sum().item(), bool(x.sum() > 0), int(x.sum())) == (1.0, 1.0, True, 1)
    # attention: the same tensors saved on meta as on the CPU's fused kernel (the math path would save the
    # 256×256 attention matrix of every head); head dims that differ take the math path on both
    for v_dim in (32, 16):
        saved = {}
        for device in ("cpu", "meta"):
            q, k = (torch.randn(2, 4, 256, 32, device=device, requires_grad=True) for _ in range(2))
            v = torch.randn(2, 4, 256, v_dim, device=device, requires_grad=True)
            with MetaForward(), count_saved([q, k, v]) as seen:
                F.scaled_dot_product_attention(q, k, v)
            saved[device] = sum(seen.values())
        assert saved["meta"] == saved["cpu"] > 0, (v_dim, saved)
        assert (saved["cpu"] < 2 * 4 * 256 * 256 * 4) == (v_dim == 32)


def test_module_memory_plan_is_the_same_on_meta():
    plans = {}
    for device in ("cpu", "meta"):
        torch.manual_seed(0)
        with torch.device(device):
            net = build_denoiser(DIGITS_NET).train()
            inputs = [(torch.randn(b, 1, 8, 8), torch.ones(b)) for b in (1, 3)]
        plans[device] = module_memory_plan(net, inputs)
    assert plans["meta"] == plans["cpu"]
    assert plans["cpu"]["params"] == sum(p.numel() for p in net.parameters())
    b1, b3 = plans["cpu"]["saved"]
    assert 0 < b1 < b3 <= 3 * b1


def _allocated_during(fn) -> int:
    """Peak of torch's CPU allocated bytes during ``fn()`` above what was allocated before (profiler trace)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    total = peak = 0
    for _, n in sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                       if e.name() == "[memory]"):
        total += n
        peak = max(peak, total)
    return peak


@pytest.mark.parametrize("make,foreach", [
    (lambda ps: torch.optim.AdamW(ps, lr=1e-3), True),
    (lambda ps: torch.optim.AdamW(ps, lr=1e-3), False),
    (lambda ps: torch.optim.Adam(ps, lr=1e-3, weight_decay=0.1), False),
    (lambda ps: torch.optim.Adam(ps, lr=1e-3, weight_decay=0.1), True),
])
def test_step_temporaries_are_what_adams_step_allocates(make, foreach):
    """The plan's optimizer-step temporaries equal the peak of what torch's Adam step allocates beyond its state
    (foreach: sqrt(v) of the whole group at once, as on CUDA; the for-loop path: per parameter)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(256, 512), nn.Linear(512, 128), nn.Linear(128, 64))
    opt = make(net.parameters())
    opt.defaults["foreach"] = None
    for g in opt.param_groups:
        g["foreach"] = foreach
    for _ in range(2):   # the state exists after the first step
        net(torch.randn(8, 256)).square().mean().backward()
        opt.step()
    measured = _allocated_during(opt.step)
    planned = _step_temporaries(opt, lambda p: p.numel() * p.element_size(), foreach_default=foreach)
    assert planned <= measured <= planned + 256, (planned, measured)   # + the step counters' scalars


def test_the_peak_counts_the_step_when_it_outgrows_the_activations():
    """With torch's foreach step (CUDA's default) at a small batch the step's temporaries, one copy of the trained
    parameters, exceed the activations, and the phase's peak is its gradients plus those."""
    tr = distill("dmd2", "random-teacher", teacher=_teacher("meta"), dry_run=True,
                 flags={"run": {"out": "/nonexistent/plan", "device": "meta", "batch_size": 1}})
    cuda = estimate_memory(tr)   # a meta plan is for CUDA unless told otherwise
    assert cuda["target"] == "cuda"
    for ph, grads in cuda["grads"].items():
        assert cuda["step_temporaries"][ph] == grads   # one group per optimizer, fp32: a copy of its parameters
    ph = cuda["worst_phase"]
    base = cuda["weights"] + cuda["optimizer_state"] + cuda["loose_bytes"]
    assert cuda["step_temporaries"][ph] > cuda["activations"][ph]
    assert cuda["peak"] == base + cuda["grads"][ph] + cuda["step_temporaries"][ph]
    size = lambda p: p.numel() * p.element_size()
    loop = _step_temporaries(tr.method.optimizers[ph], size, foreach_default=False)   # the CPU's for-loop step
    assert 0 < loop < cuda["step_temporaries"][ph]


def test_a_run_keeps_no_second_copy_of_the_teachers_weights(tmp_path, monkeypatch):
    """The loaded checkpoint (a train-teacher .pt: network, EMA copy and Adam's moments) is dropped once the
    teacher network is built from it; it used to stay alive through the whole run — 4× the teacher's weights the
    plan did not count (found by benchmarks/dry_run_vs_rss.py)."""
    import gc
    import sys
    import weakref

    from helpers.kill_resume import make_teacher
    distill_module = sys.modules["diffdistill.distill"]   # (the package exports the function under that name)
    path = make_teacher(tmp_path / "t", steps=2)
    loaded = []
    real = distill_module.load_teacher

    def spy(*a, **k):
        net, state = real(*a, **k)
        loaded.extend(weakref.ref(t) for t in _all_tensors(state) if t.is_floating_point())   # (not RNG states)
        return net, state
    monkeypatch.setattr(distill_module, "load_teacher", spy)
    alive = []

    def during_the_run(trainer):
        gc.collect()
        alive.extend(tuple(r().shape) for r in loaded if r() is not None)
    distill("dmd2", path, on_step=during_the_run, flags={"run": {
        "out": str(tmp_path / "d"), "batch_size": 8, "steps": 1, "ckpt_every": 0, "sample_every": 0,
        "progress": False}})
    assert len(loaded) > 10
    assert not alive, alive


def _all_tensors(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _all_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _all_tensors(v)


def test_a_diffusers_unet2dcondition_measures_the_same_on_meta():
    """The meta measurement that plans SD-sized UNets (benchmarks/dry_run_vs_rss.py) equals the CPU's on the same
    architecture at a tiny width: cross-attention through scaled_dot_product_attention, GEGLU, group norms, and
    with diffusers' blocks checkpointed."""
    diffusers = pytest.importorskip("diffusers")
    from diffdistill.nets.checkpointing import set_activation_checkpointing
    cfg = {"sample_size": 16, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
           "block_out_channels": [32, 64], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
           "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 32,
           "attention_head_dim": 8, "norm_num_groups": 8}
    for ckpt in (False, True):
        plans = {}
        for device in ("cpu", "meta"):
            torch.manual_seed(0)
            with torch.device(device):
                net = diffusers.UNet2DConditionModel(**cfg).train()
                inputs = [{"sample": torch.randn(b, 4, 16, 16), "timestep": torch.full((b,), 500.0),
                           "encoder_hidden_states": torch.randn(b, 7, 32)} for b in (1, 2)]
            if ckpt:
                set_activation_checkpointing(net, True)
            plans[device] = module_memory_plan(net, inputs)
        assert plans["meta"] == plans["cpu"], (ckpt, plans)
        assert (plans["cpu"]["recomputed"][0] > 0) == ckpt


def test_peak_at_moves_the_plan_along_its_activation_line():
    """`peak_at` (the dry run's "each further sample adds …" line and benchmarks/memory_table.py's batch-8 column)
    at the plan's own batch is its peak, and at twice the batch equals a plan made there."""
    _, at24 = _plan("cpu", "sid")
    _, at48 = _plan("cpu", "sid", batch_size=48)
    assert peak_at(at24, 24) == at24["peak"]
    assert all(v > 0 for v in at24["activations_per_sample"].values())
    assert abs(peak_at(at24, 48) - at48["peak"]) <= 0.01 * at48["peak"], (peak_at(at24, 48), at48["peak"])


def test_a_diffusers_folder_without_weights_plans_on_meta_as_with_them(tmp_path):
    """On the meta device a diffusers folder is built from its config.json alone (a user plans a model before
    downloading its weights): the plan equals the one of the same folder with weights, planned on the CPU; without
    --device meta the missing weights are a clear error."""
    import shutil

    import numpy as np
    from helpers.tiny_pipelines import build

    from diffdistill.io.load import load_for_sampling
    from diffdistill.nets.diffusers_cond import example_condition
    build("sd", tmp_path / "full")
    shutil.copytree(tmp_path / "full", tmp_path / "configs")
    for f in (tmp_path / "configs").rglob("*"):
        if f.suffix in (".safetensors", ".bin"):
            f.unlink()
    net, _ = load_for_sampling(tmp_path / "full")
    cond = example_condition(net, 6, torch.Generator().manual_seed(0), length=5)
    np.savez(tmp_path / "data.npz", latents=np.random.default_rng(0).standard_normal((6, *net.sample_shape)),
             embeds=cond.embeds.numpy())
    plans = {}
    for folder, device in (("full", "cpu"), ("configs", "meta")):
        tr = distill("dmd2", str(tmp_path / folder), dry_run=True, overrides=["net.sigma_data=1.0"],
                     flags={"run": {"out": "/nonexistent/plan", "device": device, "batch_size": 4},
                            "data": {"path": str(tmp_path / "data.npz")}})
        plans[device] = estimate_memory(tr, target="cpu")
        assert not plans[device]["errors"], plans[device]["errors"]
    cpu, meta = plans["cpu"], plans["meta"]
    assert [(i.name, i.params) for i in meta["networks"]] == [(i.name, i.params) for i in cpu["networks"]]
    for key in ("weights", "optimizer_state", "grads", "step_temporaries", "worst_phase"):
        assert meta[key] == cpu[key], key
    assert abs(meta["peak"] - cpu["peak"]) <= 0.02 * cpu["peak"], (meta["peak"], cpu["peak"])
    with pytest.raises(UserError, match="cannot load the UNet2DConditionModel"):
        load_for_sampling(tmp_path / "configs")
