"""EDM's stochastic sampler (Karras et al. 2022, Algorithm 2; issue 20, item 7).

The oracle below is our own re-computation of what NVlabs/edm ``generate.py`` (commit 008a4e5) computes in
``edm_sampler`` (lines 25-60), written from reading it, not copied:

* the grid, lines 31-37: σ_min/σ_max clipped to the net's support; t_i = (σ_max^{1/ρ} + i/(N−1)·(σ_min^{1/ρ} −
  σ_max^{1/ρ}))^ρ, i = 0..N−1, in float64, passed through ``net.round_sigma`` (the identity for EDMPrecond,
  training/networks.py:670-671), then t_N = 0;
* x_0 = latents·t_0 in float64 (line 40);
* per step i (lines 41-58): γ_i = min(S_churn/N, √2 − 1) if S_min ≤ t_i ≤ S_max else 0 (45); t̂ = round_sigma(t_i +
  γ_i·t_i) (46); x̂ = x_i + √(t̂² − t_i²)·S_noise·ε with ε = ``randn_like(x_cur)`` drawn at every step, used or not
  (47); an Euler step from t̂ to t_{i+1} with the net's output cast to float64 (50-52); the 2nd-order correction
  for i < N − 1, i.e. not on the last step into t_N = 0 (55-58);
* the noise: ``StackedRandomGenerator.randn_like`` (lines 191-192) draws one ``torch.randn`` per sample from that
  sample's generator in the dtype of its input, float64 here; the latents were drawn first, in float32 (282).

EDM's net sees x and σ in float32 (EDMPrecond.forward casts both, training/networks.py:655-656); the test
denoisers do the same at their boundary, so our sampler and the oracle call them on the same values.
"""

import math

import numpy as np
import pytest
import torch
from torch import nn

from diffdistill.cli import main
from diffdistill.diffusion.samplers import (
    CHURN_DEFAULTS,
    NFECounter,
    churn_settings,
    heun_sampler,
    sample,
    stochastic_sampler,
    teacher_nfe,
    teacher_sigmas,
    teacher_steps,
)
from diffdistill.diffusion.schedules import karras_sigmas
from diffdistill.errors import UserError
from diffdistill.eval.evaluate import describe_spec, sampling_spec_for
from diffdistill.eval.generate import generate, seeded_generators

IMAGENET64 = {"s_churn": 40.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.003}   # EDM README, ImageNet-64


def _sigma32(sigma, x):
    """σ as EDM's net sees it: float32, one per sample, broadcast over x (networks.py:656)."""
    s = torch.as_tensor(sigma).to(torch.float32).reshape(-1)
    return s.expand(x.shape[0]).reshape((-1,) + (1,) * (x.ndim - 1))


class GaussianDenoiser(nn.Module):
    """The exact denoiser of data N(0, c²I): D(x; σ) = x·c²/(c² + σ²), computed in the dtype of x."""

    def __init__(self, c, shape):
        super().__init__()
        self.c, self.sample_shape, self.label_dim = c, shape, 0
        self.sigma_min, self.sigma_max = 0.002, 80.0

    def forward(self, x, sigma, labels=None):
        s = _sigma32(sigma, x).to(x.dtype)
        return x * (self.c ** 2 / (self.c ** 2 + s ** 2))


class TinyMLPDenoiser(nn.Module):
    """A random 2-layer MLP F inside EDM's preconditioning, D = c_skip·x + c_out·F(c_in·x, ¼ ln σ), in float32."""

    def __init__(self, dim=20, hidden=16, seed=0, sd=0.5):   # ≥ 16 numbers: float64 and float32 draws differ
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = nn.Parameter(torch.randn(dim + 1, hidden, generator=g))
        self.b1 = nn.Parameter(torch.randn(hidden, generator=g))
        self.w2 = nn.Parameter(torch.randn(hidden, dim, generator=g) / hidden ** 0.5)
        self.sd, self.sample_shape, self.label_dim = sd, (dim,), 0
        self.sigma_min, self.sigma_max = 0.002, 80.0

    def forward(self, x, sigma, labels=None):
        x = x.to(torch.float32)
        s = _sigma32(sigma, x)
        sd2 = self.sd ** 2
        c_skip, c_out, c_in = sd2 / (s ** 2 + sd2), s * self.sd / (s ** 2 + sd2).sqrt(), 1 / (s ** 2 + sd2).sqrt()
        h = torch.tanh(torch.cat([c_in * x, (s.log() / 4).expand(-1, 1)], 1) @ self.w1 + self.b1)
        return c_skip * x + c_out * (h @ self.w2)


