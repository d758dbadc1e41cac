"""Guidance as a network input (diffusion/guidance.py ``guide`` / ``for_sampling``; GuidanceOptions'
``guidance_embedded``, ``guidance_embedded_fake``, ``guidance_student``):

- an embedded-guidance teacher (FLUX.1-dev style: ``extra.guidance`` in its Condition signature) gets
  ``guidance_embedded`` written into its real-score call, with no null branch, and the loss equals the same method
  whose teacher is fed that input directly; a teacher without the input is refused;
- CFG with a per-sample scale [B] equals the loop over samples with scalar scales (float64);
- a w-conditioned student (``guidance_student``) starts as the teacher for every w (zero-initialised guidance
  embedding), is recorded as such in its checkpoint, and samples at ``--guidance W``;
- on 2-D ring8 with prompts, a w-conditioned SiD student's samples at w = 3 are tighter around the prompted mode
  than at w = 1, as the CFG-guided teacher's are;
- a tiny FLUX pipeline (guidance_embeds) distils 2 DMD2 iterations through the CLI with the embedded option.
"""

import numpy as np
import pytest
import torch
from helpers.dm_helpers import MLP_CFG, make_ctx, tiny_teacher
from test_conditions import PROMPT_MLP, K, prompt_bank, prompt_ring8, prompt_teacher

from diffdistill.cli import main
from diffdistill.config import validate_run
from diffdistill.data import ring8_modes
from diffdistill.diffusion.condition import Condition
from diffdistill.diffusion.guidance import for_sampling, guide, guided_denoise, takes_guidance
from diffdistill.errors import UserError
from diffdistill.eval.generate import generate
from diffdistill.io.load import load_for_sampling
from diffdistill.methods.diff_instruct import DiffInstruct
from diffdistill.methods.dmd2 import DMD2
from diffdistill.methods.sid import SiD
from diffdistill.nets.factory import build_denoiser
from diffdistill.train.trainer import Trainer

EMBEDDED_MLP = dict(PROMPT_MLP, kwargs=dict(PROMPT_MLP["kwargs"], guidance_embed=True))


def embedded_teacher(seed=0):
    """A teacher that takes the guidance scale as input (its guidance embedding randomised, so w matters)."""
    torch.manual_seed(seed)
    net = build_denoiser(EMBEDDED_MLP)
    with torch.no_grad():
        net.model.out.weight.normal_(0, 0.1)
        net.model.map_prompt.map_guidance.fc1.weight.normal_(0, 0.5)
    return net.eval().requires_grad_(False)


class Spy(torch.nn.Module):
    """Records each call's condition; optionally overrides its extra.guidance (the direct form of the input)."""

    def __init__(self, net, w=None):
        super().__init__()
        self.net, self.w, self.calls = net, w, []
        self.embedding_signature = net.embedding_signature
        for k in ("sigma_min", "sigma_max", "sample_shape", "label_dim", "img_channels", "img_resolution"):
            setattr(self, k, getattr(net, k))

    def forward(self, x, sigma, c):
        if self.w is not None:
            c = c.with_extra(guidance=self.w)
        self.calls.append(c)
        return self.net(x, sigma, c)


def _method(cls, teacher, bank, **opts):
    ctx = make_ctx(teacher, dict(EMBEDDED_MLP), batch_size=6)
    ctx.conditions = bank
    m = cls(ctx, **opts)
    with torch.no_grad():   # a fake score that differs from the teacher, so the generator gradient is not zero
        g = torch.Generator().manual_seed(5)
        for p in m.fake.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return m


def _gen_loss(m, state):
    m.ctx.generator.set_state(state)
    for net in m.nets.values():
        net.zero_grad(set_to_none=True)
    loss, _ = m.loss(m.generator_phase, None, 0)
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in m.G.parameters() if p.grad is not None]


METHODS = [(DMD2, {"gan_weight": 0.0}), (SiD, {}), (DiffInstruct, {})]


