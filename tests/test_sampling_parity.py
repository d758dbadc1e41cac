"""Sampling and evaluation parity with the official code (issue 17, items 7 and 10):

* the consistency sampler against a direct transcription of openai/consistency_models ``karras_sample`` with
  ``clip_denoised=True`` (``cm/karras_diffusion.py:352-419``: the denoiser output is clamped to [−1, 1] at every step,
  lines 404-408, and the final sample, line 419; ``sample_onestep`` 643-653, ``stochastic_iterative_sampler``
  657-681), and ``diffdistill sample``'s [−1, 1] promise;
* seeds → latents and class labels as NVlabs/edm ``generate.py`` draws them (``StackedRandomGenerator``,
  generate.py:182-196; latents then labels from the same per-seed generator, 281-285), the default for EDM-pickle
  teachers;
* one uint8 rule, EDM's ``(x·127.5 + 128).clip(0, 255)`` cast to uint8 (generate.py:297), for PNG files, grids and
  the FID path, so a PNG folder scores exactly what ``eval`` scored.
"""

import math

import numpy as np
import pytest
import torch
from torch import nn

from diffdistill.diffusion.samplers import consistency_sampler

T_MIN, T_MAX, RHO, SD = 0.002, 80.0, 7.0, 0.5


# ------------------------------------------------------------------------------------------------ tiny denoiser
class RawNet(nn.Module):
    """A fixed raw network F(x_in, c_noise) = 3·tanh(w·x_in + c_noise) whose outputs often leave [−1, 1]."""

    def __init__(self, shape, seed=0):
        super().__init__()
        self.w = nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2)

    def forward(self, x_in, c_noise):
        return 3 * torch.tanh(self.w * x_in + c_noise.reshape((-1,) + (1,) * (x_in.ndim - 1)))


class TinyEDM(nn.Module):
    """The EDM denoiser D = c_skip·x + c_out·F(c_in·x, ¼ ln σ) around ``RawNet`` (what our samplers call)."""

    def __init__(self, shape, seed=0):
        super().__init__()
        self.F = RawNet(shape, seed)
        self.sample_shape, self.sigma_min, self.sigma_max, self.sigma_data, self.label_dim = shape, T_MIN, T_MAX, SD, 0
        self.img_resolution = shape[-1] if len(shape) == 3 else 0

    def forward(self, x, sigma, labels=None):
        s = torch.as_tensor(sigma, dtype=torch.float32).reshape((-1,) + (1,) * (x.ndim - 1))
        c_in = 1 / (s ** 2 + SD ** 2).sqrt()
        return SD ** 2 / (s ** 2 + SD ** 2) * x + s * SD / (s ** 2 + SD ** 2).sqrt() * self.F(c_in * x, s.log() / 4)


def official_denoise(F, x_t, sigmas):
    """cm/karras_diffusion.py:334-349 with distillation=True (boundary scalings, lines 68-78); the official model
    takes t = 1000·¼·ln(σ + 1e-44) (line 346), which our raw net reads as ¼ ln σ."""
    s = sigmas.reshape((-1,) + (1,) * (x_t.ndim - 1))
    c_skip = SD ** 2 / ((s - T_MIN) ** 2 + SD ** 2)
    c_out = (s - T_MIN) * SD / (s ** 2 + SD ** 2) ** 0.5
    c_in = 1 / (s ** 2 + SD ** 2) ** 0.5
    rescaled_t = 1000 * 0.25 * torch.log(sigmas + 1e-44)
    return c_out * F(c_in * x_t, rescaled_t / 1000) + c_skip * x_t


