"""SiD (Zhou et al. 2024, "Score identity Distillation"): the generator loss against a direct transcription of
official mingyuanzhou/SiD training/sid_loss.py:55 with sid_training_loop.py:332, its oracles (f_ψ = f_φ ⇒ zero,
w detached, gradient through the nets' inputs, σ schedule), the official option defaults, the fake-score loss, G(z) = D_teacher(2.5z; 2.5) at step 0, the 1-D Gaussian direction
oracle, data-free training with exact resume, and a ring8 end-to-end run against the teacher's sliced W2."""

import json
import math

import pytest
import torch
from torch import nn

from helpers.dm_helpers import MLP_CFG, UNET_CFG, Recorder, all_none, any_nonzero, make_ctx, run_full_and_resumed, tiny_teacher
from diffdistill.methods.score_distill import fake_score_loss
from diffdistill.methods.sid import (SiD, nan_to_num_grad, sample_sid_sigma, sid_fake_score_loss,
                                     sid_generator_loss, sid_sigma, sid_weight)
from diffdistill.diffusion.losses import edm_loss

ALPHAS = (0.0, 1.0, 1.2)


def _sid(cfg=MLP_CFG, batch_size=16, label_dim=0, **opts):
    teacher, cfg = tiny_teacher(cfg, label_dim=label_dim)
    return SiD(make_ctx(teacher, cfg, batch_size=batch_size), **opts)


def _perturb(net, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def _grads(module):
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in module.parameters()]


def _generator_grads(m, state):
    """∇_θ L_G of one generator phase from RNG state ``state`` (the same z, t and n for every call)."""
    m.ctx.generator.set_state(state)
    m.G.zero_grad(set_to_none=True)
    loss, _ = m.loss("generator", None, 0)
    loss.backward()
    return loss.detach(), _grads(m.G)


# ------------------------------------------------------------------------------------------------ loss formula
def _direct_forms(x, d_real, d_fake, alpha):
    """The loss's two written forms (the official line, and the paper's (1 − α)‖Δ‖² + Δᵀ(f_ψ − x) form),
    transcribed independently of the implementation:
    A = Σ_pix Δ⊙[(f_φ − x) − αΔ]/w, B = [(1−α)‖Δ‖² + Δᵀ(f_ψ − x)]/w; each summed over the batch, × 100 / B."""
    B = x.shape[0]
    w = torch.stack([(x[b] - d_real[b]).abs().mean() for b in range(B)]).clamp(min=1e-5)
    total_a = total_b = 0.0
    for b in range(B):
        delta = (d_real[b] - d_fake[b]).reshape(-1)
        fr, ff, xb = d_real[b].reshape(-1), d_fake[b].reshape(-1), x[b].reshape(-1)
        total_a = total_a + torch.dot(delta, (fr - xb) - alpha * delta) / w[b]
        total_b = total_b + ((1 - alpha) * torch.dot(delta, delta) + torch.dot(delta, ff - xb)) / w[b]
    return total_a * 100 / B, total_b * 100 / B


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_generator_loss_equals_both_written_forms(dtype, tol):
    g = torch.Generator().manual_seed(0)
    x, d_real, d_fake = (torch.randn(5, 3, 4, 4, generator=g, dtype=dtype) for _ in range(3))
    for alpha in ALPHAS:
        a, b = _direct_forms(x, d_real, d_fake, alpha)
        got = sid_generator_loss(x, d_real, d_fake, alpha)
        scale = max(1.0, abs(float(a)))
        assert abs(float(a) - float(b)) <= tol * scale
        assert abs(float(got) - float(a)) <= tol * scale, (alpha, float(got), float(a))
    # α = 1 leaves Δᵀ(f_ψ − x)/w; α = 0 leaves Δᵀ(f_φ − x)/w
    w = sid_weight(x, d_real).reshape(-1, 1, 1, 1)
    delta = d_real - d_fake
    for alpha, other in ((1.0, d_fake), (0.0, d_real)):
        want = (delta * (other - x) / w).sum() * 100 / len(x)
        assert abs(float(sid_generator_loss(x, d_real, d_fake, alpha)) - float(want)) <= tol * max(1.0, abs(float(want)))