def edm_algorithm2_reference(net, seeds, num_steps, S_churn, S_min, S_max, S_noise, rho=7.0):
    """What edm_sampler (generate.py:25-60) computes for these seeds, latents included (module docstring)."""
    gens = [torch.Generator().manual_seed(s % (1 << 32)) for s in seeds]
    latents = torch.stack([torch.randn(tuple(net.sample_shape), generator=g) for g in gens])   # float32, line 282
    smin, smax = max(0.002, net.sigma_min), min(80.0, net.sigma_max)
    i = np.arange(num_steps, dtype=np.float64)
    t = (smax ** (1 / rho) + i / (num_steps - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    t = [float(v) for v in t] + [0.0]
    x = latents.to(torch.float64) * t[0]
    for k in range(num_steps):
        t_cur, t_next = t[k], t[k + 1]
        eps = torch.stack([torch.randn(tuple(x.shape[1:]), generator=g, dtype=torch.float64) for g in gens])
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0.0
        t_hat = t_cur * (1 + gamma)
        x_hat = x + math.sqrt(t_hat ** 2 - t_cur ** 2) * S_noise * eps
        slope = (x_hat - net(x_hat, torch.tensor(t_hat, dtype=torch.float64)).to(torch.float64)) / t_hat
        x = x_hat + (t_next - t_hat) * slope
        if k < num_steps - 1:
            slope2 = (x - net(x, torch.tensor(t_next, dtype=torch.float64)).to(torch.float64)) / t_next
            x = x_hat + (t_next - t_hat) * (slope + slope2) / 2
    return x, latents


def _ours(net, seeds, num_steps, dtype, **opts):
    gens = seeded_generators(seeds)
    latents = torch.stack([torch.randn(tuple(net.sample_shape), generator=g) for g in gens])
    x, nfe = stochastic_sampler(net, latents.to(dtype), karras_sigmas(num_steps), generator=gens, **opts)
    return x, nfe


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


NETS = {"gaussian": lambda: GaussianDenoiser(0.5, (2, 4, 4)), "mlp": lambda: TinyMLPDenoiser()}
SETTINGS = [IMAGENET64, {"s_churn": 3.0, "s_tmin": 0.0, "s_tmax": math.inf, "s_noise": 1.0},
            {"s_churn": 5.0, "s_tmin": 0.3, "s_tmax": 2.0, "s_noise": 1.01}]


@pytest.mark.parametrize("net_name", sorted(NETS))
@pytest.mark.parametrize("opts", SETTINGS, ids=["imagenet64", "uncapped", "window"])
def test_matches_edm_algorithm2_on_the_same_seeds(net_name, opts):
    """Float64 run vs the oracle; γ capped at √2−1 (40/18), uncapped (3/18) and a churn window inside the grid."""
    net, seeds, N = NETS[net_name](), [0, 7, 123, 2 ** 32 + 5], 18
    want, _ = edm_algorithm2_reference(net, seeds, N, opts["s_churn"], opts["s_tmin"], opts["s_tmax"],
                                       opts["s_noise"])
    got, nfe = _ours(net, seeds, N, torch.float64, **opts)
    assert nfe == 2 * N - 1
    assert got.dtype == torch.float64 and _rel(got, want) <= 1e-6, _rel(got, want)
    # the float32 run that generate() makes stays within float32 round-off of it
    got32, _ = _ours(net, seeds, N, torch.float32, **opts)
    assert got32.dtype == torch.float32 and _rel(got32, want) <= 1e-5, _rel(got32, want)
    # and churn changed the result: the comparison is not Heun against Heun
    heun, _ = edm_algorithm2_reference(net, seeds, N, 0.0, 0.0, math.inf, 1.0)
    assert _rel(heun, want) > 1e-3


def test_generate_reproduces_edm_seeds():
    """Through generate() (float32 latents, then the sampler's draws from the same per-seed generators)."""
    net = TinyMLPDenoiser(seed=1)
    seeds = [3, 4, 1000]
    want, _ = edm_algorithm2_reference(net, seeds, 18, S_churn=40, S_min=0.05, S_max=50, S_noise=1.003)
    got, _, info = generate(net, seeds, {"sampler": "stochastic", "nfe": 35, "sampler_options": IMAGENET64})
    assert info["nfe"] == 35 and _rel(got, want) <= 1e-4


def test_zero_churn_is_heun_bit_for_bit():
    net, noise = TinyMLPDenoiser(seed=2), torch.randn(9, 20, generator=torch.Generator().manual_seed(5))
    sig = karras_sigmas(18)
    heun, nfe_h = heun_sampler(net, noise, sig)
    gens = seeded_generators(range(9))
    for opts in ({}, {"s_churn": 0.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.003},
                 {"s_churn": 40.0, "s_tmin": 100.0, "s_tmax": 200.0}):   # churn but no σ of the grid in the window
        x, nfe = stochastic_sampler(net, noise, sig, generator=gens, **opts)
        assert torch.equal(x, heun) and nfe == nfe_h == 35
    # the dispatcher with no options (EDM generate.py's defaults) is Heun too
    assert torch.equal(sample(net, noise, "stochastic", nfe=35, generator=gens)[0], sample(net, noise, "heun", nfe=35)[0])
    # float64 noise runs both in float64, still identical
    assert torch.equal(stochastic_sampler(net, noise.double(), sig)[0], heun_sampler(net, noise.double(), sig)[0])


@pytest.mark.parametrize("N", [1, 2, 5, 18])
def test_nfe_count(N):
    noise = torch.randn(4, 20, generator=torch.Generator().manual_seed(N))
    D = NFECounter(TinyMLPDenoiser())
    _, nfe = stochastic_sampler(D, noise, karras_sigmas(N), generator=seeded_generators(range(4)), **IMAGENET64)
    assert nfe == D.nfe == 2 * N - 1
    _, nfe = sample(TinyMLPDenoiser(), noise, "stochastic", nfe=2 * N - 1, generator=seeded_generators(range(4)),
                    options=IMAGENET64)
    assert nfe == 2 * N - 1
    assert teacher_nfe("stochastic", N) == 2 * N - 1 and teacher_steps("stochastic", 2 * N - 1) == N
    assert torch.equal(teacher_sigmas("stochastic", 2 * N - 1), teacher_sigmas("heun", 2 * N - 1))
    with pytest.raises(ValueError):
        teacher_sigmas("stochastic", 2 * N)


def test_a_sample_depends_on_its_own_seed_only():
    net = GaussianDenoiser(0.5, (2, 4, 4))
    spec = {"sampler": "stochastic", "nfe": 35, "sampler_options": IMAGENET64}
    a, _, _ = generate(net, range(10), spec, batch_size=10)
    b, _, _ = generate(net, range(10), spec, batch_size=3)
    c, _, _ = generate(net, [4, 99, 6], spec)
    assert torch.equal(a, b) and torch.equal(a[4], c[0]) and torch.equal(a[6], c[2])
    assert not torch.equal(a[5], c[1])
    # the MLP (batched matmuls) agrees to float32 round-off across batch sizes
    net = TinyMLPDenoiser()
    a, _, _ = generate(net, range(10), spec, batch_size=10)
    b, _, _ = generate(net, [7], spec)
    assert torch.allclose(a[7], b[0], rtol=1e-5, atol=1e-6)


def _f(s, c):
    return s / (c * c + s * s)


def predicted_std(sigmas, c, s_churn, s_tmin, s_tmax, s_noise):
    """Exact output std of Algorithm 2 on data N(0, c²) with the exact denoiser: the ODE is linear, so the noise
    step adds (σ̂² − σ²)·S_noise² to the variance and the Heun step σ̂ → σ' multiplies x by the closed-form gain
    1 + h/2·(f(σ̂) + f(σ')(1 + h f(σ̂))), h = σ' − σ̂, f(σ) = σ/(c² + σ²) (1 + h f(σ̂) into σ' = 0)."""
    n = len(sigmas) - 1
    gamma = min(s_churn / n, math.sqrt(2) - 1)
    var = sigmas[0] ** 2
    for a, b in zip(sigmas[:-1], sigmas[1:]):
        a_hat = a * (1 + (gamma if s_tmin <= a <= s_tmax else 0.0))
        var += (a_hat ** 2 - a ** 2) * s_noise ** 2
        h = b - a_hat
        euler = 1 + h * _f(a_hat, c)
        var *= (1 + h / 2 * (_f(a_hat, c) + _f(b, c) * euler) if b > 0 else euler) ** 2
    return math.sqrt(var)


@pytest.mark.parametrize("c", [0.5, 2.0])
def test_one_dimensional_gaussian_output_std(c):
    """On N(0, c²) with its exact denoiser: (i) the measured std is the exact discrete prediction (any error in γ,
    σ̂, the noise scale or the step would move it); (ii) with EDM's ImageNet-64 churn at 256 steps (γ = 40/256)
    and S_noise = 1 the output std is the data std c within 1 %."""
    n = 200_000
    se = 4 / math.sqrt(2 * n)   # 4 standard errors of a sample std
    for N, opts in [(18, IMAGENET64), (18, {"s_churn": 2.0}), (256, {**IMAGENET64, "s_noise": 1.0})]:
        full = {**CHURN_DEFAULTS, **opts}
        g = torch.Generator().manual_seed(N)
        noise = torch.randn(n, 1, generator=g)
        sig = karras_sigmas(N)
        x, _ = stochastic_sampler(GaussianDenoiser(c, (1,)), noise, sig, generator=g, **opts)
        want = predicted_std(sig.tolist(), c, full["s_churn"], full["s_tmin"], full["s_tmax"], full["s_noise"])
        std = x.double().std().item()
        assert abs(std / want - 1) < se, (N, opts, std, want)
        if N == 256:
            assert abs(want / c - 1) < 0.01 and abs(std / c - 1) < 0.01 + se, (want, std, c)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("opts,needle", [
    ({"s_churn": -1.0}, "s_churn (--s-churn) must be a finite number >= 0, got -1.0"),
    ({"s_churn": math.inf}, "s_churn (--s-churn) must be a finite number >= 0"),
    ({"s_churn": math.nan}, "s_churn (--s-churn) must be a finite number >= 0"),
    ({"s_noise": 0.0}, "s_noise (--s-noise) must be a finite number > 0, got 0.0"),
    ({"s_noise": -1.003}, "s_noise (--s-noise) must be a finite number > 0"),
    ({"s_tmin": -0.05}, "s_tmin (--s-tmin) must be a finite number >= 0"),
    ({"s_tmin": 1.0, "s_tmax": 0.5}, "s_tmax (--s-tmax) must be >= s_tmin (1.0), got 0.5"),
    ({"s_tmax": math.nan}, "s_tmax (--s-tmax) must be >= s_tmin"),
    ({"s_churn": "lots"}, "s_churn (--s-churn) must be a number, got 'lots'"),
    ({"churn": 40}, "unknown stochastic sampler option(s) churn; known: s_churn, s_tmin, s_tmax, s_noise"),
])
def test_bad_settings_are_refused(opts, needle):
    with pytest.raises(UserError) as e:
        churn_settings(opts)
    assert needle in str(e.value) and "\n" not in str(e.value)
    noise = torch.randn(2, 20)
    with pytest.raises(UserError, match="must be|unknown"):
        sample(TinyMLPDenoiser(), noise, "stochastic", nfe=5, options=opts)
    if "churn" not in opts:
        with pytest.raises(UserError, match="must be"):
            stochastic_sampler(TinyMLPDenoiser(), noise, karras_sigmas(3), **opts)


def test_options_for_a_sampler_without_them_are_refused():
    with pytest.raises(UserError, match=r"sampler 'heun' takes no options \(got s_churn\); they are for "
                                        r"--sampler stochastic"):
        sample(TinyMLPDenoiser(), torch.randn(2, 20), "heun", nfe=5, options={"s_churn": 40.0})


def test_sampling_spec_carries_the_options():
    teacher = {"sampling": {"sampler": "heun", "nfe": 35, "seed_labels": "edm"}}
    spec = sampling_spec_for(teacher, None, "stochastic", {"s_churn": 40.0, "s_noise": 1.003})
    assert spec == {"sampler": "stochastic", "nfe": 35, "seed_labels": "edm",
                    "sampler_options": {"s_churn": 40.0, "s_noise": 1.003}}
    assert sampling_spec_for(teacher, 256, "stochastic")["nfe"] == 511
    assert sampling_spec_for(teacher) == teacher["sampling"]               # old specs are unchanged
    assert sampling_spec_for(teacher, 4, "euler") == {"sampler": "euler", "nfe": 4, "seed_labels": "edm"}
    # a recorded stochastic recipe keeps its options when only --steps or one option changes
    sde = {"sampling": spec}
    assert sampling_spec_for(sde, 256)["sampler_options"] == {"s_churn": 40.0, "s_noise": 1.003}
    assert sampling_spec_for(sde, None, None, {"s_tmin": 0.05})["sampler_options"] == {
        "s_churn": 40.0, "s_noise": 1.003, "s_tmin": 0.05}
    assert "sampler_options" not in sampling_spec_for(sde, None, "heun")
    # metrics record the options as given
    d = describe_spec(spec, TinyMLPDenoiser())
    assert d["sampler"] == "stochastic" and d["sampler_options"] == {"s_churn": 40.0, "s_noise": 1.003}
    assert len(d["sigmas"]) == 19
    with pytest.raises(UserError, match="takes no options"):
        sampling_spec_for(teacher, None, None, {"s_churn": 40.0})           # the checkpoint's heun
    with pytest.raises(UserError, match="s_noise .* must be a finite number > 0"):
        sampling_spec_for(teacher, None, "stochastic", {"s_noise": 0.0})
    with pytest.raises(UserError, match="a student samples with its own recipe"):
        sampling_spec_for({"sampling": {"sampler": "multistep", "sigmas": [80.0]}}, None, None, {"s_churn": 1.0})


SHIPPED = "src/diffdistill/assets/teacher_digits.safetensors"


def test_cli_sample_stochastic(tmp_path, capsys):
    out = tmp_path / "s.npz"
    argv = ["sample", SHIPPED, "--steps", "4", "--seeds", "0-3", "--out", str(out), "--sampler", "stochastic"]
    assert main(argv + ["--s-churn", "40", "--s-tmin", "0.05", "--s-tmax", "50", "--s-noise", "1.003"]) == 0
    assert "NFE 7" in capsys.readouterr().out
    sde = np.load(out)["samples"]
    assert main(argv) == 0                                                  # no churn: the heun sampler
    plain = np.load(out)["samples"]
    assert main(argv[:-2] + ["--sampler", "heun"]) == 0
    assert np.array_equal(plain, np.load(out)["samples"]) and not np.array_equal(plain, sde)


@pytest.mark.parametrize("extra,needle", [
    (["--sampler", "stochastic", "--s-noise", "0"], "s_noise (--s-noise) must be a finite number > 0, got 0.0"),
    (["--sampler", "stochastic", "--s-churn", "-40"], "s_churn (--s-churn) must be a finite number >= 0"),
    (["--sampler", "stochastic", "--s-tmin", "2", "--s-tmax", "1"], "s_tmax (--s-tmax) must be >= s_tmin (2.0)"),
    (["--s-churn", "40"], "sampler 'heun' takes no options (got s_churn); they are for --sampler stochastic"),
    (["--sampler", "stochastic", "--s-churn", "lots"], "argument --s-churn: invalid float value: 'lots'"),
])
@pytest.mark.parametrize("command", ["sample", "eval"])
def test_cli_bad_settings_one_line(command, extra, needle, tmp_path, capsys):
    out = tmp_path / ("s.npz" if command == "sample" else "m.json")
    assert main([command, SHIPPED, "--num-samples", "4", "--out", str(out)] + extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffdistill: error:") and needle in err and len(err.splitlines()) == 1, err
    assert not out.exists()