def official_karras_sample(F, z, ts, steps, randn_like, clip_denoised=True):
    """openai/consistency_models karras_sample (karras_diffusion.py:352-419) for sampler 'onestep' (ts None) or
    'multistep' (ts given); written from the file, not copied."""
    x = z * T_MAX                                                       # line 381: x_T = randn · sigma_max
    s_in = torch.ones(x.shape[0])

    def denoiser(x_t, sigma):                                           # lines 404-408
        d = official_denoise(F, x_t, sigma)
        return d.clamp(-1, 1) if clip_denoised else d

    if ts is None:                                                      # sample_onestep, lines 643-653
        x = denoiser(x, T_MAX * s_in)                                   # sigmas[0] = sigma_max
    else:                                                               # stochastic_iterative_sampler, 657-681
        hi, lo = T_MAX ** (1 / RHO), T_MIN ** (1 / RHO)
        for i in range(len(ts) - 1):
            t = (hi + ts[i] / (steps - 1) * (lo - hi)) ** RHO
            x0 = denoiser(x, t * s_in)
            next_t = float(np.clip((hi + ts[i + 1] / (steps - 1) * (lo - hi)) ** RHO, T_MIN, T_MAX))
            x = x0 + randn_like(x) * math.sqrt(next_t ** 2 - T_MIN ** 2)
    return x.clamp(-1, 1)                                               # line 419: always


def per_seed_randn_like(gens):
    return lambda x: torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens])


def _tau(i, steps):
    hi, lo = T_MAX ** (1 / RHO), T_MIN ** (1 / RHO)
    return (hi + i / (steps - 1) * (lo - hi)) ** RHO


@pytest.mark.parametrize("ts", [None, (0, 22, 39), (0, 10, 25, 39)], ids=["onestep", "2-step", "3-step"])
def test_consistency_sampler_matches_official_karras_sample_on_images(ts):
    net = TinyEDM((1, 4, 4))
    z = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    want = official_karras_sample(net.F, z, ts, 40, per_seed_randn_like([torch.Generator().manual_seed(i)
                                                                            for i in range(6)]))
    sigmas = [T_MAX] if ts is None else [_tau(i, 40) for i in ts[:-1]]
    got, nfe = consistency_sampler(net, z, sigmas, generator=[torch.Generator().manual_seed(i) for i in range(6)])
    assert nfe == len(sigmas)
    assert (want.abs() == 1).any()            # the clamp matters for this denoiser
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()


def test_consistency_sampler_on_points_does_not_clamp_unless_asked():
    """2-D points are not in [−1, 1]: by default no clamp (the official clamp is for images); clip_denoised=True
    gives the official computation."""
    net = TinyEDM((2,))
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(2))
    sig = [T_MAX, _tau(22, 40)]
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(64)]  # noqa: E731
    raw = official_karras_sample(net.F, z, (0, 22, 39), 40, per_seed_randn_like(gens()), clip_denoised=False)
    got, _ = consistency_sampler(net, z, sig, generator=gens())
    # the official loop without its clamps (lines 406-407 and 419 left out)
    x0 = official_denoise(net.F, z * T_MAX, torch.full((64,), T_MAX))
    x = x0 + per_seed_randn_like(gens())(x0) * math.sqrt(sig[1] ** 2 - T_MIN ** 2)
    want_raw = official_denoise(net.F, x, torch.full((64,), sig[1]))
    assert torch.allclose(got, want_raw, atol=1e-5) and got.abs().max() > 1
    assert torch.allclose(raw, want_raw.clamp(-1, 1), atol=1e-5)
    clipped, _ = consistency_sampler(net, z, sig, generator=gens(), clip_denoised=True)
    official = official_karras_sample(net.F, z, (0, 22, 39), 40, per_seed_randn_like(gens()))
    assert torch.allclose(clipped, official, atol=1e-5)


# ------------------------------------------------------------------------------------------------ seeds → labels
def edm_stacked_draws(seeds, shape, label_dim):
    """NVlabs/edm generate.py:182-196 (StackedRandomGenerator: torch.Generator per seed, seed mod 2³²) and 281-285
    (latents = rnd.randn([B, C, H, W]), then class_labels = eye(L)[rnd.randint(L, size=[B])]), on the CPU."""
    gens = [torch.Generator("cpu").manual_seed(int(s) % (1 << 32)) for s in seeds]
    latents = torch.stack([torch.randn(shape, generator=g) for g in gens])
    idx = torch.stack([torch.randint(label_dim, size=[], generator=g) for g in gens])
    return latents, torch.eye(label_dim)[idx], gens