def test_weight_clip_nan_drop_and_flat_inputs():
    x = torch.zeros(3, 2)
    d_real, d_fake = x.clone(), torch.ones(3, 2)
    assert torch.equal(sid_weight(x, d_real), torch.full((3,), 1e-5))
    # a NaN sample is dropped; the batch size in the 100/B factor stays 3
    g = torch.Generator().manual_seed(0)
    x, d_real, d_fake = (torch.randn(3, 2, generator=g) for _ in range(3))
    d_nan = d_fake.clone()
    d_nan[1, 0] = float("nan")
    got = sid_generator_loss(x, d_real, d_nan, 1.2)
    keep = torch.tensor([0, 2])
    want = sid_generator_loss(x[keep], d_real[keep], d_fake[keep], 1.2) * 2 / 3
    assert torch.isfinite(got) and torch.allclose(got, want, atol=1e-6)
    # the fake-score loss drops NaN samples the same way (sum over the rest, / full B)
    teacher, _ = tiny_teacher(MLP_CFG)
    sigma, n = torch.tensor([0.5, 1.0, 2.0]), torch.randn(3, 2, generator=g)
    x_nan = x.clone()
    x_nan[1, 1] = float("nan")
    got = sid_fake_score_loss(teacher, x_nan, sigma, n)
    want = edm_loss(teacher, x[keep], sigma[keep], n[keep]).sum() / 3
    assert torch.isfinite(got) and torch.allclose(got, want, rtol=1e-6)


def test_gradient_guard_is_nan_to_num():
    m = _sid()
    p = next(m.G.parameters())
    (p * torch.tensor(float("nan"))).sum().backward()
    assert torch.equal(p.grad, torch.zeros_like(p))
    p.grad = None
    (p * torch.tensor(float("inf"))).sum().backward()
    assert torch.equal(p.grad, torch.full_like(p, 1e5))
    q = next(m.fake.parameters())
    (q * torch.tensor(float("-inf"))).sum().backward()
    assert torch.equal(q.grad, torch.full_like(q, -1e5))
    assert torch.equal(nan_to_num_grad(torch.tensor([1.5, float("nan")])), torch.tensor([1.5, 0.0]))
    # the EMA copy carries no hooks: it is never trained
    assert all(not p.requires_grad for p in m.ema.net.parameters())


# ------------------------------------------------------------------------------------------------ oracles
@pytest.mark.parametrize("cfg", [MLP_CFG, UNET_CFG], ids=["mlp", "unet"])
def test_fake_equal_to_teacher_gives_exactly_zero_loss_and_grad(cfg):
    for alpha in (0.0, 0.5, 1.0, 1.2):
        m = _sid(cfg, batch_size=8, alpha=alpha)
        loss, _ = m.loss("generator", None, 0)
        assert float(loss.detach()) == 0.0
        loss.backward()
        assert all(p.grad is None or torch.equal(p.grad, torch.zeros_like(p)) for p in m.G.parameters())


def test_fake_score_loss_is_edm_loss_on_generated_samples():
    m = _sid(batch_size=32)
    _perturb(m.G)
    state = m.ctx.generator.get_state()
    loss, logs = m.loss("critic", None, 0)
    g = m.ctx.generator
    g.set_state(state)                                   # replay: z, ln σ ~ N(−1.2, 1.2²), n
    z = torch.randn(32, 2, generator=g)
    with torch.no_grad():
        x = m.G.eval()(2.5 * z, torch.full((32,), 2.5))
    m.G.train()
    sigma = (-1.2 + 1.2 * torch.randn(32, generator=g)).exp()
    n = torch.randn(32, 2, generator=g)
    want = edm_loss(m.fake, x, sigma, n).mean()          # Σ_pix λ(σ)(f_ψ(x + σn) − x)², mean over the batch
    assert torch.allclose(loss, want, rtol=1e-6)
    assert torch.allclose(loss, fake_score_loss(m.fake, x, sigma, n, reduction="sum"), rtol=1e-6)
    assert logs["sid/fake_score"] == pytest.approx(float(loss.detach()))


