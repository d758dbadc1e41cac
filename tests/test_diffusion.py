"""Independent oracle tests for diffdistill.diffusion (EDM preconditioning, schedules, samplers).

Every expected value here is derived from the EDM formulas (Karras et al. 2022) written out below, never from
the implementation:

    σ_d = 0.5
    c_skip = σ_d²/(σ²+σ_d²),  c_out = σσ_d/√(σ²+σ_d²),  c_in = 1/√(σ²+σ_d²),  c_noise = ¼ ln σ
    D(x; σ) = c_skip·x + c_out·F(c_in·x, c_noise, y)
    Karras grid: σ_i = (σ_max^{1/ρ} + i/(N−1)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, i = 0..N−1, then 0
    PF-ODE:      dx/dσ = (x − D(x; σ))/σ
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from diffdistill.diffusion.precond import EDMPrecond
from diffdistill.diffusion.samplers import (
    ddim_sampler,
    euler_sampler,
    heun_sampler,
    multistep_sampler,
    sample,
    teacher_sigmas,
)
from diffdistill.diffusion.schedules import karras_sigmas, sample_lognormal_sigma

SIGMA_D = 0.5


# ----------------------------------------------------------------------------------------------------------------
# Independent reference formulas (float64, numpy / python)
# ----------------------------------------------------------------------------------------------------------------

def ref_coeffs(sigma, sd=SIGMA_D):
    sigma = np.asarray(sigma, dtype=np.float64)
    c_skip = sd**2 / (sigma**2 + sd**2)
    c_out = sigma * sd / np.sqrt(sigma**2 + sd**2)
    c_in = 1.0 / np.sqrt(sigma**2 + sd**2)
    c_noise = np.log(sigma) / 4.0
    return c_skip, c_out, c_in, c_noise


def ref_karras(N, smin=0.002, smax=80.0, rho=7.0, zero=True):
    i = np.arange(N, dtype=np.float64)
    s = (smax ** (1 / rho) + i / (N - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    return np.concatenate([s, [0.0]]) if zero else s


def _sigma_like(sigma, x):
    """Turn a scalar / (B,) / broadcastable σ into a tensor that broadcasts against x (batch first)."""
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if s.numel() == 1:
        return s.reshape([1] * x.dim())
    return s.reshape(-1, *([1] * (x.dim() - 1)))


class ToyDenoiser:
    """A Denoiser-protocol object around a callable f(x, σ_tensor) that counts its calls."""

    def __init__(self, fn, img_channels=2, sigma_min=0.002, sigma_max=80.0):
        self.fn = fn
        self.img_channels = img_channels
        self.img_resolution = 0
        self.label_dim = 0
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.calls = 0
        self.inputs = []  # (x, sigma) of every call

    def __call__(self, x, sigma, labels=None):
        self.calls += 1
        s = _sigma_like(sigma, x)
        self.inputs.append((x.detach().clone(), s.detach().clone()))
        return self.fn(x, s)


def gaussian_denoiser(c):
    """Exact denoiser of data N(0, c² I): D(x; σ) = c²/(c²+σ²)·x."""
    return ToyDenoiser(lambda x, s: (c * c) / (c * c + s * s) * x)


def nonlinear_denoiser():
    return ToyDenoiser(lambda x, s: torch.tanh(x / (1.0 + s)) * 0.7 + 0.1 * torch.sin(3.0 * x) / (1.0 + s * s)
                       + 0.05 * torch.log1p(s))


# ----------------------------------------------------------------------------------------------------------------
# EDMPrecond
# ----------------------------------------------------------------------------------------------------------------

class SpyModel(nn.Module):
    """Raw network F(x_in, c_noise, labels) that records its inputs; F is a fixed nonlinear function of them."""

    def __init__(self, mode="nonlinear"):
        super().__init__()
        self.mode = mode
        self.seen = None

    def forward(self, x_in, c_noise, labels=None):
        self.seen = (x_in.detach().clone(), torch.as_tensor(c_noise).detach().clone(),
                     None if labels is None else labels.detach().clone())
        if self.mode == "zero":
            return torch.zeros_like(x_in)
        if self.mode == "one":
            return torch.ones_like(x_in)
        return self.F(x_in, c_noise)

    @staticmethod
    def F(x_in, c_noise):
        cn = torch.as_tensor(c_noise, dtype=x_in.dtype).reshape(-1)
        cn = cn.reshape(-1, *([1] * (x_in.dim() - 1))) if cn.numel() > 1 else cn.reshape([1] * x_in.dim())
        return torch.sin(2.0 * x_in) + 0.3 * cn * x_in + 0.1


def _per_sample_c_noise(c_noise, B):
    cn = torch.as_tensor(c_noise, dtype=torch.float64).reshape(-1)
    if cn.numel() == 1:
        cn = cn.expand(B)
    assert cn.numel() == B
    return cn.numpy()


SIGMAS_TEST = [0.002, 0.02, 0.3, 0.5, 1.0, 2.5, 17.5, 80.0]


def test_precond_spy_flat_inputs_and_output():
    torch.manual_seed(0)
    B, C = len(SIGMAS_TEST), 3
    spy = SpyModel()
    net = EDMPrecond(spy, img_channels=C, img_resolution=0, label_dim=0, sigma_data=SIGMA_D)
    x = torch.randn(B, C, dtype=torch.float64) * torch.tensor(SIGMAS_TEST, dtype=torch.float64)[:, None]
    sig = torch.tensor(SIGMAS_TEST, dtype=torch.float64)
    D = net(x, sig)

    c_skip, c_out, c_in, c_noise = ref_coeffs(SIGMAS_TEST)
    x_in, cn_seen, _ = spy.seen
    np.testing.assert_allclose(x_in.double().numpy(), c_in[:, None] * x.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(_per_sample_c_noise(cn_seen, B), c_noise, rtol=1e-6, atol=1e-7)

    F = SpyModel.F(torch.as_tensor(c_in[:, None] * x.numpy()), torch.as_tensor(c_noise)).numpy()
    expected = c_skip[:, None] * x.numpy() + c_out[:, None] * F
    assert D.shape == x.shape
    np.testing.assert_allclose(D.double().detach().numpy(), expected, rtol=2e-5, atol=2e-5)


def test_precond_spy_image_inputs_per_sample_sigma():
    torch.manual_seed(1)
    B, C, R = 4, 3, 4
    sig_list = [0.01, 0.5, 3.0, 60.0]
    spy = SpyModel()
    net = EDMPrecond(spy, img_channels=C, img_resolution=R, label_dim=0, sigma_data=SIGMA_D)
    assert net.sample_shape == (C, R, R)
    x = torch.randn(B, C, R, R)
    D = net(x, torch.tensor(sig_list))
    c_skip, c_out, c_in, c_noise = ref_coeffs(sig_list)
    x_in, cn_seen, _ = spy.seen
    np.testing.assert_allclose(x_in.double().numpy(), c_in[:, None, None, None] * x.double().numpy(),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_per_sample_c_noise(cn_seen, B), c_noise, rtol=1e-5, atol=1e-6)
    F = SpyModel.F(torch.as_tensor(c_in[:, None, None, None] * x.double().numpy()), torch.as_tensor(c_noise))
    expected = c_skip[:, None, None, None] * x.double().numpy() + c_out[:, None, None, None] * F.numpy()
    np.testing.assert_allclose(D.double().detach().numpy(), expected, rtol=1e-4, atol=1e-4)


def test_precond_scalar_sigma_broadcasts():
    torch.manual_seed(2)
    spy = SpyModel()
    net = EDMPrecond(spy, img_channels=2, sigma_data=SIGMA_D)
    x = torch.randn(5, 2)
    D = net(x, torch.tensor(2.5))
    c_skip, c_out, c_in, c_noise = ref_coeffs(2.5)
    x_in, cn_seen, _ = spy.seen
    np.testing.assert_allclose(x_in.double().numpy(), c_in * x.double().numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(_per_sample_c_noise(cn_seen, 5), np.full(5, c_noise), rtol=1e-6, atol=1e-7)
    F = SpyModel.F(torch.as_tensor(c_in * x.double().numpy()), torch.tensor(float(c_noise), dtype=torch.float64))
    expected = c_skip * x.double().numpy() + c_out * F.numpy()
    np.testing.assert_allclose(D.double().detach().numpy(), expected, rtol=1e-5, atol=1e-5)


def test_precond_coefficients_satisfy_edm_identities():
    """Recover c_in, c_noise, c_skip, c_out by probing with spy models, then check the EDM identities."""
    sig = torch.tensor(SIGMAS_TEST, dtype=torch.float64)
    s = sig.numpy()
    B = len(SIGMAS_TEST)
    x = torch.full((B, 1), 1.0, dtype=torch.float64)

    spy0 = SpyModel("zero")
    D0 = EDMPrecond(spy0, img_channels=1, sigma_data=SIGMA_D)(x, sig).double().detach().numpy()[:, 0]
    spy1 = SpyModel("one")
    D1 = EDMPrecond(spy1, img_channels=1, sigma_data=SIGMA_D)(x, sig).double().detach().numpy()[:, 0]
    c_in = spy0.seen[0].double().numpy()[:, 0]          # x = 1 so x_in = c_in
    c_noise = _per_sample_c_noise(spy0.seen[1], B)
    c_skip = D0                                          # F ≡ 0, x = 1
    c_out = D1 - D0                                      # F ≡ 1

    # c_in² (σ² + σ_d²) = 1
    np.testing.assert_allclose(c_in**2 * (s**2 + SIGMA_D**2), np.ones(B), rtol=1e-6)
    # c_noise = ln σ / 4
    np.testing.assert_allclose(c_noise, np.log(s) / 4, rtol=1e-6, atol=1e-7)
    # The F-target (x0 − c_skip·(x0 + σn))/c_out has unit variance for x0 ~ N(0, σ_d²):
    target_var = ((1 - c_skip) ** 2 * SIGMA_D**2 + c_skip**2 * s**2) / c_out**2
    np.testing.assert_allclose(target_var, np.ones(B), rtol=1e-5)
    # The effective network input c_in·(x0 + σn) also has unit variance.
    np.testing.assert_allclose(c_in**2 * (SIGMA_D**2 + s**2), np.ones(B), rtol=1e-6)
    # and the closed forms themselves
    np.testing.assert_allclose(c_skip, SIGMA_D**2 / (s**2 + SIGMA_D**2), rtol=1e-6)
    np.testing.assert_allclose(c_out, s * SIGMA_D / np.sqrt(s**2 + SIGMA_D**2), rtol=1e-5)


def test_precond_zero_network_is_exact_gaussian_denoiser():
    """F ≡ 0 ⇒ D is the Bayes denoiser of N(0, σ_d² I): D = σ_d²/(σ_d²+σ²)·x. Check it also empirically."""
    g = torch.Generator().manual_seed(3)
    net = EDMPrecond(SpyModel("zero"), img_channels=4, sigma_data=SIGMA_D)
    for sigma in [0.1, 0.5, 2.0, 10.0]:
        x0 = torch.randn(50_000, 4, generator=g, dtype=torch.float64) * SIGMA_D
        x = x0 + sigma * torch.randn(50_000, 4, generator=g, dtype=torch.float64)
        D = net(x, torch.full((50_000,), sigma, dtype=torch.float64)).double().detach()
        np.testing.assert_allclose(D.numpy(), (SIGMA_D**2 / (SIGMA_D**2 + sigma**2)) * x.numpy(),
                                   rtol=1e-6, atol=1e-7)
        # Bayes-optimal MSE for Gaussian data: σ_d²σ²/(σ_d²+σ²)
        mse = ((D - x0) ** 2).mean().item()
        opt = SIGMA_D**2 * sigma**2 / (SIGMA_D**2 + sigma**2)
        assert abs(mse / opt - 1) < 0.02, (sigma, mse, opt)


def test_precond_small_sigma_is_identity():
    torch.manual_seed(4)
    net = EDMPrecond(SpyModel(), img_channels=3, sigma_data=SIGMA_D)
    x = torch.randn(6, 3, dtype=torch.float64)
    for sigma in [1e-4, 1e-6]:
        D = net(x, torch.full((6,), sigma, dtype=torch.float64)).double().detach()
        # |D − x| ≤ (1 − c_skip)|x| + c_out·|F| ≤ σ²/σ_d²·|x| + σ·(1.1 + 0.3|c_noise||x_in|) < 1e-2·σ^{0.9}
        err = (D - x).abs().max().item()
        assert err < 20 * sigma, (sigma, err)
    D = net(x, torch.full((6,), 1e-6, dtype=torch.float64)).double().detach()
    np.testing.assert_allclose(D.numpy(), x.numpy(), atol=1e-4)


def test_precond_class_conditional_labels():
    torch.manual_seed(5)
    spy = SpyModel()
    net = EDMPrecond(spy, img_channels=2, label_dim=3, sigma_data=SIGMA_D)
    x = torch.randn(4, 2)
    sig = torch.tensor([0.1, 1.0, 5.0, 40.0])
    with pytest.raises(ValueError):
        net(x, sig)
    with pytest.raises(ValueError):
        net(x, sig, labels=None)
    labels = torch.eye(3)[[0, 2, 1, 2]]
    D = net(x, sig, labels=labels)
    assert spy.seen[2] is not None
    np.testing.assert_allclose(spy.seen[2].double().numpy(), labels.double().numpy())
    assert D.shape == x.shape and torch.isfinite(D).all()


# ----------------------------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------------------------

def test_karras_sigmas_formula_and_properties():
    for N in [2, 5, 18, 40]:
        s = karras_sigmas(N, sigma_min=0.002, sigma_max=80.0, rho=7.0, append_zero=True)
        s = torch.as_tensor(s).double().numpy()
        assert s.shape == (N + 1,)
        np.testing.assert_allclose(s, ref_karras(N), rtol=1e-12, atol=0)
        assert s[-1] == 0.0
        assert np.all(np.diff(s) < 0), "strictly decreasing"
        assert s[0] == pytest.approx(80.0, rel=1e-12)
        assert s[N - 1] == pytest.approx(0.002, rel=1e-12)
        s2 = torch.as_tensor(karras_sigmas(N, append_zero=False)).double().numpy()
        assert s2.shape == (N,)
        np.testing.assert_allclose(s2, ref_karras(N, zero=False), rtol=1e-12)
    # other parameters
    s = torch.as_tensor(karras_sigmas(10, sigma_min=0.01, sigma_max=10.0, rho=3.0)).double().numpy()
    np.testing.assert_allclose(s, ref_karras(10, 0.01, 10.0, 3.0), rtol=1e-12)


def test_karras_sigmas_n1000_reference_values():
    s = torch.as_tensor(karras_sigmas(1000)).double().numpy()
    assert s.shape == (1001,)
    rev = s[:-1][::-1]  # j = 0 is the smallest
    table = {0: 0.002, 20: 0.00323, 249: 0.168, 499: 2.50, 749: 17.5, 980: 72.05, 999: 80.0}
    for j, v in table.items():
        assert rev[j] == pytest.approx(v, rel=2.5e-3), (j, rev[j], v)


def test_lognormal_sigma_distribution():
    n = 200_000
    g = torch.Generator().manual_seed(123)
    s = sample_lognormal_sigma(n, p_mean=-1.2, p_std=1.2, generator=g)
    s = torch.as_tensor(s).double().numpy()
    assert s.shape == (n,)
    assert np.all(s > 0) and np.all(np.isfinite(s))
    ls = np.log(s)
    se = 1.2 / math.sqrt(n)
    assert abs(ls.mean() - (-1.2)) < 5 * se
    assert abs(ls.std() - 1.2) < 5 * 1.2 / math.sqrt(2 * n)
    assert stats.kstest(ls, "norm", args=(-1.2, 1.2)).pvalue > 1e-3
    # a wrong location is clearly rejected (sanity of the KS check itself)
    assert stats.kstest(ls, "norm", args=(-1.1, 1.2)).pvalue < 1e-6
    # other parameters
    s2 = torch.as_tensor(sample_lognormal_sigma(50_000, p_mean=0.4, p_std=0.5,
                                                generator=torch.Generator().manual_seed(7))).double().numpy()
    assert stats.kstest(np.log(s2), "norm", args=(0.4, 0.5)).pvalue > 1e-3
    # reproducible from the generator
    a = sample_lognormal_sigma(100, generator=torch.Generator().manual_seed(9))
    b = sample_lognormal_sigma(100, generator=torch.Generator().manual_seed(9))
    assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))


# ----------------------------------------------------------------------------------------------------------------
# Samplers: NFE
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("N", [1, 2, 5, 18])
def test_nfe_counts(N):
    noise = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    sig = karras_sigmas(N)
    for fn, expected in [(heun_sampler, 2 * N - 1), (euler_sampler, N), (ddim_sampler, N)]:
        D = nonlinear_denoiser()
        x, nfe = fn(D, noise, sig)
        assert D.calls == expected, (fn.__name__, N, D.calls)
        assert int(nfe) == expected, (fn.__name__, N, nfe)
        assert x.shape == noise.shape and torch.isfinite(x).all()
    # first call sees x = noise·σ_0 at σ_0 = 80
    D = nonlinear_denoiser()
    heun_sampler(D, noise, sig)
    x_first, s_first = D.inputs[0]
    np.testing.assert_allclose(x_first.double().numpy(), noise.double().numpy() * 80.0, rtol=1e-6)
    assert float(s_first.reshape(-1)[0]) == pytest.approx(80.0)


def test_heun_nfe_without_trailing_zero():
    """N positive σ's and no zero: N−1 steps, all second order → 2(N−1) evaluations."""
    noise = torch.randn(4, 2)
    for N in [2, 6, 18]:
        D = nonlinear_denoiser()
        _, nfe = heun_sampler(D, noise, karras_sigmas(N, append_zero=False))
        assert D.calls == 2 * (N - 1) == int(nfe)


