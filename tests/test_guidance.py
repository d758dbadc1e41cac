"""Classifier-free guidance and label dropout (diffusion/guidance.py) and every guidance placement of the score
distillation methods, each against a direct computation:

- the guided denoiser of an exact class-conditional Gaussian mixture equals E[x₀|x_σ,∅] + w(E[x₀|x_σ,c] −
  E[x₀|x_σ,∅]) computed from the closed-form posteriors (float64, rel ≤ 1e-12);
- DMD2 / DMD / Diff-Instruct: ``guidance_real`` guides the teacher only in the generator's DM gradient (DMD2's
  SD recipe, tianweiy/DMD2 main/sd_guidance.py compute_distribution_matching_loss: ``pred_real_noise_uncond +
  real_guidance_scale·(cond − uncond)``), the fake-score loss untouched;
- SiD-LSG's κ1 (fake-score training on the guided output), κ2 = κ3 and κ4 (guided fake and real scores in the
  generator loss) as mingyuanzhou/SiD-LSG training/sid_training_loop.py computes them (the fake-score loss on
  ``sid_sd_denoise(..., guidance_scale=cfg_train_fake)``, the generator loss on ``y_fake``/``y_real`` with
  ``cfg_eval_fake``/``cfg_eval_real``);
- zero-CFG (w = 0) is the null-label call; refusals for unconditional teachers and SiDA;
- sampling with ``--guidance`` and conditional correctness.
"""

import math

import pytest
import torch
from torch import nn

from helpers.dm_helpers import MLP_CFG, make_ctx, tiny_teacher
from diffdistill.diffusion.guidance import GuidedDenoiser, drop_labels, guided_denoise, null_labels
from diffdistill.diffusion.losses import edm_loss, loss_weight
from diffdistill.errors import UserError
from diffdistill.eval.evaluate import conditional_correctness
from diffdistill.methods.diff_instruct import DiffInstruct
from diffdistill.methods.dmd2 import DMD2
from diffdistill.methods.sid import SiD, sid_generator_loss

# A 2-D class-conditional Gaussian mixture: class k is component k.
PI = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
MU = torch.tensor([[1.0, 0.0], [-0.5, 0.8], [0.0, -1.2]], dtype=torch.float64)
S = torch.tensor([0.1, 0.3, 0.05], dtype=torch.float64)


def posterior_uncond(x, sigma):
    """E[x₀ | x_σ] of the mixture: responsibilities × per-component Gaussian posterior means."""
    var = S ** 2 + sigma.reshape(-1, 1) ** 2                          # [B, K]
    diff = x[:, None, :] - MU                                         # [B, K, 2]
    r = torch.softmax(PI.log() - diff.square().sum(-1) / (2 * var) - var.log(), dim=1)
    cond = MU + (S ** 2 / var)[..., None] * diff
    return (r[..., None] * cond).sum(1)


def posterior_class(x, sigma, k):
    """E[x₀ | x_σ, class k]: the Gaussian posterior mean of component k."""
    var = (S[k] ** 2 + sigma.reshape(-1) ** 2)[:, None]
    return MU[k] + S[k][:, None] ** 2 / var * (x - MU[k])


class ExactConditionalDenoiser(nn.Module):
    """The exact denoiser of the mixture: a zero label row is the null condition (the mixture), a one-hot row the
    class posterior."""

    img_channels, img_resolution, label_dim, sigma_min, sigma_max = 2, 0, 3, 0.002, 80.0
    sample_shape = (2,)

    def forward(self, x, sigma, labels=None):
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        out = posterior_uncond(x, sigma)
        has = labels.abs().sum(1) > 0
        if has.any():
            out[has] = posterior_class(x[has], sigma[has], labels[has].argmax(1))
        return out


def _onehot(k, n=3):
    return torch.nn.functional.one_hot(torch.as_tensor(k), n).to(torch.float64)


@pytest.mark.parametrize("w", [0.0, 1.0, 1.75, 3.0, -0.5])
def test_guided_denoiser_is_the_cfg_combination_of_the_exact_posteriors(w):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, generator=g, dtype=torch.float64) * 1.5
    sigma = torch.exp(torch.randn(64, generator=g, dtype=torch.float64))
    k = torch.randint(3, (64,), generator=g)
    got = guided_denoise(ExactConditionalDenoiser(), x, sigma, _onehot(k), w)
    d_u, d_c = posterior_uncond(x, sigma), posterior_class(x, sigma, k)
    want = d_u + w * (d_c - d_u)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    # the same through the sampler-facing wrapper, which keeps the wrapped net's attributes
    wrapped = GuidedDenoiser(ExactConditionalDenoiser(), w)
    assert wrapped.label_dim == 3 and wrapped.sigma_max == 80.0 and tuple(wrapped.sample_shape) == (2,)
    assert torch.allclose(wrapped(x, sigma, _onehot(k)), want, rtol=1e-12, atol=1e-12)