class Recorder(nn.Module):
    """A class-conditional denoiser that records the first call's input and labels (and returns zeros)."""

    def __init__(self, shape=(1, 4, 4), label_dim=5):
        super().__init__()
        self.sample_shape, self.label_dim, self.sigma_min, self.sigma_max = shape, label_dim, T_MIN, T_MAX
        self.calls = []

    def forward(self, x, sigma, labels=None):
        self.calls.append((x.clone(), None if labels is None else labels.clone()))
        return torch.zeros_like(x)


SEEDS = [0, 1, 7, 12345, (1 << 32) + 5]


def test_edm_seed_rule_draws_latents_then_labels_like_stacked_random_generator():
    from diffdistill.eval.generate import generate
    latents, labels, _ = edm_stacked_draws(SEEDS, (1, 4, 4), 5)
    for bs in (5, 2):
        net = Recorder()
        x, got_labels, _ = generate(net, SEEDS, {"sampler": "euler", "nfe": 1, "seed_labels": "edm"}, batch_size=bs)
        first_x = torch.cat([c[0] for c in net.calls])
        assert torch.equal(first_x, latents * T_MAX)          # the Euler sampler starts at σ_max·latent
        assert torch.equal(got_labels, labels) and torch.equal(torch.cat([c[1] for c in net.calls]), labels)
    # seed mod L stays available (and is the default for this project's own nets)
    net = Recorder()
    _, mod_labels, _ = generate(net, SEEDS, {"sampler": "euler", "nfe": 1})
    assert torch.equal(mod_labels.argmax(1), torch.tensor([s % 5 for s in SEEDS]))
    _, forced, _ = generate(Recorder(), SEEDS, {"sampler": "euler", "nfe": 1}, label_rule="edm")
    assert torch.equal(forced, labels) and not torch.equal(mod_labels, labels)


def test_edm_rule_then_sampler_noise_continues_the_same_generator():
    """EDM passes rnd.randn_like to the sampler (generate.py:294), so stochastic steps draw after the label."""
    from diffdistill.eval.generate import generate
    latents, labels, gens = edm_stacked_draws(SEEDS, (1, 4, 4), 5)
    net = Recorder()
    generate(net, SEEDS, {"sampler": "consistency", "sigmas": [T_MAX, 2.0], "seed_labels": "edm"})
    z2 = torch.stack([torch.randn((1, 4, 4), generator=g) for g in gens])
    # Recorder returns D = 0: f(x, σ) = (c_skip^CM − (1 − ε/σ)·c_skip^EDM)·x, so the second input is f(·) + √(τ²−ε²)·z2
    from diffdistill.diffusion.consistency import consistency_function
    f1 = consistency_function(lambda x, s, l: torch.zeros_like(x), latents * T_MAX, T_MAX, None, T_MIN, 0.5)
    want = f1.clamp(-1, 1) + math.sqrt(4.0 - T_MIN ** 2) * z2
    assert torch.allclose(net.calls[1][0], want, atol=1e-6)


def _edm_pickle_teacher(tmp_path):
    from helpers.edm_snapshot import edm_snapshot_bytes
    from diffdistill.nets.factory import build_denoiser
    kwargs = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)
    torch.manual_seed(0)
    net = build_denoiser(dict(arch="songunet", precond="edm", label_dim=3, img_channels=1, img_resolution=8,
                              kwargs=kwargs))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    init = dict(img_resolution=8, img_channels=1, label_dim=3, model_type="SongUNet",
                **{k: (np.float64(v) if k == "dropout" else v) for k, v in kwargs.items()})
    path = tmp_path / "edm-tiny-cond.pkl"
    path.write_bytes(edm_snapshot_bytes(net.eval(), init))
    return path