@pytest.mark.parametrize("K", [1, 2, 4])
def test_multistep_nfe(K):
    noise = torch.randn(8, 2)
    sig = [80.0, 17.5, 2.5, 0.168][:K]
    for sl in (sig, sig + [0.0]):
        D = nonlinear_denoiser()
        _, nfe = multistep_sampler(D, noise, sl, generator=torch.Generator().manual_seed(0))
        assert D.calls == K == int(nfe)


def test_teacher_sigmas_and_sample_dispatch():
    s = torch.as_tensor(teacher_sigmas("heun", 35)).double().numpy()
    np.testing.assert_allclose(s, ref_karras(18), rtol=1e-12)
    s = torch.as_tensor(teacher_sigmas("euler", 10)).double().numpy()
    np.testing.assert_allclose(s, ref_karras(10), rtol=1e-12)
    s = torch.as_tensor(teacher_sigmas("ddim", 7)).double().numpy()
    np.testing.assert_allclose(s, ref_karras(7), rtol=1e-12)
    with pytest.raises(ValueError):
        teacher_sigmas("heun", 34)
    with pytest.raises(ValueError):
        teacher_sigmas("heun", 0)
    noise = torch.randn(4, 2)
    for name, nfe in [("heun", 35), ("heun", 9), ("euler", 12), ("ddim", 5)]:
        D = nonlinear_denoiser()
        _, got = sample(D, noise, sampler=name, nfe=nfe)
        assert D.calls == nfe == int(got), (name, nfe, D.calls, got)


