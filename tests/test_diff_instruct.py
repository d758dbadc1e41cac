"""Diff-Instruct: the IKL pseudo-loss (w(σ) = σ², no normaliser), log-normal σ, G(z) = D_G(σ_init·z; σ_init),
critic-then-generator order, EMA of G (EDM half-life rule, trainer-owned), shared dropout masks, exact resume, and
a 2-D run. The official-computation tests cite pkulwj1994/diff_instruct files and lines."""

import copy
import math

import pytest
import torch

from helpers.dm_helpers import (MLP_CFG, UNET_CFG, GaussianDenoiser, Recorder, all_none, any_nonzero,
                                assert_same_ema_method_state, make_ctx, run_full_and_resumed, tiny_teacher)
from diffdistill.errors import UserError
from diffdistill.methods.diff_instruct import DiffInstruct, DiffInstructOptions, ikl_loss
from diffdistill.train.ema import ema_beta


def _di(batch_size=16, label_dim=0, **opts):
    teacher, cfg = tiny_teacher(MLP_CFG, label_dim=label_dim)
    return DiffInstruct(make_ctx(teacher, cfg, batch_size=batch_size), **opts)


def test_ikl_gradient_is_denoiser_difference_over_batch():
    g = torch.Generator().manual_seed(0)
    B = 5
    x = torch.randn(B, 3, 2, 2, generator=g, requires_grad=True)
    dr, df = torch.randn(B, 3, 2, 2, generator=g), torch.randn(B, 3, 2, 2, generator=g)
    ikl_loss(x, dr, df).backward()
    assert torch.allclose(x.grad, (df - dr) / B, atol=1e-7)


def test_fake_equals_real_gives_zero_gradient():
    m = _di()
    m.loss("critic", None, 0)          # (not stepped: the fake score still equals the teacher)
    loss, _ = m.loss("generator", None, 0)
    loss.backward()
    for p in m.G.parameters():
        assert p.grad is None or torch.equal(p.grad, torch.zeros_like(p.grad))


def test_gaussian_closed_form():
    """Real N(μ, c²I), generator N(m, c²I): ∂L/∂x_b = (m − μ)·σ_b²/(c²+σ_b²)/B exactly; descent moves m to μ."""
    mu, m0, c, B = torch.tensor([0.3, -0.2]), torch.tensor([1.0, 0.5]), 0.4, 32
    m = _di(batch_size=B)
    m.teacher, m.fake = GaussianDenoiser(mu, c), GaussianDenoiser(m0, c)
    mean = torch.nn.Parameter(m0.clone())

    class ShiftGen(GaussianDenoiser):   # G(x; σ) = m + c·x/σ, i.e. G(σ·z) = m + c·z
        def forward(self, x, sigma, labels=None):
            return self.mean + c * x / torch.as_tensor(sigma).reshape(-1, 1)
    m.G = ShiftGen(m0, c)
    m.G.mean = mean
    state = m.ctx.generator.get_state()
    loss, _ = m.loss("generator", None, 0)
    x = m.generated
    x.retain_grad()
    loss.backward()
    m.ctx.generator.set_state(state)   # replay: z, then ln σ ~ N(−1.2, 1.2²)
    torch.randn(B, 2, generator=m.ctx.generator)
    sigma = (-1.2 + 1.2 * torch.randn(B, generator=m.ctx.generator)).exp().reshape(-1, 1)
    want = (m0 - mu) * sigma ** 2 / (c ** 2 + sigma ** 2) / B
    assert torch.allclose(x.grad, want, atol=1e-6)
    assert torch.allclose(mean.grad, want.sum(0), atol=1e-6)
    assert ((mean.detach() - 0.1 * mean.grad) - mu).norm() < (m0 - mu).norm()


def test_sigma_is_lognormal_and_generator_input_is_sigma_init():
    m = _di(batch_size=4000)
    m.fake, m.G = Recorder(m.fake), Recorder(m.G)
    state = m.ctx.generator.get_state()
    m.loss("generator", None, 0)
    g_call = m.G.calls[-1]
    assert torch.equal(g_call["sigma"], torch.ones(4000)) and g_call["grad"]
    m.ctx.generator.set_state(state)
    z = torch.randn(4000, 2, generator=m.ctx.generator)
    assert torch.equal(g_call["x"], z * 1.0)
    ls = m.fake.calls[-1]["sigma"].log()
    assert abs(float(ls.mean()) + 1.2) < 0.06 and abs(float(ls.std()) - 1.2) < 0.06
    assert m.sampling_spec() == {"sampler": "multistep", "sigmas": [1.0]}