@pytest.mark.parametrize("cls, extra", METHODS, ids=["dmd2", "sid", "diff_instruct"])
def test_embedded_guidance_is_the_teachers_input_with_no_null_branch(cls, extra):
    w_real, w_fake = 4.0, 2.5
    bank = prompt_bank()                      # the prompts carry no extra.guidance: the option fills it
    m = _method(cls, embedded_teacher(), bank, guidance_embedded=w_real, guidance_embedded_fake=w_fake, **extra)
    assert m.ctx.conditions.extra["guidance"].eq(w_fake).all()
    spy = m.teacher = Spy(m.teacher)
    state = m.ctx.generator.get_state()
    loss, grads = _gen_loss(m, state)
    assert len(spy.calls) == 1                # one call: no null branch
    c = spy.calls[0]
    assert c.extra["guidance"].eq(w_real).all()
    assert not any(torch.equal(row, bank.null.embeds[0]) for row in c.embeds)   # no negative-prompt rows
    # the direct form: no option; the bank carries w_fake for the student / fake score, the teacher is fed w_real
    d = _method(cls, embedded_teacher(), bank.with_extra(guidance=w_fake), **extra)
    d.teacher = Spy(d.teacher, w=w_real)
    loss_d, grads_d = _gen_loss(d, state)
    assert loss == pytest.approx(loss_d, rel=1e-6)
    assert len(grads) == len(grads_d) and any(float(g.abs().max()) > 0 for g in grads)
    for a, b in zip(grads, grads_d):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-9)
    # and the input matters: another real-score scale gives another loss
    other = _method(cls, embedded_teacher(), bank, guidance_embedded=1.0, guidance_embedded_fake=w_fake, **extra)
    assert _gen_loss(other, state)[0] != pytest.approx(loss, rel=1e-4)


def test_embedded_guidance_is_refused_for_a_teacher_without_the_input():
    with pytest.raises(UserError, match="does not take the guidance scale as an input"):
        _method(SiD, prompt_teacher(), prompt_bank(), guidance_embedded=3.5)
    with pytest.raises(UserError, match="needs method.guidance_embedded"):
        _method(SiD, embedded_teacher(), prompt_bank(), guidance_embedded_fake=3.5)
    with pytest.raises(UserError, match="this network does not take the guidance scale"):
        guide(prompt_teacher(), torch.zeros(2, 2), torch.ones(2), prompt_bank().rows([0, 1]), 2.0, mode="input")
    t, cfg = tiny_teacher(MLP_CFG, label_dim=3)   # class labels: no Condition to carry w
    ctx = make_ctx(t, cfg, batch_size=4)
    with pytest.raises(UserError, match="prompt embeddings"):
        SiD(ctx, guidance_student=[1.0, 3.0])


def test_per_sample_cfg_scale_equals_the_loop_over_samples(float64):
    teacher, _ = tiny_teacher(MLP_CFG, label_dim=3)
    teacher = teacher.double()
    with torch.no_grad():
        teacher.model.map_label.weight.mul_(3)
    g = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(5, 2, generator=g), torch.tensor([0.1, 0.5, 1.0, 3.0, 10.0])
    labels = torch.eye(3)[torch.tensor([0, 2, 1, 1, 0])]
    w = torch.tensor([1.0, 0.0, 2.5, -1.0, 7.0])
    batched = guided_denoise(teacher, x, sigma, labels, w)
    loop = torch.cat([guided_denoise(teacher, x[i:i + 1], sigma[i:i + 1], labels[i:i + 1], float(w[i]))
                      for i in range(5)])
    assert torch.allclose(batched, loop, rtol=1e-12, atol=1e-13)
    # a prompt batch: the same through guide() with the batch's own per-sample w (CFG for a net without the input)
    t = prompt_teacher().double()
    c = prompt_bank().rows([0, 3, 5, 1, 7]).to(dtype=torch.float64)
    got = guide(t, x, sigma, c.with_extra(guidance=w), None)
    want = torch.cat([guided_denoise(t, x[i:i + 1], sigma[i:i + 1], c.rows([i]), float(w[i])) for i in range(5)])
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-13)
    with pytest.raises(ValueError, match="per-sample guidance scale"):
        guided_denoise(teacher, x, sigma, labels, w[:3])