# ----------------------------------------------------------------------------------------------------------------
# Samplers: analytic Gaussian oracle
# ----------------------------------------------------------------------------------------------------------------
#
# For data N(0, c² I), D(x; σ) = c²/(c²+σ²)·x, the PF-ODE is dx/dσ = f(σ)·x with f(σ) = σ/(c²+σ²), whose exact
# solution is x(σ) = x(σ_max)·√((c²+σ²)/(c²+σ_max²)).  Because the ODE is linear and scalar, every solver step is
# multiplication by a scalar that can be written in closed form from the definition of the method:
#   Euler  step a→b (h = b−a): g = 1 + h·f(a)
#   Heun   step a→b, b > 0   : g = 1 + h/2·(f(a) + f(b)(1 + h·f(a)))
#   final Euler step a→0     : g = 1 − a·f(a) = c²/(c²+a²)
# The product of these factors is the exact discrete answer; the exact ODE answer bounds its truncation error.

def f_ode(s, c):
    return s / (c * c + s * s)


def discrete_gain(sigmas, c, method):
    g = 1.0
    for a, b in zip(sigmas[:-1], sigmas[1:]):
        h = b - a
        eul = 1 + h * f_ode(a, c)
        if method == "heun" and b > 0:
            g *= 1 + h / 2 * (f_ode(a, c) + f_ode(b, c) * eul)
        else:
            g *= eul
    return g