def test_cfg_in_epsilon_space_is_cfg_in_denoiser_space():
    """DMD2's and SiD-LSG's SD code guide ε̂; with D = x − σ·ε̂ the guided D is the D-space combination."""
    g = torch.Generator().manual_seed(1)
    x, sigma = torch.randn(16, 2, generator=g, dtype=torch.float64), torch.rand(16, 1, generator=g, dtype=torch.float64) + 0.1
    eps_c, eps_u, w = torch.randn(16, 2, generator=g), torch.randn(16, 2, generator=g), 1.75
    d = lambda e: x - sigma * e.to(torch.float64)  # noqa: E731
    assert torch.allclose(d(eps_u + w * (eps_c - eps_u)), d(eps_u) + w * (d(eps_c) - d(eps_u)), atol=1e-12)


def test_label_dropout_is_edm_rule_and_leaves_the_rng_alone_when_off():
    labels = _onehot(torch.arange(4000) % 3).float()
    g = torch.Generator().manual_seed(0)
    before = g.get_state()
    assert drop_labels(labels, 0.0, g) is labels and torch.equal(g.get_state(), before)
    dropped = drop_labels(labels, 0.25, g)
    null = dropped.abs().sum(1) == 0
    assert abs(float(null.float().mean()) - 0.25) < 0.03
    assert torch.equal(dropped[~null], labels[~null])      # kept rows untouched, dropped rows all zero
    # EDM's expression on the same draw: class_labels * (rand([B, 1]) >= p)
    g2 = torch.Generator().manual_seed(0)
    assert torch.equal(dropped, labels * (torch.rand(labels.shape[0], 1, generator=g2) >= 0.25))
    assert torch.equal(null_labels(labels), torch.zeros_like(labels))


# ------------------------------------------------------------------------------------------------ placements
def _cond_teacher():
    return tiny_teacher(MLP_CFG, label_dim=3)


def _method(cls, batch_size=8, **opts):
    teacher, cfg = _cond_teacher()
    m = cls(make_ctx(teacher, cfg, batch_size=batch_size), **opts)
    with torch.no_grad():   # a fake score that differs from the teacher, so the DM gradient is not zero
        g = torch.Generator().manual_seed(5)
        for p in m.fake.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return m


def _grads(net):
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in net.parameters()]


def _phase(m, phase, state):
    m.ctx.generator.set_state(state)
    for net in m.nets.values():
        net.zero_grad(set_to_none=True)
    loss, _ = m.loss(phase, None, 0)
    loss.backward()
    return float(loss.detach()), {k: _grads(v) for k, v in m.nets.items()}


@pytest.mark.parametrize("cls", [DMD2, DiffInstruct], ids=["dmd2", "diff_instruct"])
def test_real_score_guidance_is_the_guided_teacher_in_the_generator_loss_only(cls):
    """guidance_real = w gives exactly the generator gradient of the same method whose teacher *is* the guided
    teacher D_∅ + w(D_c − D_∅) (every other draw equal), and leaves the fake-score loss as it was."""
    w = 1.75
    opts = {"gan_weight": 0.0} if cls is DMD2 else {}
    guided = _method(cls, guidance_real=w, **opts)
    direct = _method(cls, **opts)
    direct.teacher = GuidedDenoiser(direct.teacher, w)   # the direct form: the teacher replaced by its CFG
    state = guided.ctx.generator.get_state()
    gen_phase = guided.generator_phase
    l_g, g_g = _phase(guided, gen_phase, state)
    l_d, g_d = _phase(direct, gen_phase, state)
    assert math.isclose(l_g, l_d, rel_tol=1e-6)
    for a, b in zip(g_g["generator"], g_d["generator"]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-8)
    assert any(float(a.abs().max()) > 0 for a in g_g["generator"])
    plain = _method(cls, **opts)
    l_p, _ = _phase(plain, gen_phase, state)
    assert not math.isclose(l_p, l_g, rel_tol=1e-4)          # the scale changes the generator loss
    critic = [p for p in guided.phases(0) if p != gen_phase][0]
    assert math.isclose(_phase(guided, critic, state)[0], _phase(plain, critic, state)[0], rel_tol=1e-7)


def test_zero_cfg_fake_score_is_the_null_label_call():
    m = _method(DMD2, guidance_fake=0.0, gan_weight=0.0)
    x = torch.randn(6, 2)
    sigma = torch.full((6,), 0.7)
    labels = _onehot(torch.arange(6) % 3).float()
    assert torch.equal(guided_denoise(m.fake, x, sigma, labels, 0.0), m.fake(x, sigma, torch.zeros_like(labels)))


