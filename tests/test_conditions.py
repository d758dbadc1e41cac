"""Conditioning on prompt embeddings (`diffusion/condition.py`): one `Condition` batch object through the
Denoiser, guidance, the data, the random draws (gradient accumulation), the methods, the sampler and the CLI.

The reference for guidance is the class-label path, itself checked against exact Gaussian-mixture posteriors
(tests/test_guidance.py): a denoiser that reads a prompt's class from its pooled vector must give, through the
Condition path, exactly what the class-conditional denoiser gives through one-hot labels (the null prompt ↔ the
all-zero label)."""

import json

import numpy as np
import pytest
import torch
from helpers.dm_helpers import MLP_CFG, flat_tensors

from diffdistill.cli import main
from diffdistill.config import validate_run
from diffdistill.data import RING8_STD, Dataset, dataset_from_config, mode_assignments, ring8_modes
from diffdistill.diffusion import condition as cond
from diffdistill.diffusion.condition import Condition, load_conditions
from diffdistill.diffusion.guidance import guided_denoise
from diffdistill.errors import UserError
from diffdistill.nets.factory import build_denoiser
from diffdistill.train.trainer import Trainer

K, L, D, P = 8, 3, 8, 4   # prompts (= ring8 modes), tokens, embedding width, pooled width


def prompt_bank(seed: int = 0) -> Condition:
    """K random prompts (the last token of odd prompts padded away) and a null prompt."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(K, L, dtype=torch.int64)
    mask[1::2, -1] = 0
    null = Condition(torch.randn(1, L, D, generator=g), torch.tensor([[1, 0, 0]]), torch.zeros(1, P))
    return Condition(torch.randn(K, L, D, generator=g), mask, torch.randn(K, P, generator=g), {}, null)


def prompt_ring8(n: int = 512) -> Dataset:
    """ring8 points, each with its mode's prompt."""
    ds = dataset_from_config({"name": "ring8", "n": n, "seed": 0})
    modes = mode_assignments(ds.x, ring8_modes(), RING8_STD, max_stds=1e9)
    return Dataset(ds.x, conditions=prompt_bank().rows(modes), kind="points", name="ring8_prompts")


PROMPT_MLP = dict(MLP_CFG, prompt_tokens=L, kwargs=dict(MLP_CFG["kwargs"], embed_dim=D, pooled_dim=P))


def prompt_teacher(seed=0):
    torch.manual_seed(seed)
    net = build_denoiser(PROMPT_MLP)
    with torch.no_grad():
        net.model.out.weight.normal_(0, 0.1)
    return net.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------ the object
def test_condition_batch_operations_keep_rows_and_the_null_prompt():
    b = prompt_bank()
    idx = torch.tensor([3, 0, 3])
    r = b.rows(idx)
    assert torch.equal(r.embeds, b.embeds[idx]) and torch.equal(r.mask, b.mask[idx]) and r.null is b.null
    j = cond.cat([b.rows([1]), b.rows([2, 5])])
    assert torch.equal(j.pooled, b.pooled[[1, 2, 5]])
    nul = b.null_batch()
    assert len(nul) == K and torch.equal(nul.embeds[4], b.null.embeds[0]) and torch.equal(nul.mask[6], b.null.mask[0])
    keep = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1])
    w = cond.drop(b, keep)
    assert torch.equal(w.embeds[1], b.null.embeds[0]) and torch.equal(w.embeds[2], b.embeds[2])
    assert torch.equal(w.mask[4], b.null.mask[0]) and torch.equal(w.pooled[0], b.pooled[0])
    back = Condition.from_state(b.state())
    assert all(torch.equal(back.state()[k], v.float() if v.is_floating_point() else v) for k, v in b.state().items())
    # labels keep EDM's rule bit for bit: labels × [keep]
    lab = torch.eye(4)
    assert torch.equal(cond.drop(lab, torch.tensor([1, 0, 1, 0])), lab * torch.tensor([[1.], [0.], [1.], [0.]]))
    assert torch.equal(cond.null_of(lab), torch.zeros(4, 4))
    e = b.with_extra(guidance=3.5)
    assert e.extra["guidance"].shape == (K,) and float(e.extra["guidance"][5]) == 3.5
    assert e.rows([2]).signature == {**b.signature, "extra.guidance": ()}