def exact_gain(smax, s_end, c):
    return math.sqrt((c * c + s_end**2) / (c * c + smax**2))


@pytest.mark.parametrize("c", [0.5, 1.0, 2.0])
def test_heun_gaussian_lands_on_exact_solution(c):
    n = 10_000
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(11))
    sig = ref_karras(18)
    x, nfe = heun_sampler(gaussian_denoiser(c), noise, karras_sigmas(18))
    assert int(nfe) == 35
    got_gain = (x.double() / (noise.double() * 80.0))
    # (i) the sampler is exactly Heun's method: matches the closed-form discrete propagator to fp32 precision
    g_disc = discrete_gain(sig, c, "heun")
    np.testing.assert_allclose(got_gain.numpy(), np.full(got_gain.shape, g_disc), rtol=1e-4)
    # (ii) it lands on the exact ODE solution x(0) = x_T·c/√(c²+σ_max²) up to the truncation error of 18-step
    # Heun on this grid. That error is |g_disc/g_exact − 1| ≈ 3.6–5.5 % for c ∈ [0.5, 2] (rises as c shrinks);
    # we allow 6 %.
    g_exact = exact_gain(80.0, 0.0, c)
    trunc = abs(g_disc / g_exact - 1)
    assert trunc < 0.06
    rel = (got_gain / g_exact - 1).abs().max().item()
    assert rel < 0.06, rel
    # (iii) marginal reached: std of the samples ≈ c (truncation + sampling error of std, ~1/√(2n) = 0.5 %)
    std = x.double().std().item()
    assert abs(std / c - 1) < 0.06 + 4 / math.sqrt(2 * x.numel()), (std, c)