def test_sigma_schedule():
    from scipy.stats import kstest
    s_hi = float(sid_sigma(torch.tensor(0.8)))
    assert s_hi == pytest.approx(24.408, abs=1e-3)
    assert torch.equal(sid_sigma(torch.zeros(4)), torch.full((4,), 0.002))
    assert float(sid_sigma(torch.tensor(1.0))) == pytest.approx(80.0, rel=1e-6)
    sig = sample_sid_sigma(50_000, torch.Generator().manual_seed(0))
    assert sig.dtype == torch.float32 and float(sig.min()) >= 0.002 and float(sig.max()) <= s_hi
    lo, hi = 0.002 ** (1 / 7), s_hi ** (1 / 7)
    u = ((sig.double() ** (1 / 7) - lo) / (hi - lo)).numpy()
    assert kstest(u, "uniform").pvalue > 0.01
    assert kstest(sig.double().log().numpy(), "uniform").pvalue < 1e-6   # (a wrong law is rejected)
    # the generator phase feeds exactly these σ's, and x_t = x_g + σn, to both nets
    m = _sid(batch_size=8)
    m.teacher, m.fake = Recorder(m.teacher), Recorder(m.fake)
    state = m.ctx.generator.get_state()
    m.loss("generator", None, 0)
    g = m.ctx.generator
    g.set_state(state)
    torch.randn(8, 2, generator=g)                       # z
    want = sample_sid_sigma(8, g)
    n = torch.randn(8, 2, generator=g)
    for rec in (m.teacher, m.fake):
        call = rec.calls[-1]
        assert torch.equal(call["sigma"], want) and call["grad"]
        assert torch.allclose(call["x"], m.generated.detach() + want[:, None] * n, atol=1e-6)


def test_weight_is_detached():
    """∇_θ L_G with the built-in w equals ∇_θ L_G with w replaced by a constant tensor of the same value (and
    differs from a w that keeps its graph)."""
    m = _sid(batch_size=16)
    _perturb(m.fake, scale=0.5)                          # Δ large enough that a live w would matter
    theta = nn.Parameter(torch.tensor([1.3, -0.4]))
    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(3))
    sigma = sample_sid_sigma(16, torch.Generator().manual_seed(4))
    n = torch.randn(16, 2, generator=torch.Generator().manual_seed(5))

    def grad(weight_fn=None, live_w=False):
        theta.grad = None
        x = m.G(2.5 * z * theta, torch.full((16,), 2.5))
        x_t = x + sigma[:, None] * n
        d_real, d_fake, _ = m.denoise_pair(x_t, sigma)
        if live_w:      # the same formula with a w that keeps its graph (written out: the loss detaches any w)
            delta = d_real - d_fake
            w = (x - d_real).abs().mean(1).clamp(min=1e-5)
            loss = ((delta * ((d_real - x) - 1.2 * delta)).sum(1) / w).sum() * 100 / 16
        else:
            loss = sid_generator_loss(x, d_real, d_fake, 1.2, weight=weight_fn(x, d_real) if weight_fn else None)
        loss.backward()
        return theta.grad.clone()

    w_const = {}

    def const(x, d_real):
        w_const.setdefault("w", sid_weight(x, d_real).clone())
        return w_const["w"]
    const(*_forward_once(m, theta, z, sigma, n))
    g_builtin = grad()
    g_const = grad(const)
    g_live = grad(live_w=True)
    assert torch.equal(g_builtin, g_const)
    assert not torch.allclose(g_builtin, g_live, rtol=1e-2)     # a w with a graph would change it


def _forward_once(m, theta, z, sigma, n):
    with torch.no_grad():
        x = m.G(2.5 * z * theta, torch.full((len(z),), 2.5))
        return x, m.teacher(x + sigma[:, None] * n, sigma)