@pytest.mark.parametrize("make, match", [
    (lambda: Condition(torch.zeros(4, 8)), r"\[B, L, D\]"),
    (lambda: Condition(torch.zeros(4, 3, 8), mask=torch.ones(4, 2)), "one entry per token"),
    (lambda: Condition(torch.zeros(4, 3, 8), pooled=torch.zeros(3, 2)), "3 rows for 4"),
    (lambda: Condition(torch.zeros(2, 3, 8), null=Condition(torch.zeros(2, 3, 8))), "must be one row"),
    (lambda: Condition(torch.zeros(2, 3, 8)).null_batch(), "null_embeds"),
    (lambda: Condition.from_state({"embeds": torch.full((2, 3, 8), float("nan"))}), "NaN"),
    (lambda: Condition.from_state({"pooled": torch.zeros(2, 3)}), "needs 'embeds'"),
    (lambda: cond.cat([prompt_bank(), Condition(torch.zeros(1, 3, 8))]), "different fields"),
])
def test_bad_conditions_are_refused_with_one_line(make, match):
    with pytest.raises(UserError, match=match):
        make()


def test_a_prompt_bank_must_fit_the_teacher():
    t = prompt_teacher()
    cond.check_bank(t, prompt_bank(), "the teacher")
    with pytest.raises(UserError, match="--prompts"):
        cond.check_bank(t, None, "the teacher")
    wide = Condition(torch.zeros(2, L, D + 1), None, torch.zeros(2, P))
    with pytest.raises(UserError, match="do not fit the teacher"):
        cond.check_bank(t, wide, "the teacher")
    with pytest.raises(ValueError, match="pass a Condition"):
        t(torch.zeros(2, 2), torch.ones(2), torch.eye(2))


# ------------------------------------------------------------------------------------------------ guidance
class ClassFromPrompt(torch.nn.Module):
    """A prompt-conditioned Denoiser whose prompt is a class: the pooled vector's one-hot (null = zeros), run
    through a class-conditional net."""

    def __init__(self, net):
        super().__init__()
        self.net, self.label_dim = net, 0
        self.embedding_signature = {"embeds": (1, 2), "pooled": (net.label_dim,)}
        self.sigma_min, self.sigma_max, self.img_channels, self.img_resolution = 0.002, 80.0, 2, 0

    def forward(self, x, sigma, c):
        assert isinstance(c, Condition)
        return self.net(x, sigma, c.pooled)


def test_guidance_through_prompts_equals_guidance_through_labels():
    torch.manual_seed(0)
    net = build_denoiser(dict(MLP_CFG, label_dim=4))
    with torch.no_grad():
        net.model.out.weight.normal_(0, 0.3)
    prompt_net = ClassFromPrompt(net)
    onehot = torch.eye(4)[torch.tensor([0, 3, 1, 2, 3])]
    c = Condition(torch.randn(5, 1, 2), None, onehot, {}, Condition(torch.randn(1, 1, 2), None, torch.zeros(1, 4)))
    x, sigma = torch.randn(5, 2), torch.tensor([0.1, 0.5, 1.0, 3.0, 10.0])
    for w in (0.0, 1.0, 1.75, 3.0, -1.0):
        a = guided_denoise(prompt_net, x, sigma, c, w)
        b = guided_denoise(net, x, sigma, onehot, w)
        assert torch.allclose(a, b, atol=1e-6), w


# ------------------------------------------------------------------------------------------------ training
def _trainer(out, method, k, steps=3, batch=8, data=True, **opts):
    teacher = prompt_teacher()
    run = validate_run({"out": str(out), "steps": steps, "batch_size": batch, "log_every": 1, "ckpt_every": 0,
                        "sample_every": 0, "progress": False, "seed": 0, "grad_accum": k})
    ds = prompt_ring8(256)
    ds.x = ds.x.to(torch.get_default_dtype())
    full = {"run": run, "data": {}, "net": PROMPT_MLP, "method": {"name": method, **opts}}
    tr = Trainer(full, teacher=teacher.to(torch.get_default_dtype()), teacher_path="mem",
                 dataset=ds if data else None)
    if not data:   # a data-free method: the bank is given as --prompts would give it
        tr.method.ctx.conditions = prompt_bank().to("cpu", torch.get_default_dtype())
    tr.start_check = lambda *a, **kw: None
    return tr


@pytest.mark.parametrize("method, opts", [
    ("dmd2", {"gan_weight": 0.03, "guidance_real": 1.75}),
    ("sid", {"guidance_real": 2.0, "guidance_fake_train": 1.5}),
    ("dmd", {"num_pairs": 16, "reg_batch_size": 4, "heun_steps": 3}),
    ("cd", {}),
])
def test_accumulated_micro_batches_of_prompt_batches_equal_one_batch(tmp_path, float64, method, opts):
    """k = 2 micro-batches end on the parameters of one batch (float64), with prompts drawn, guided and
    (DMD2's GAN, CD) read from the data; the prompt rows reach the networks."""
    states = []
    for k in (1, 2):
        tr = _trainer(tmp_path / f"k{k}", method, k, **opts)
        seen = []
        hook = tr.method.nets[next(iter(tr.method.nets))].register_forward_pre_hook(
            lambda m, a: seen.append(a[2]) if len(a) > 2 else None)
        tr.run()
        hook.remove()
        assert seen and all(isinstance(c, Condition) for c in seen)
        states.append(flat_tensors(tr.method.state_dict(), "m", numbers=True))
    a, b = states
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(torch.as_tensor(a[key], dtype=torch.float64), torch.as_tensor(b[key], dtype=torch.float64),
                              rtol=1e-10, atol=1e-12), key