def test_heun_gaussian_fine_grid_tight():
    """With 256 steps the Heun truncation error (≈ 5e-4 relative) is small, so the marginal is matched tightly."""
    c = 0.5
    noise = torch.randn(4_000, 2, generator=torch.Generator().manual_seed(12))
    x, nfe = heun_sampler(gaussian_denoiser(c), noise, karras_sigmas(256))
    assert int(nfe) == 511
    g_exact = exact_gain(80.0, 0.0, c)
    rel = (x.double() / (noise.double() * 80.0) / g_exact - 1).abs().max().item()
    assert rel < 1e-3, rel


def _rel_err_to_smin(fn, N, c):
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(13))
    x, _ = fn(gaussian_denoiser(c), noise, karras_sigmas(N, append_zero=False))
    g = (x.double() / (noise.double() * 80.0))
    g_exact = exact_gain(80.0, 0.002, c)
    # all samples share the same scalar gain
    assert (g - g.mean()).abs().max().item() < 1e-5 * abs(g.mean().item())
    return abs(g.mean().item() / g_exact - 1)


@pytest.mark.parametrize("c", [0.5, 2.0])
def test_heun_second_order_convergence(c):
    e16, e32, e64 = (_rel_err_to_smin(heun_sampler, N, c) for N in (16, 32, 64))
    for N, e in [(16, e16), (32, e32), (64, e64)]:
        g_disc = discrete_gain(list(ref_karras(N, zero=False)), c, "heun")
        assert e == pytest.approx(abs(g_disc / exact_gain(80.0, 0.002, c) - 1), rel=1e-2)
    assert e16 / e32 > 3.5, (e16, e32)
    assert e32 / e64 > 3.5, (e32, e64)