class _Detached(nn.Module):
    """A denoiser whose output carries no graph (to show that SiD's gradient goes through the nets' inputs)."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        for k in ("img_channels", "img_resolution", "label_dim", "sigma_min", "sigma_max", "sigma_data"):
            setattr(self, k, getattr(net, k))

    def forward(self, x, sigma, labels=None):
        return self.net(x, sigma, labels).detach()


def test_gradient_reaches_generator_through_both_nets_inputs():
    m = _sid(batch_size=32)
    _perturb(m.fake)
    state = m.ctx.generator.get_state()
    _, g_full = _generator_grads(m, state)
    teacher, fake = m.teacher, m.fake
    m.teacher, m.fake = _Detached(teacher), _Detached(fake)
    _, g_det = _generator_grads(m, state)
    m.teacher, m.fake = teacher, fake
    diff = sum(float((a - b).abs().sum()) for a, b in zip(g_full, g_det))
    assert diff > 1e-3 * sum(float(a.abs().sum()) for a in g_full)
    # and the nets themselves received nothing
    assert all_none(m.teacher) and all_none(m.fake)


def test_phases_grad_isolation_and_optimizers():
    m = _sid()
    assert m.phases(0) == ["critic", "generator"] == m.phases(7)
    for phase in ("critic", "generator"):
        opt = m.optimizers[phase]
        assert type(opt) is torch.optim.Adam
        assert opt.defaults["betas"] == (0.0, 0.999) and opt.defaults["lr"] == 1e-5 and opt.defaults["eps"] == 1e-8
    assert {id(p) for p in m.trainable_params("critic")} == {id(p) for p in m.fake.parameters()}
    assert {id(p) for p in m.trainable_params("generator")} == {id(p) for p in m.G.parameters()}
    _perturb(m.fake)
    _perturb(m.G, seed=2)
    loss, _ = m.loss("critic", None, 0)                  # L_ψ gives no gradient to G
    loss.backward()
    assert all_none(m.G) and any_nonzero(m.fake) and all_none(m.teacher)
    m.fake.zero_grad(set_to_none=True)
    loss, _ = m.loss("generator", None, 0)               # L_G reaches only G
    loss.backward()
    assert all_none(m.fake) and all_none(m.teacher) and any_nonzero(m.G)
    assert all(p.requires_grad for p in m.fake.parameters()) and m.fake.training and m.G.training
    assert not m.teacher.training


def test_modes_during_generator_phase():
    """G in train mode, f_ψ and the teacher in eval mode, with frozen parameters, during the generator phase."""
    m = _sid(batch_size=4)
    seen = []

    def hook(name):
        def f(module, args):
            seen.append((name, module.training, any(p.requires_grad for p in module.parameters())))
        return f
    for name, net in (("G", m.G), ("fake", m.fake), ("teacher", m.teacher)):
        net.register_forward_pre_hook(hook(name))
    m.loss("generator", None, 0)
    assert seen == [("G", True, True), ("teacher", False, False), ("fake", False, False)]
    seen.clear()
    m.loss("critic", None, 0)
    assert seen == [("G", False, True), ("fake", True, True)]


@pytest.mark.parametrize("cfg,label_dim", [(MLP_CFG, 0), (UNET_CFG, 0), (UNET_CFG, 3)], ids=["mlp", "unet", "unet-cond"])
def test_step0_generator_is_teacher_at_sigma_init_bitwise(cfg, label_dim):
    from diffdistill.eval.generate import generate
    m = _sid(cfg, batch_size=4, label_dim=label_dim)
    assert m.opts.sigma_init == 2.5 and m.sampling_spec() == {"sampler": "multistep", "sigmas": [2.5]}
    shape = tuple(m.teacher.sample_shape)
    z = torch.randn((6,) + shape, generator=torch.Generator().manual_seed(0))
    labels = torch.nn.functional.one_hot(torch.arange(6) % 3, 3).float() if label_dim else None
    s = torch.full((6,), 2.5)
    want = m.teacher(2.5 * z, s, labels)
    with torch.no_grad():
        assert torch.equal(m.G.eval()(2.5 * z, s, labels), want)
        assert torch.equal(m.sampling_net()(2.5 * z, s, labels), want)
    # the sampler path: one multistep step from σ_init
    x, lab, info = generate(m.sampling_net(), range(6), m.sampling_spec())
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(i)) for i in range(6)])
    assert info["nfe"] == 1 and torch.equal(x, m.teacher(noise * 2.5, s, lab))


def test_conditional_random_labels():
    m = _sid(batch_size=6, label_dim=4)
    m.G, m.fake = Recorder(m.G), Recorder(m.fake)
    m.loss("critic", None, 0)
    m.loss("generator", None, 0)
    labs = [c["labels"] for c in m.G.calls]
    for lab in labs:
        assert lab.shape == (6, 4) and torch.equal(lab.sum(1), torch.ones(6))
    assert not torch.equal(labs[0], labs[1])             # fresh labels per phase
    assert all(c["labels"] is labs[i] for i, c in enumerate(m.fake.calls))


def test_ema_rule_and_sampling_from_ema():
    """The generator's EMA is the trainer's (``emas["generator"]``) with the official rule, sid_training_loop.py:
    346-352: β = 0.5^(B / max(min(500 kimg, 0.05·cur_nimg), 1e-8)), cur_nimg the images before the step (β = 0 at
    step 0), ema ← β·ema + (1 − β)·G; samples come from it."""
    m = _sid(batch_size=128)
    ema = m.emas["generator"]
    assert ema.source == "generator" and m.sampling_net() is ema.net and m.sampling_net() is not m.G
    for nimg in (0, 128, 12_800, 10 ** 8):
        want = 0.5 ** (128 / max(min(5e5, 0.05 * nimg), 1e-8))
        assert math.isclose(ema.beta(128, nimg), want, rel_tol=1e-12)
    _perturb(m.G, scale=1.0)
    before = [p.clone() for p in ema.net.parameters()]
    beta = ema.beta(128, 10 ** 8)
    ema.update(m.G, beta)
    for b, e, gp in zip(before, ema.net.parameters(), m.G.parameters()):
        assert torch.allclose(e, beta * b + (1 - beta) * gp, atol=1e-6)


def test_options_are_checked():
    from diffdistill.errors import UserError
    for bad in ({"student_steps": 2}, {"sigma_init": 0.0}, {"tmax": 1200}):
        with pytest.raises(UserError):
            _sid(**bad)


# ------------------------------------------------------------------------------------------------ direction oracle
class _Gauss1D:
    """Exact denoiser of N(μ, s²): D(x; σ) = μ + s²/(s² + σ²)·(x − μ)."""

    def __init__(self, mu, s):
        self.mu, self.s = mu, s

    def __call__(self, x, sigma):
        return self.mu + self.s ** 2 / (self.s ** 2 + sigma ** 2) * (x - self.mu)


def _direction(mu_d, s_d, mu_g, s_g, sigma, alpha, n=100_000):
    """(∂L/∂μ_g, ∂L/∂s_g) of the SiD loss for x = μ_g + s_g·z, f_φ the data's denoiser, f_ψ the generator's own
    (exact, parameters frozen), w ≡ 1; n antithetic Monte Carlo draws (common random numbers for every case)."""
    g = torch.Generator().manual_seed(0)
    z, e = torch.randn(n // 2, 1, generator=g, dtype=torch.float64), torch.randn(n // 2, 1, generator=g, dtype=torch.float64)
    z, e = torch.cat([z, -z]), torch.cat([e, -e])
    mu = torch.tensor(mu_g, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(s_g, dtype=torch.float64, requires_grad=True)
    x = mu + s * z
    x_t = x + sigma * e
    loss = sid_generator_loss(x, _Gauss1D(mu_d, s_d)(x_t, sigma), _Gauss1D(mu_g, s_g)(x_t, sigma), alpha,
                              weight=torch.ones(n, dtype=torch.float64))
    return torch.autograd.grad(loss, (mu, s))


def test_direction_oracle_1d_gaussian():
    """For α ∈ {0.5, 1, 1.2}, σ from 0.1 to 10 and moderate mismatches, descending L_G moves the generator's mean
    and scale toward the data's: sign ∂L/∂μ_g = sign(μ_g − μ_d), sign ∂L/∂s_g = sign(s_g − s_d). (With α = 1.2 and
    a generator 3–4× too wide the scale sign flips at σ ≤ 0.2, so the cases stay within a factor 1.4 or so.)"""
    mu_d, s_d = 0.0, 0.5
    cases = [(0.3, 0.7), (0.3, 0.3), (-0.3, 0.7), (-0.3, 0.3), (0.1, 0.55), (-0.1, 0.45), (0.6, 0.6), (-0.6, 0.4)]
    sigmas = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
    checked = 0
    for mu_g, s_g in cases:
        for sigma in sigmas:
            for alpha in (0.5, 1.0, 1.2):
                gm, gs = _direction(mu_d, s_d, mu_g, s_g, sigma, alpha)
                assert math.copysign(1, gm) == math.copysign(1, mu_g - mu_d), (mu_g, s_g, sigma, alpha, float(gm))
                assert math.copysign(1, gs) == math.copysign(1, s_g - s_d), (mu_g, s_g, sigma, alpha, float(gs))
                checked += 1
    assert checked == 168
    # α = 0 can fail: a too-narrow generator at small σ gets a mean gradient of the wrong sign
    gm, _ = _direction(mu_d, s_d, 0.3, 0.3, 0.1, 0.0)
    assert gm < 0


# ------------------------------------------------------------------------------------------------ training
def _trainer(out, steps, resume=None):
    from diffdistill.train.trainer import Trainer
    teacher, cfg = tiny_teacher(MLP_CFG)
    run = {"out": str(out), "steps": steps, "batch_size": 32, "log_every": 5, "ckpt_every": 0, "sample_every": 0,
           "progress": False, "seed": 0, "device": "cpu", "keep_ckpts": 3, "nan_policy": "stop", "grad_clip": None,
           "resume": resume, "num_sample_grid": 16}
    return Trainer({"run": run, "data": {}, "net": cfg,
                    "method": {"name": "sid", "lr": 1e-3, "ema_halflife_kimg": 0.5}},
                   teacher=teacher, teacher_path="mem")


def test_data_free_and_resume_is_exact_including_ema(tmp_path):
    full, resumed = run_full_and_resumed(_trainer, tmp_path)
    assert full.dataset is None and resumed.dataset is None      # data-free: no dataset, no loader
    a, b = full.method.state_dict(), resumed.method.state_dict()
    for k, v in a["emas"]["generator"].items():
        assert torch.equal(v, b["emas"]["generator"][k]), k
    for net in ("generator", "fake_score"):
        for k, v in a["nets"][net].items():
            assert torch.equal(v, b["nets"][net][k]), (net, k)
    for phase in ("critic", "generator"):
        sa, sb = a["optimizers"][phase]["state"], b["optimizers"][phase]["state"]
        assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    h = _trainer(tmp_path / "x", 5).method.state_dict()["emas"]["generator"]
    assert any(not torch.equal(h[k], v) for k, v in b["emas"]["generator"].items())
    log = json.loads((tmp_path / "full" / "log.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(log["loss/generator"]) and math.isfinite(log["loss/critic"])


def test_presets_follow_the_toy_scale_down():
    from diffdistill.config import load_preset
    assert "method" not in load_preset("sid", "official")            # the dataclass defaults are official
    for kind in ("points", "images"):
        p = load_preset("sid", kind)
        assert 1e-4 <= p["method"]["lr"] <= 3e-4
        images = p["run"]["steps"] * p["run"]["batch_size"]
        assert 0.04 <= p["method"]["ema_halflife_kimg"] * 1000 / images <= 0.10
        assert "alpha" not in p["method"] and "sigma_init" not in p["method"]   # α = 1.2, σ_init = 2.5 kept


def _points_figures(net, spec, data_cfg, n):
    """``evaluate_net``'s sliced W2 and mode coverage of n samples (seeds 0…n−1) against the same fresh ring8 draws,
    without the O(n²) MMD and precision/recall these tests do not read (≈ 20 s per call at n = 5,000)."""
    from diffdistill.data import dataset_from_config
    from diffdistill.data.toy2d import ring8_gmm
    from diffdistill.eval.generate import generate
    from diffdistill.eval.metrics import mode_coverage, sliced_w2
    x, _, info = generate(net, list(range(n)), spec, batch_size=500)
    ref = dataset_from_config(dict(data_cfg, n=n, seed=int(data_cfg.get("seed", 0)) + 10_000)).x
    gmm = ring8_gmm()
    return {"nfe": info["nfe"], "num_samples": n, "sliced_w2": float(sliced_w2(x, ref, seed=0)),
            "modes_covered": mode_coverage(x, gmm.means, gmm.std)["modes_covered"]}


def _ring8_student_vs_teacher(ring8_teacher, out, n=5000, **run):
    """Distil the session's ring8 teacher with the points preset (plus ``run`` overrides); sliced W2 of the 1-step
    EMA student and of the teacher at 35 Heun NFE on the same n samples and seed 0, as ``evaluate_net`` gives them
    (checked on 400 samples)."""
    from diffdistill.distill import distill
    from diffdistill.eval.evaluate import evaluate_net, load_for_sampling
    method = run.pop("method", {})
    tr = distill("sid", ring8_teacher.path, flags={"run": {"out": str(out), "progress": False, "ckpt_every": 0,
                                                           "sample_every": 0, **run}, "method": method})
    net, spec = tr.method.sampling_net(), tr.method.sampling_spec()
    small = evaluate_net(net, spec, ring8_teacher.data_cfg, 400, seed=0)
    assert _points_figures(net, spec, ring8_teacher.data_cfg, 400) == {k: small[k] for k in
                                                                        ("nfe", "num_samples", "sliced_w2",
                                                                         "modes_covered")}
    student = _points_figures(net, spec, ring8_teacher.data_cfg, n)
    teacher_net, _ = load_for_sampling(ring8_teacher.path)
    teacher = _points_figures(teacher_net, {"sampler": "heun", "nfe": 35}, ring8_teacher.data_cfg, n)
    assert student["nfe"] == 1 and teacher["nfe"] == 35 and student["num_samples"] == teacher["num_samples"] == n
    return tr, student, teacher


def test_sid_ring8_end_to_end(ring8_teacher, tmp_path):
    """The points preset, cut to 400 of its 800 iterations, distils the ring8 teacher (MLP 128×3) into a one-step
    student whose sliced W2 is within 1.5× the teacher's at 35 NFE (measured at 400 iterations, run seeds 0–2:
    0.0409, 0.0420, 0.0362 vs 0.0339; at 500: 0.0413; at the full 800: 0.038, and the full length for seeds 0–3 is
    ``-m slow``; the step-0 student, i.e. the teacher used as a one-step generator at σ = 2.5, is at 0.41)."""
    from diffdistill.eval.evaluate import evaluate_net
    tr, student, teacher = _ring8_student_vs_teacher(ring8_teacher, tmp_path, steps=400)
    assert tr.dataset is None and tr.data_x is None      # data-free: no data set was built
    from diffdistill.config import load_preset
    preset = load_preset("sid", "points")
    assert tr.step == 400 and tr.cfg["run"]["batch_size"] == preset["run"]["batch_size"]
    assert {k: tr.cfg["method"][k] for k in preset["method"]} == preset["method"]   # the rest is the preset's
    start = evaluate_net(tr.method.teacher, tr.method.sampling_spec(), ring8_teacher.data_cfg, 2000, seed=0)
    print("sid ring8 sliced W2: student", student["sliced_w2"], "teacher(35 NFE)", teacher["sliced_w2"],
          "step-0 student", start["sliced_w2"], "modes", student.get("modes_covered"))
    assert student["sliced_w2"] < 1.5 * teacher["sliced_w2"]
    assert student["sliced_w2"] < 0.2 * start["sliced_w2"]
    assert student["modes_covered"] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("seed,alpha", [(0, 1.2), (1, 1.2), (2, 1.2), (3, 1.2), (0, 1.0)])
def test_sid_ring8_other_seeds_and_alpha_1(ring8_teacher, tmp_path, seed, alpha):
    """The same check at the preset's full length (800 iterations) for run seeds 0–3, and for α = 1 (the official
    SiDA scripts' value)."""
    _, student, teacher = _ring8_student_vs_teacher(ring8_teacher, tmp_path, seed=seed, method={"alpha": alpha})
    print(f"sid ring8 seed {seed} α {alpha}: student", student["sliced_w2"], "teacher", teacher["sliced_w2"])
    assert student["sliced_w2"] < 1.5 * teacher["sliced_w2"]