@pytest.mark.parametrize("cls", [SiD, DMD2], ids=["sid", "dmd2"])
def test_w_conditioned_student_starts_as_the_teacher_for_every_w(cls):
    teacher, bank = prompt_teacher(), prompt_bank()
    m = _method(cls, teacher, bank, guidance_student=[1.0, 4.0], **({"gan_weight": 0.0} if cls is DMD2 else {}))
    assert takes_guidance(m.G) and takes_guidance(m.fake) and not takes_guidance(m.teacher)
    x, sigma, c = torch.randn(8, 2), torch.linspace(0.05, 20, 8), bank.rows(torch.arange(8))
    want = teacher(x, sigma, c)
    for w in (0.0, 1.0, 2.5, 4.0, 10.0):
        assert torch.equal(m.G(x, sigma, c.with_extra(guidance=w)), want)
    labels = m.random_labels(6)   # each sample its own w in [1, 4]
    w = labels.extra["guidance"]
    assert w.shape == (6,) and bool(((w >= 1) & (w <= 4)).all()) and len(set(w.tolist())) == 6
    # the real score is the teacher guided (CFG) with each sample's own w
    x6, s6 = torch.randn(6, 2), torch.full((6,), 0.8)
    plain = Condition(labels.embeds, labels.mask, labels.pooled, {}, labels.null)
    assert torch.allclose(m.real_score(x6, s6, labels), guided_denoise(teacher, x6, s6, plain, w), atol=1e-6)
    cfg = m.student_net_config(dict(PROMPT_MLP))
    assert cfg["kwargs"]["guidance_embed"] is True and cfg["default_guidance"] == 2.5
    with pytest.raises(UserError, match="guidance_real at 1"):
        _method(cls, teacher, bank, guidance_student=[1.0, 4.0], guidance_real=2.0)


def test_for_sampling_feeds_the_scale_to_a_net_that_takes_it():
    t, bank = embedded_teacher(), prompt_bank()
    net, c, evals = for_sampling(t, 3.0, bank)
    assert net is t and evals == 1 and c.extra["guidance"].eq(3.0).all()
    with pytest.raises(UserError, match="pass --guidance W"):
        for_sampling(t, None, bank)
    net, c, evals = for_sampling(prompt_teacher(), 3.0, bank)   # CFG: two evaluations per step
    assert evals == 2 and c is bank and net.scale == 3.0


# ------------------------------------------------------------------------------------------------ ring8 run
def _other_mode_distance(x, prompt_index):
    """Mean distance of each sample to the nearest ring8 mode its prompt does *not* name: CFG pushes samples away
    from the other prompts' modes (D_w − D_c = (w − 1)(D_c − D_∅)), so this grows with w."""
    d = torch.cdist(x.double(), ring8_modes().double())
    d[torch.arange(len(x)), torch.as_tensor(prompt_index)] = float("inf")
    return float(d.min(1).values.mean())


# a teacher (600 it.) and a SiD student (300 it.): 7 s on an idle 2-core machine
def test_w_conditioned_sid_student_follows_the_teachers_guidance_on_prompt_ring8(tmp_path):
    """A prompt ring8 teacher trained briefly (prompt dropout 0.2), then a SiD student with guidance_student [1, 3]:
    at w = 3 both the teacher (CFG, 35-NFE Heun) and the 1-step student (w as input) put their samples farther from
    the other prompts' modes than at w = 1; the student's checkpoint samples at --guidance W and records its
    guidance embedding."""
    torch.manual_seed(0)
    ds = prompt_ring8(4096)
    common = {"out": str(tmp_path / "t"), "batch_size": 256, "log_every": 1000, "ckpt_every": 0, "sample_every": 0,
              "progress": False, "seed": 0}
    net = dict(PROMPT_MLP, kwargs=dict(PROMPT_MLP["kwargs"], hidden=64, depth=2))
    tr = Trainer({"run": validate_run(dict(common, steps=600)), "data": {}, "net": net,
                  "method": {"name": "edm", "label_dropout": 0.2, "lr": 3e-3}}, dataset=ds)
    tr.start_check = lambda *a, **kw: None
    tr.run()
    teacher = tr.method.sampling_net().eval().requires_grad_(False)
    bank = prompt_bank()
    prompts = tmp_path / "prompts.npz"
    np.savez(prompts, **{k: v.numpy() for k, v in bank.state().items()})
    seeds = range(1024)
    dist = {}
    for w in (1.0, 3.0):
        x, _, info = generate(teacher, seeds, {"sampler": "heun", "nfe": 35, "guidance": w}, conditions=bank)
        dist["teacher", w] = _other_mode_distance(x, info["prompt_index"])
    assert dist["teacher", 3.0] > dist["teacher", 1.0] + 0.03
    st = Trainer({"run": validate_run(dict(common, out=str(tmp_path / "s"), steps=300, batch_size=128,
                                           ckpt_every=300)),
                  "data": {"prompts": str(prompts)}, "net": net,
                  "method": {"name": "sid", "guidance_student": [1.0, 3.0], "lr": 1e-3}},
                 teacher=teacher, teacher_path="mem")
    st.start_check = lambda *a, **kw: None
    st.run()
    student = st.method.sampling_net().eval()
    spec = st.method.sampling_spec()
    for w in (1.0, 3.0):
        x, _, info = generate(student, seeds, dict(spec, guidance=w), conditions=bank)
        assert info["nfe"] == 1
        dist["student", w] = _other_mode_distance(x, info["prompt_index"])
    print({f"{k[0]} w={k[1]:g}": round(v, 4) for k, v in dist.items()})
    assert dist["student", 3.0] > dist["student", 1.0] + 0.03
    # the checkpoint: a w-conditioned net with its default w, sampled with --guidance through the CLI
    ckpt = sorted((tmp_path / "s" / "checkpoints").glob("ckpt-*.pt"))[-1]
    loaded, state = load_for_sampling(ckpt)
    assert takes_guidance(loaded) and loaded.default_guidance == 2.0
    assert state["net_config"]["kwargs"]["guidance_embed"] is True
    out = tmp_path / "x.npz"
    assert main(["sample", str(ckpt), "--out", str(out), "--num-samples", "16", "--guidance", "3",
                 "--prompts", str(prompts)]) == 0
    x3 = torch.as_tensor(np.load(out)["samples"])
    want, _, _ = generate(loaded, range(16), dict(spec, guidance=3.0), conditions=bank)
    assert torch.allclose(x3, want, atol=1e-6)