@pytest.mark.parametrize("c", [0.5, 2.0])
def test_euler_and_ddim_first_order_convergence(c):
    for fn in (euler_sampler, ddim_sampler):
        e32, e64, e128 = (_rel_err_to_smin(fn, N, c) for N in (32, 64, 128))
        for N, e in [(32, e32), (64, e64)]:
            g_disc = discrete_gain(list(ref_karras(N, zero=False)), c, "euler")
            assert e == pytest.approx(abs(g_disc / exact_gain(80.0, 0.002, c) - 1), rel=1e-2)
        assert 1.8 < e32 / e64 < 2.2, (fn.__name__, e32, e64)
        assert 1.8 < e64 / e128 < 2.2, (fn.__name__, e64, e128)


def test_euler_gaussian_final_step_is_denoiser():
    """Euler's last step to σ = 0 returns exactly D(x; σ_min)."""
    c = 1.0
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(14))
    x, _ = euler_sampler(gaussian_denoiser(c), noise, karras_sigmas(10))
    g = discrete_gain(list(ref_karras(10)), c, "euler")
    np.testing.assert_allclose(x.double().numpy(), noise.double().numpy() * 80.0 * g, rtol=1e-4)


def test_ddim_equals_euler_step_by_step():
    noise = torch.randn(32, 3, generator=torch.Generator().manual_seed(15))
    sig = karras_sigmas(12)
    n_sig = len(torch.as_tensor(sig))
    for k in range(2, n_sig + 1):
        part = torch.as_tensor(sig)[:k]
        xe, ne = euler_sampler(nonlinear_denoiser(), noise, part)
        xd, nd = ddim_sampler(nonlinear_denoiser(), noise, part)
        assert int(ne) == int(nd) == k - 1
        scale = max(1.0, xe.abs().max().item())
        diff = (xe - xd).abs().max().item()
        assert diff <= 1e-6 * scale, (k, diff, scale)
    # and a hand-written Euler reference (float64) for the full grid
    s = ref_karras(12)
    D = nonlinear_denoiser()
    x = noise.double() * s[0]
    for a, b in zip(s[:-1], s[1:]):
        d = (x - D.fn(x, torch.tensor(a, dtype=torch.float64))) / a
        x = x + (b - a) * d
    xd, _ = ddim_sampler(nonlinear_denoiser(), noise, sig)
    np.testing.assert_allclose(xd.double().numpy(), x.numpy(), rtol=1e-4, atol=1e-4)