@pytest.mark.slow
def test_sid_digits_images_preset_learns(tmp_path):
    """The images preset on the shipped digits teacher, cut to 300 iterations (≈ 4 min): the one-step student's
    proxy-FID falls from the step-0 student's (the teacher at σ = 2.5, ≈ 480) to within a few times the teacher's."""
    from diffdistill.demo import SHIPPED_TEACHER
    from diffdistill.distill import distill
    from diffdistill.eval.evaluate import evaluate_net
    if not SHIPPED_TEACHER.exists():
        pytest.skip("no shipped teacher in this checkout")
    tr = distill("sid", SHIPPED_TEACHER, flags={"run": {"out": str(tmp_path), "steps": 300, "progress": False,
                                                        "ckpt_every": 0, "sample_every": 0}})
    assert tr.dataset is None
    data = tr.cfg["data"]
    student = evaluate_net(tr.method.sampling_net(), tr.method.sampling_spec(), data, 2000, seed=0)
    start = evaluate_net(tr.method.teacher, tr.method.sampling_spec(), data, 2000, seed=0)
    print("sid digits proxy-FID: student", student["proxy_fid"], "step-0 student", start["proxy_fid"])
    assert student["proxy_fid"] < 0.1 * start["proxy_fid"]
    assert student["proxy_fid"] < 30