# ------------------------------------------------------------------------------------------------ FLUX (CLI)
@pytest.mark.slow   # builds and encodes with two tiny pipelines (FLUX, SD): ~1 minute on a 2-core machine
def test_tiny_flux_distils_with_embedded_guidance_through_the_cli(tmp_path, capsys):
    from helpers.tiny_pipelines import build
    root = tmp_path / "flux"
    build("flux", root)
    (tmp_path / "p.txt").write_text("a red square\na blue circle\n")
    prompts = tmp_path / "p.safetensors"
    assert main(["encode-prompts", str(root), "--prompts", str(tmp_path / "p.txt"), "--out", str(prompts)]) == 0
    run = tmp_path / "dmd2"
    base = ["distill", "--method", "dmd2", "--teacher", str(root), "--prompts", str(prompts), "--iters", "2",
            "--batch-size", "2", "--no-progress", "--sample-shape", "4,8,8", "--set", "method.gan_weight=0",
            "--set", "run.ckpt_every=2",
            "--set", "run.sample_every=0", "--set", "net.sigma_data=0.5"]
    assert main(base + ["--out", str(run), "--set", "method.guidance_embedded=4.5",
                        "--set", "method.guidance_embedded_fake=3"]) == 0
    ckpt = max((run / "checkpoints").glob("ckpt-*.pt"))
    net, state = load_for_sampling(ckpt)
    assert takes_guidance(net) and state["net_config"]["default_guidance"] == 3.0 and net.sample_shape == (4, 8, 8)
    out = tmp_path / "s.npz"
    assert main(["sample", str(ckpt), "--num-samples", "2", "--out", str(out), "--guidance", "3"]) == 0
    # a teacher without the guidance input refuses the option in one line
    sd = tmp_path / "sd"
    build("sd", sd)
    (tmp_path / "q.txt").write_text("a cat\n")
    assert main(["encode-prompts", str(sd), "--prompts", str(tmp_path / "q.txt"), "--out",
                 str(tmp_path / "q.safetensors")]) == 0
    capsys.readouterr()
    assert main(["distill", "--method", "dmd2", "--teacher", str(sd), "--prompts", str(tmp_path / "q.safetensors"),
                 "--iters", "1", "--batch-size", "2", "--no-progress", "--sample-shape", "4,8,8",
                 "--out", str(tmp_path / "x"),
                 "--set", "method.gan_weight=0", "--set", "method.guidance_embedded=3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not take the guidance scale as an input" in err


def test_condition_with_per_sample_extra_survives_the_batch_operations():
    c = prompt_bank().with_extra(guidance=torch.arange(K, dtype=torch.float32))
    assert torch.equal(c.rows([3, 1]).extra["guidance"], torch.tensor([3.0, 1.0]))
    assert torch.equal(c.null_batch().extra["guidance"], c.extra["guidance"])   # null rows keep each row's w
    assert isinstance(Condition.cat([c, c]), Condition)