def test_heun_matches_handwritten_reference_nonlinear():
    noise = torch.randn(32, 3, generator=torch.Generator().manual_seed(16))
    s = ref_karras(8)
    D = nonlinear_denoiser()
    x = noise.double() * s[0]
    for a, b in zip(s[:-1], s[1:]):
        d = (x - D.fn(x, torch.tensor(a, dtype=torch.float64))) / a
        xn = x + (b - a) * d
        if b > 0:
            d2 = (xn - D.fn(xn, torch.tensor(b, dtype=torch.float64))) / b
            xn = x + (b - a) * 0.5 * (d + d2)
        x = xn
    xh, nfe = heun_sampler(nonlinear_denoiser(), noise, karras_sigmas(8))
    assert int(nfe) == 15
    np.testing.assert_allclose(xh.double().numpy(), x.numpy(), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# Multistep (student) sampler
# ----------------------------------------------------------------------------------------------------------------

def test_multistep_constant_generator_returns_x0():
    x0 = torch.tensor([0.25, -1.5, 3.0])
    noise = torch.randn(10, 3, generator=torch.Generator().manual_seed(20))
    for sl in ([80.0], [80.0, 17.5, 2.5, 0.168], [80.0, 17.5, 2.5, 0.168, 0.0], [80.0, 1.0, 0.0]):
        G = ToyDenoiser(lambda x, s: x0.to(x.dtype).expand_as(x).clone(), img_channels=3)
        x, nfe = multistep_sampler(G, noise, sl, generator=torch.Generator().manual_seed(1))
        np.testing.assert_allclose(x.double().numpy(), x0.double().expand(10, 3).numpy(), rtol=0, atol=1e-6)


def test_multistep_renoise_scale():
    """Input at step k is x̂ + σ_k·ε with ε ~ N(0, I): check it against a constant x̂ with a large batch."""
    x0 = torch.tensor([0.25, -1.5])
    n = 40_000
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(21))
    sl = [80.0, 17.5, 2.5, 0.168]
    G = ToyDenoiser(lambda x, s: x0.to(x.dtype).expand_as(x).clone())
    multistep_sampler(G, noise, sl, generator=torch.Generator().manual_seed(2))
    assert len(G.inputs) == 4
    np.testing.assert_allclose(G.inputs[0][0].double().numpy(), noise.double().numpy() * 80.0, rtol=1e-6)
    for k in range(1, 4):
        xin, s = G.inputs[k]
        assert float(s.reshape(-1)[0]) == pytest.approx(sl[k])
        eps = ((xin.double() - x0.double()) / sl[k]).numpy().ravel()
        assert abs(eps.mean()) < 5 / math.sqrt(eps.size)
        assert abs(eps.std() - 1) < 5 / math.sqrt(2 * eps.size)
        # fresh noise, not the initial noise
        assert abs(np.corrcoef(eps, noise.numpy().ravel())[0, 1]) < 0.05