def test_order_grad_isolation_and_optimizer():
    m = _di()
    assert m.phases(0) == ["critic", "generator"] == m.phases(3)
    for phase in ("critic", "generator"):
        opt = m.optimizers[phase]
        assert isinstance(opt, torch.optim.Adam) and not isinstance(opt, torch.optim.AdamW)
        assert opt.defaults["betas"] == (0.0, 0.999) and opt.defaults["lr"] == 1e-5
    with torch.no_grad():
        for p in m.fake.parameters():
            p.add_(0.05 * torch.randn_like(p))
    loss, _ = m.loss("critic", None, 0)
    loss.backward()
    assert all_none(m.G) and any_nonzero(m.fake)
    m.fake.zero_grad(set_to_none=True)
    loss, _ = m.loss("generator", None, 0)
    loss.backward()
    assert all_none(m.fake) and any_nonzero(m.G)


def test_ema_is_trainer_owned_with_the_official_rule():
    """The generator's EMA is tracked by the trainer (``emas['generator']``) with DI's rule: half-life 500 kimg,
    ramp-up 0.05, or a constant β; the student samples from it."""
    m = _di(batch_size=128)
    assert set(m.emas) == {"generator"} and m.emas["generator"] is m.ema and m.ema.source == "generator"
    for nimg in (128, 12_800, 10 ** 8):
        want = 0.5 ** (128 / min(5e5, 0.05 * nimg))
        assert math.isclose(m.ema.beta(128, nimg), want, rel_tol=1e-12)
    assert m.sampling_net() is m.ema.net and m.sampling_net() is not m.G
    m2 = _di(batch_size=128, ema_beta_const=0.99)
    assert m2.ema.beta(128, 10 ** 8) == 0.99
    with pytest.raises(UserError, match="ema_halflife_kimg"):
        _di(ema_halflife_kimg=None)


def test_options_defaults_are_the_official_recipe():
    """pkulwj1994/diff_instruct README.md:50 (--lr 0.00001 --glr 0.00001 --init_sigma 1.0 --batch 128),
    di_train.py:74 (--ema 0.5 Mimg), :127-128 (Adam, betas [0, 0.999], eps 1e-8), di_training_loop.py:110
    (ema_rampup_ratio 0.05)."""
    o = DiffInstructOptions()
    assert (o.lr, o.critic_lr(), o.betas, o.eps, o.sigma_init) == (1e-5, 1e-5, (0.0, 0.999), 1e-8, 1.0)
    assert (o.ema_halflife_kimg, o.ema_rampup, o.ema_beta_const) == (500.0, 0.05, None)
    assert (o.p_mean, o.p_std, o.critic_reduction) == (-1.2, 1.2, "sum")


def _dropout_di(batch_size=8):
    teacher, cfg = tiny_teacher(UNET_CFG, dropout=0.3)
    return DiffInstruct(make_ctx(teacher, cfg, batch_size=batch_size))


def test_dropout_masks_are_shared_so_fake_equal_teacher_gives_zero_gradient():
    """pkulwj1994/diff_instruct training/di_loss.py:44-50: for the generator's loss the teacher (Sd) and the fake
    score (Sg) both run in train mode, and the RNG is restored between the two calls, so they draw the same
    dropout masks; with fake == teacher (the initialisation) D_fake − D_real is exactly 0, so ∂L/∂x is 0."""
    m = _dropout_di()
    x_probe = torch.randn(4, 1, 8, 8)
    s = torch.ones(4)
    fake = m.fake.train()
    assert not torch.equal(fake(x_probe, s), fake(x_probe, s))        # dropout 0.3 is really active
    assert not m.teacher.training
    loss, _ = m.loss("generator", None, 0)
    x = m.generated
    x.retain_grad()
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x.grad))
    assert not m.teacher.training and m.fake.training                 # modes restored after the paired call


def test_teacher_runs_in_train_mode_for_the_paired_call():
    """di_loss.py:44 (``Sg.train(), Sd.train()``): the teacher's call sees train mode, the fake score's too."""
    m = _dropout_di()
    seen = []
    for name, net in (("teacher", m.teacher), ("fake", m.fake)):
        net.register_forward_pre_hook(lambda mod, args, name=name: seen.append((name, mod.training)))
    m.loss("generator", None, 0)
    assert ("teacher", True) in seen and ("fake", True) in seen


def test_fake_score_samples_are_drawn_with_the_generator_in_eval_mode():
    """pkulwj1994/diff_instruct training/di_training_loop.py:249-252: the fake score's training batch is
    G(σ_init·z) under no_grad with ``G.eval()`` (dropout off), then ``G.train()``; the generator's own loss uses
    G in train mode (Gddp, :275)."""
    m = _dropout_di()
    m.fake = Recorder(m.fake)
    state = m.ctx.generator.get_state()
    m.loss("critic", None, 0)
    m.ctx.generator.set_state(state)
    z = torch.randn((8, 1, 8, 8), generator=m.ctx.generator)
    sigma = (-1.2 + 1.2 * torch.randn(8, generator=m.ctx.generator)).exp()
    eps = torch.randn((8, 1, 8, 8), generator=m.ctx.generator)
    G_eval = copy.deepcopy(m.G).eval()
    with torch.no_grad():
        x = G_eval(z, torch.ones(8))
    (call,) = m.fake.calls
    assert torch.allclose(call["x"], x + sigma.reshape(-1, 1, 1, 1) * eps, atol=1e-6)
    assert m.G.training                                                # G is back in train mode