def test_data_free_method_needs_prompts_for_a_prompt_teacher(tmp_path):
    run = validate_run({"out": str(tmp_path), "steps": 1, "batch_size": 4, "ckpt_every": 0, "sample_every": 0,
                        "progress": False})
    with pytest.raises(UserError, match="--prompts FILE"):
        Trainer({"run": run, "data": {}, "net": PROMPT_MLP, "method": {"name": "sid"}}, teacher=prompt_teacher(),
                teacher_path="mem")


# ------------------------------------------------------------------------------------------------ CLI
def _save_data(tmp_path):
    ds = prompt_ring8(2048)
    np.savez(tmp_path / "ring8_prompts.npz", points=ds.x.numpy(),
             **{k: v.numpy() for k, v in ds.conditions.state().items()})
    np.savez(tmp_path / "prompts.npz", **{k: v.numpy() for k, v in prompt_bank().state().items()})
    return tmp_path / "ring8_prompts.npz", tmp_path / "prompts.npz"


def test_cli_trains_a_prompt_teacher_distils_it_and_samples_it_with_guidance(tmp_path, capsys):
    data, prompts = _save_data(tmp_path)
    net_sets = ["--set", "net.kwargs.embed_dim=8", "--set", "net.kwargs.pooled_dim=4", "--set", "net.prompt_tokens=3",
                "--set", "net.kwargs.hidden=32", "--set", "net.kwargs.depth=2"]
    common = ["--set", "run.ckpt_every=0", "--set", "run.sample_every=0", "--set", "run.progress=false"]
    # (with a sample grid at the end: the teacher's own samples use the data's prompts)
    assert main(["train-teacher", "--preset", "ring8", "--data", str(data), "--out", str(tmp_path / "t"),
                 "--iters", "30", "--batch-size", "64", "--set", "method.label_dropout=0.1",
                 "--set", "run.sample_every=30", "--set", "run.ckpt_every=0", "--set", "run.progress=false"]
                + net_sets) == 0
    teacher = sorted((tmp_path / "t" / "checkpoints").glob("ckpt-*.pt"))[-1]
    # a data-free student: the prompts come from --prompts
    assert main(["distill", "--method", "sid", "--teacher", str(teacher), "--out", str(tmp_path / "s"),
                 "--iters", "4", "--batch-size", "8", "--prompts", str(prompts),
                 "--set", "method.guidance_real=2"] + common) == 0
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    assert cfg["data"]["prompts"] == str(prompts.resolve())
    out = tmp_path / "x.npz"
    student = sorted((tmp_path / "s" / "checkpoints").glob("ckpt-*.pt"))[-1]
    assert main(["sample", str(student), "--out", str(out), "--num-samples", "10", "--guidance", "2"]) == 0
    z = np.load(out)
    assert z["samples"].shape == (10, 2) and z["prompt_index"].tolist() == [i % K for i in range(10)]
    # the teacher samples with prompts too; without them it says how to give them
    assert main(["sample", str(teacher), "--out", str(out), "--num-samples", "4", "--steps", "4",
                 "--prompts", str(prompts)]) == 0
    capsys.readouterr()
    assert main(["sample", str(teacher), "--out", str(out), "--num-samples", "4"]) == 2
    assert "--prompts FILE" in capsys.readouterr().err
    bad = tmp_path / "bad.npz"
    np.savez(bad, embeds=np.zeros((3, L, D + 2), np.float32))
    assert main(["sample", str(teacher), "--out", str(out), "--num-samples", "4", "--prompts", str(bad)]) == 2
    assert "do not fit this network" in capsys.readouterr().err
    # the data's own prompts serve a method that reads data (DMD2's GAN: real points with their prompts)
    assert main(["distill", "--method", "dmd2", "--teacher", str(teacher), "--out", str(tmp_path / "d"),
                 "--iters", "2", "--batch-size", "8", "--data", str(data)] + common) == 0
    # prompts for a teacher that takes none are refused
    assert main(["train-teacher", "--preset", "ring8", "--out", str(tmp_path / "u"), "--iters", "2"] + common) == 0
    plain = sorted((tmp_path / "u" / "checkpoints").glob("ckpt-*.pt"))[-1]
    capsys.readouterr()
    assert main(["distill", "--method", "sid", "--teacher", str(plain), "--out", str(tmp_path / "v"), "--iters", "1",
                 "--prompts", str(prompts)] + common) == 2
    assert "teachers conditioned on text embeddings" in capsys.readouterr().err
    assert len(load_conditions(prompts)) == K