def test_multistep_one_step_equals_denoiser():
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(22))
    for sl in ([80.0], [80.0, 0.0], [3.0]):
        D = nonlinear_denoiser()
        x, nfe = multistep_sampler(D, noise, sl, generator=torch.Generator().manual_seed(0))
        xin = noise * sl[0]
        ref = D.fn(xin.double(), torch.tensor(sl[0], dtype=torch.float64))
        np.testing.assert_allclose(x.double().numpy(), ref.numpy(), rtol=1e-5, atol=1e-6)
        assert int(nfe) == 1
        # K = 1 uses no fresh noise: the seed is irrelevant
        x2, _ = multistep_sampler(nonlinear_denoiser(), noise, sl, generator=torch.Generator().manual_seed(99))
        assert torch.equal(x, x2)


def test_multistep_generator_controls_renoise():
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(23))
    sl = [80.0, 17.5, 2.5, 0.168]
    torch.manual_seed(100)
    a, _ = multistep_sampler(nonlinear_denoiser(), noise, sl, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(200)  # the global RNG must not matter
    b, _ = multistep_sampler(nonlinear_denoiser(), noise, sl, generator=torch.Generator().manual_seed(5))
    c, _ = multistep_sampler(nonlinear_denoiser(), noise, sl, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert (a - c).abs().max().item() > 1e-3
    # hand-written two-step reference using the same generator stream for ε
    D = nonlinear_denoiser()
    g = torch.Generator().manual_seed(7)
    x, _ = multistep_sampler(D, noise, [80.0, 2.0], generator=g)
    xin1, _ = D.inputs[1]
    xhat0 = D.fn(noise.double() * 80.0, torch.tensor(80.0, dtype=torch.float64))
    eps = (xin1.double() - xhat0) / 2.0
    assert abs(eps.std().item() - 1) < 0.35  # 32 draws: loose, the scale test above is the tight one
    np.testing.assert_allclose(x.double().numpy(), D.fn(xin1.double(), torch.tensor(2.0, dtype=torch.float64)).numpy(),
                               rtol=1e-5, atol=1e-6)


def test_multistep_per_sample_generators_are_batch_independent():
    """With one generator per sample, a sample's result depends on its own seed only (not on the batch)."""
    noise = torch.randn(3, 2, generator=torch.Generator().manual_seed(24))
    sl = [80.0, 17.5, 2.5, 0.168]
    gens = [torch.Generator().manual_seed(s) for s in (10, 11, 12)]
    full, _ = multistep_sampler(nonlinear_denoiser(), noise, sl, generator=gens)
    for i, s in enumerate((10, 11, 12)):
        one, _ = multistep_sampler(nonlinear_denoiser(), noise[i:i + 1], sl, generator=[torch.Generator().manual_seed(s)])
        np.testing.assert_allclose(one.numpy(), full[i:i + 1].numpy(), rtol=1e-6, atol=1e-6)
    assert (full[0] - full[1]).abs().max().item() > 1e-3