def _sid_direct_generator_loss(m, state, k2, k4):
    """SiD-LSG's generator loss from its training loop: y_fake/y_real are the κ2- and κ4-guided denoisers at
    x_t = x_g + σn (same draws as the method), loss = sid_generator_loss (official sid_loss.py form)."""
    m.ctx.generator.set_state(state)
    n = m.ctx.batch_size
    labels = m.labels_for(None, n)
    z = m.randn(n)
    s = m.opts.sigma_init
    x = m.G(z * s, torch.full((n,), s), labels)
    sigma = m.sample_sigma(n)
    x_t = x + sigma.reshape(-1, 1) * m.randn_like(x)
    m.fake.eval()
    d_u_f, d_c_f = m.fake(x_t, sigma, torch.zeros_like(labels)), m.fake(x_t, sigma, labels)
    d_u_r, d_c_r = m.teacher(x_t, sigma, torch.zeros_like(labels)), m.teacher(x_t, sigma, labels)
    m.fake.train()
    y_fake, y_real = d_u_f + k2 * (d_c_f - d_u_f), d_u_r + k4 * (d_c_r - d_u_r)
    return sid_generator_loss(x, y_real, y_fake, m.opts.alpha, scale=m.opts.loss_scale_g)


def test_sid_lsg_generator_loss_uses_the_guided_fake_and_real_scores(float64):
    """In float64: the generator's gradient sums terms that cancel, and float32 round-off differed beyond 1e-4
    relative on some CPUs."""
    k2, k4 = 2.0, 3.0
    m = _method(SiD, guidance_fake=k2, guidance_real=k4)
    state = m.ctx.generator.get_state()
    got, _ = m.loss("generator", None, 0)
    want = _sid_direct_generator_loss(m, state, k2, k4)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)
    # and its gradient w.r.t. the generator's parameters
    m.G.zero_grad(set_to_none=True)
    m.ctx.generator.set_state(state)
    m.loss("generator", None, 0)[0].backward()
    g_method = _grads(m.G)
    m.G.zero_grad(set_to_none=True)
    _sid_direct_generator_loss(m, state, k2, k4).backward()
    for a, b in zip(g_method, _grads(m.G)):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)


def test_sid_lsg_kappa1_trains_the_fake_scores_guided_output():
    k1 = 2.0
    m = _method(SiD, guidance_fake_train=k1)
    state = m.ctx.generator.get_state()
    got, _ = m.loss("critic", None, 0)
    # direct: the same draws (generate without grad, log-normal σ, noise), λ·‖D_∅ + κ1(D_c − D_∅) − x‖² summed
    m.ctx.generator.set_state(state)
    x, labels = m.generate(with_grad=False)
    sigma, noise = m.lognormal_sigma(len(x)), m.randn_like(x)
    x_t = x + sigma.reshape(-1, 1) * noise
    d_u, d_c = m.fake(x_t, sigma, torch.zeros_like(labels)), m.fake(x_t, sigma, labels)
    lam = loss_weight(m.fake, sigma, "teacher")
    want = (lam * (d_u + k1 * (d_c - d_u) - x).square().sum(1)).sum() / len(x)
    assert torch.allclose(got, want, rtol=1e-5)
    plain = edm_loss(m.fake, x, sigma, noise, labels, weight=lam).sum() / len(x)
    assert not torch.allclose(got, plain, rtol=1e-3)


def test_guidance_needs_a_conditional_teacher_and_sida_keeps_the_fake_plain():
    teacher, cfg = tiny_teacher(MLP_CFG, label_dim=0)
    with pytest.raises(UserError, match="needs a conditional teacher"):
        DMD2(make_ctx(teacher, cfg, batch_size=4), guidance_real=1.75)
    with pytest.raises(UserError, match="SiDA"):
        SiD.Options(sida=True, guidance_fake=2.0)
    SiD.Options(sida=True, guidance_real=2.0)   # the real score may be guided with SiDA


def test_official_defaults_have_no_guidance():
    for cls in (DMD2, DiffInstruct, SiD):
        o = cls.Options()
        assert o.guidance_real == 1.0 and o.guidance_fake == 1.0 and not o.guided()
    assert SiD.Options().guidance_fake_train == 1.0