def test_edm_pickle_teacher_samples_with_edm_seed_labels(tmp_path):
    from diffdistill.eval.evaluate import load_for_sampling, sampling_spec_for
    from diffdistill.eval.generate import generate
    net, state = load_for_sampling(_edm_pickle_teacher(tmp_path))
    assert state["sampling"]["seed_labels"] == "edm"
    for steps in (None, 2):
        assert sampling_spec_for(state, steps)["seed_labels"] == "edm"
    _, labels, _ = generate(net, SEEDS, sampling_spec_for(state, 1))
    assert torch.equal(labels, edm_stacked_draws(SEEDS, (1, 8, 8), 3)[1])


# ------------------------------------------------------------------------------------------------ uint8 rule
def _pixels_with_ties(n=64, c=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, c, 8, 8, generator=g) * 2.6 - 1.3
    k = torch.randint(0, 255, (n, c, 8, 8), generator=g).double()
    ties = ((k + 0.5) / 127.5 - 1).float()      # (x + 1)·127.5 = k + ½: half-even and half-up disagree for even k
    return torch.where(torch.rand(n, c, 8, 8, generator=g) < 0.5, x, ties)


def edm_uint8(x):
    """NVlabs/edm generate.py:297."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)


@pytest.mark.parametrize("c", [1, 3])
def test_png_folder_reads_back_as_the_fid_paths_uint8(tmp_path, c):
    from diffdistill.eval.inception import images_to_uint8, iter_reference_uint8
    from diffdistill.eval.plots import image_grid
    x = _pixels_with_ties(c=c)
    grid = image_grid(x[:4], nrow=4, pad=0)
    want = edm_uint8(x[:4]).permute(2, 0, 3, 1).reshape(8, 32, c).numpy()
    assert np.array_equal(grid, want[..., 0] if c == 1 else want)      # grids: EDM's rule, not round-half-even
    from diffdistill.eval.plots import write_png_folder
    write_png_folder(x, tmp_path, [f"{i:06d}" for i in range(len(x))])
    back = torch.cat([b for _, b in iter_reference_uint8(tmp_path, batch_size=16)])
    # what the Inception path scores: generated floats and folder images both go through images_to_uint8
    assert torch.equal(images_to_uint8(back), images_to_uint8(x)) and torch.equal(back, edm_uint8(x))


def test_sample_cli_png_and_npz_match_eval(tmp_path):
    """``diffdistill sample --out DIR`` writes the uint8 the FID path computes from the same seeds; ``.npz``
    samples of images are clamped to [−1, 1] (``--raw`` keeps the sampler's values)."""
    from diffdistill.cli import main
    from diffdistill.eval.evaluate import load_for_sampling, sampling_spec_for
    from diffdistill.eval.generate import generate
    from diffdistill.eval.inception import images_to_uint8, iter_reference_uint8
    pkl = _edm_pickle_teacher(tmp_path)
    net, state = load_for_sampling(pkl)
    x, _, _ = generate(net, range(3, 11), sampling_spec_for(state, 2))
    assert x.abs().max() > 1                                             # the raw samples leave [−1, 1]
    assert main(["sample", str(pkl), "--steps", "2", "--num-samples", "8", "--seed", "3",
                 "--out", str(tmp_path / "png")]) == 0
    names = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert names == [f"{s:06d}.png" for s in range(3, 11)]
    back = torch.cat([b for _, b in iter_reference_uint8(tmp_path / "png", batch_size=8)])
    assert torch.equal(images_to_uint8(back), images_to_uint8(x))
    assert main(["sample", str(pkl), "--steps", "2", "--num-samples", "8", "--seed", "3",
                 "--out", str(tmp_path / "s.npz")]) == 0
    assert main(["sample", str(pkl), "--steps", "2", "--num-samples", "8", "--seed", "3", "--raw",
                 "--out", str(tmp_path / "raw.npz")]) == 0
    s, raw = np.load(tmp_path / "s.npz"), np.load(tmp_path / "raw.npz")
    assert np.array_equal(s["samples"], x.clamp(-1, 1).numpy()) and np.array_equal(raw["samples"], x.numpy())
    assert np.array_equal(s["labels"], edm_stacked_draws(range(3, 11), (1, 8, 8), 3)[1].argmax(1).numpy())