def test_ema_after_trainer_iterations_matches_the_official_loop(tmp_path):
    """pkulwj1994/diff_instruct training/di_training_loop.py:302-311: after both optimizer steps of an iteration,
    β = 0.5^(batch / max(min(half-life, cur_nimg·ramp-up), 1e-8)) with ``cur_nimg`` the images seen BEFORE this
    iteration (``cur_nimg += batch_size`` comes after, :314), and Gema ← G.lerp(Gema, β). The trainer's EMA after a
    few iterations equals that EMA computed from the generator's weights after each iteration."""
    from diffdistill.train.trainer import Trainer
    teacher, cfg = tiny_teacher(MLP_CFG)
    B, steps, halflife_kimg, rampup = 32, 4, 0.5, 10.0
    run = {"out": str(tmp_path), "steps": steps, "batch_size": B, "log_every": 5, "ckpt_every": 0,
           "sample_every": 0, "progress": False, "seed": 0, "device": "cpu", "grad_clip": None, "keep_ckpts": 1,
           "nan_policy": "stop", "resume": None, "num_sample_grid": 16}
    tr = Trainer({"run": run, "data": {}, "net": cfg,
                  "method": {"name": "diff_instruct", "lr": 1e-3, "ema_halflife_kimg": halflife_kimg,
                             "ema_rampup": rampup}}, teacher=teacher, teacher_path="mem")
    official = [p.detach().clone() for p in tr.method.G.parameters()]     # Gema = deepcopy(G) (:150)
    cur_nimg = 0

    def official_update(trainer):
        nonlocal cur_nimg
        h = min(halflife_kimg * 1000, cur_nimg * rampup)
        beta = 0.5 ** (B / max(h, 1e-8))
        for i, p in enumerate(trainer.method.G.parameters()):
            official[i] = p.detach().lerp(official[i], beta)
        cur_nimg += B
    tr.run(on_step=official_update)
    got = list(tr.method.ema.net.parameters())
    assert any(not torch.equal(g, p) for g, p in zip(got, tr.method.G.parameters()))   # the EMA really lags
    for g, want in zip(got, official):
        assert torch.allclose(g, want, rtol=1e-6, atol=1e-7)
    assert math.isclose(tr.method.ema.last_beta, ema_beta(B, (steps - 1) * B, halflife_kimg, rampup), rel_tol=1e-12)


def test_conditional_random_labels():
    m = _di(batch_size=6, label_dim=4)
    m.G = Recorder(m.G)
    m.loss("generator", None, 0)
    lab = m.G.calls[-1]["labels"]
    assert lab.shape == (6, 4) and torch.equal(lab.sum(1), torch.ones(6))


def test_resume_is_exact_including_ema(tmp_path):
    from diffdistill.train.trainer import Trainer

    def trainer(out, steps, resume=None):
        teacher, cfg = tiny_teacher(MLP_CFG)
        run = {"out": str(out), "steps": steps, "batch_size": 32, "log_every": 5, "ckpt_every": 0,
               "sample_every": 0, "progress": False, "seed": 0, "device": "cpu", "keep_ckpts": 3,
               "nan_policy": "stop", "grad_clip": None, "resume": resume, "num_sample_grid": 16}
        return Trainer({"run": run, "data": {}, "net": cfg, "method": {"name": "diff_instruct", "lr": 1e-3,
                                                                      "ema_halflife_kimg": 0.5}},
                       teacher=teacher, teacher_path="mem")
    full, resumed = run_full_and_resumed(trainer, tmp_path)
    assert resumed.dataset is None          # data-free: no loader was built
    a, b = full.method.state_dict(), resumed.method.state_dict()
    assert_same_ema_method_state(a, b)
    h = trainer(tmp_path / "x", 5).method.state_dict()["emas"]["generator"]
    assert any(not torch.equal(h[k], v) for k, v in b["emas"]["generator"].items())


def test_diff_instruct_ring8_end_to_end(ring8_teacher, tmp_path):
    """1-step Diff-Instruct (points preset, 400 iterations, sampled from the EMA) within 1.5× the teacher's sliced
    W2 at 35 NFE and ≥ 4× better than the teacher's own 1-step sample. Measured: teacher 0.036, untrained 0.494,
    student 0.042."""
    res = ring8_teacher.distill_and_eval("diff_instruct", tmp_path, steps=400)
    print("diff_instruct ring8", {k: v for k, v in res.items() if k != "trainer"})
    assert res["modes_covered"] == 1.0
    assert res["student"] < 1.5 * res["teacher"]
    assert res["student"] < 0.25 * res["untrained"]