# ------------------------------------------------------------------------------------------------ sampling, eval
def test_conditional_correctness_counts_the_requested_class():
    labels = _onehot(torch.tensor([0, 0, 1, 1, 2, 2]), 10).float()
    logits = torch.full((6, 10), -5.0)
    for i, c in enumerate([0, 3, 1, 1, 2, 7]):
        logits[i, c] = 5.0
    out = conditional_correctness(logits, labels)
    assert out["class_accuracy"] == pytest.approx(4 / 6)
    assert out["class_accuracy_per_class"][:3] == [0.5, 1.0, 0.5] and out["class_accuracy_per_class"][3] is None


def test_sample_with_guidance_from_the_cli(tmp_path, capsys):
    import numpy as np
    from diffdistill.cli import main
    from diffdistill.io.checkpoint import save_checkpoint
    teacher, cfg = _cond_teacher()
    state = {"role": "teacher", "method": "edm", "step": 0, "config": {"net": cfg}, "net_config": cfg,
             "sampling": {"sampler": "euler", "nfe": 4}, "sample_net": teacher.state_dict()}
    ckpt = tmp_path / "t.pt"
    save_checkpoint(state, ckpt)
    outs = {}
    for w in ("1", "2.5"):
        out = tmp_path / f"w{w}.npz"
        assert main(["sample", str(ckpt), "--out", str(out), "--num-samples", "9", "--guidance", w]) == 0
        outs[w] = np.load(out)["samples"]
    assert not np.allclose(outs["1"], outs["2.5"])
    # the CLI's samples are the guided teacher's, sampled directly
    from diffdistill.eval.generate import generate
    x, _, info = generate(GuidedDenoiser(teacher, 2.5), range(9), {"sampler": "euler", "nfe": 4})
    assert np.allclose(outs["2.5"], x.numpy(), atol=1e-6)
    uncond, ucfg = tiny_teacher(MLP_CFG, label_dim=0)
    save_checkpoint(dict(state, config={"net": ucfg}, net_config=ucfg, sample_net=uncond.state_dict()),
                    tmp_path / "u.pt")
    assert main(["sample", str(tmp_path / "u.pt"), "--out", str(tmp_path / "u.npz"), "--guidance", "2"]) == 2
    assert "--guidance 2 needs a conditional network" in capsys.readouterr().err


def test_teacher_label_dropout_in_the_edm_loss():
    """EDM teacher training with label_dropout p: the loss on labels × (rand([B, 1]) >= p), drawn after σ and the
    noise from the run's generator (NVlabs/edm training/networks.py applies the same mask inside the network)."""
    from diffdistill.diffusion.schedules import sample_lognormal_sigma
    from diffdistill.methods.teacher import EDMTeacher
    cfg = dict(MLP_CFG, label_dim=3)
    ctx = make_ctx(None, cfg, batch_size=32)
    m = EDMTeacher(ctx, label_dropout=0.5)
    g = torch.Generator().manual_seed(3)
    x, labels = torch.randn(32, 2, generator=g), _onehot(torch.arange(32) % 3).float()
    state = ctx.generator.get_state()
    got, _ = m.loss("net", (x, labels), 0)
    ctx.generator.set_state(state)
    sigma = sample_lognormal_sigma(32, -1.2, 1.2, generator=ctx.generator)
    noise = torch.randn(x.shape, generator=ctx.generator)
    kept = labels * (torch.rand(32, 1, generator=ctx.generator) >= 0.5)
    assert 0 < int((kept.sum(1) == 0).sum()) < 32
    want = edm_loss(m.nets["net"], x, sigma, noise, kept, 0.5).mean()
    assert torch.allclose(got, want, rtol=1e-6)


def test_dmd_regression_pairs_come_from_the_guided_teacher(tmp_path):
    """DMD with guidance_real = w regresses onto the guided teacher's ODE outputs (its DM loss targets that
    distribution); cached unguided chunks are not reused for w ≠ 1."""
    from diffdistill.diffusion.samplers import heun_sampler
    from diffdistill.diffusion.schedules import karras_sigmas
    from diffdistill.methods.dmd import teacher_pairs
    teacher, _ = _cond_teacher()
    z, y1, labels = teacher_pairs(teacher, 6, tmp_path / "pairs", heun_steps=3, say=lambda m: None)
    with pytest.raises(UserError, match="other pair settings"):
        teacher_pairs(teacher, 6, tmp_path / "pairs", heun_steps=3, say=lambda m: None, guidance=2.0)
    z2, y2, _ = teacher_pairs(teacher, 6, None, heun_steps=3, say=lambda m: None, guidance=2.0)
    want, _ = heun_sampler(GuidedDenoiser(teacher, 2.0), z2, karras_sigmas(3, teacher.sigma_min, teacher.sigma_max),
                           labels)
    assert torch.equal(z, z2) and torch.allclose(y2, want.float(), atol=1e-6)
    assert not torch.allclose(y1, y2, atol=1e-4)