def test_options_defaults_are_official_and_bad_values_are_refused():
    """SiDOptions' defaults against mingyuanzhou/SiD: sid_train.py:95 (σ_init 2.5), :98 (--lsg 100), :99 (α 1.2),
    :100 (tmax 800), :101-103 (lr 1e-5 both, g_beta1 0), :152-153 (Adam β (0, 0.999), ε 1e-8), :70 (EMA 0.5 Mimg),
    training/sid_training_loop.py:131 (ramp-up 0.05), training/sid_loss.py:18 (P_mean −1.2, P_std 1.2); SiDA:
    sida_train.py:148-149 (--lsd 1, --lsg_gan 0.01), sida_training_loop.py:410, :425 (200 / 100 kimg)."""
    from diffdistill.methods.sid import SiDOptions
    from diffdistill.errors import UserError
    o = SiDOptions()
    assert (o.sigma_init, o.loss_scale_g, o.alpha, o.tmax, o.lr, o.lr_critic) == (2.5, 100.0, 1.2, 800.0, 1e-5, None)
    assert (o.betas, o.eps, o.ema_halflife_kimg, o.ema_rampup, o.ema_beta_const) == ((0.0, 0.999), 1e-8, 500.0, 0.05,
                                                                                     None)
    assert (o.p_mean, o.p_std, o.grad_nan_to_num, o.sida) == (-1.2, 1.2, True, False)
    assert (o.sida_adv_weight, o.sida_d_weight, o.sida_g_start_kimg, o.sida_gan_start_kimg) == (0.01, 1.0, 100.0, 200.0)
    m = _sid()
    assert m.opts == o and m.optimizers["critic"].defaults["lr"] == 1e-5
    assert _sid(lr=3e-4, lr_critic=1e-3).optimizers["critic"].defaults["lr"] == 1e-3
    for bad in ({"tmax": 1200}, {"sigma_init": 0}, {"betas": [0.0, 1.0]}, {"student_steps": 2}, {"alhpa": 1.0}):
        with pytest.raises(UserError):
            SiDOptions.from_dict(bad, owner="sid")
