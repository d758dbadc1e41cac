"""DMD2 and the shared distribution-matching pieces: closed-form oracles, the official computations (cited as
tianweiy/DMD2 file:line), presets, and a 2-D run."""

import math

import pytest
import torch

from helpers.dm_helpers import (MLP_CFG, UNET_CFG, GaussianDenoiser, Recorder, all_none, any_nonzero, make_ctx,
                                tiny_teacher)
from diffdistill.methods.dmd2 import (DMD2, DMD2Options, ImageGANHead, PointGANHead, backward_simulation_input,
                                      gan_critic_loss, gan_generator_loss, student_sigma_indices, student_sigmas)
from diffdistill.methods.score_distill import (dm_gradient, dm_pseudo_loss, dmd_sigma_grid, paired_denoise,
                                               sample_grid_index)


def _dmd2(cfg=MLP_CFG, label_dim=0, batch_size=16, **opts):
    teacher, cfg = tiny_teacher(cfg, label_dim=label_dim)
    opts = {"lr": 1e-3, "warmup_steps": 0, **opts}
    return DMD2(make_ctx(teacher, cfg, batch_size=batch_size), **opts)


def _real(m, n=16, seed=1):
    return torch.randn((n,) + m.shape, generator=torch.Generator().manual_seed(seed)) * 0.5


# ------------------------------------------------------------------------------------------------ grid, indices
def test_grid_reference_values():
    grid = dmd_sigma_grid()
    assert len(grid) == 1000 and bool((grid[1:] > grid[:-1]).all())
    for j, want in [(0, 0.002), (20, 0.00323), (249, 0.168), (499, 2.50), (749, 17.5), (980, 72.05), (999, 80.0)]:
        assert math.isclose(float(grid[j]), want, rel_tol=5e-3), (j, float(grid[j]))


def test_index_ranges_are_inclusive():
    g = torch.Generator().manual_seed(0)
    t = sample_grid_index(200_000, 20, 980, g)
    assert int(t.min()) == 20 and int(t.max()) == 980
    t = sample_grid_index(200_000, 0, 999, g)
    assert int(t.min()) == 0 and int(t.max()) == 999


def test_method_sigma_ranges_dm_and_critic():
    """DM σ's lie in [grid[20], grid[980]] ≈ [0.00323, 72.05]; critic and GAN σ's in [grid[0], grid[999]]."""
    m = _dmd2(batch_size=256)
    grid = dmd_sigma_grid()
    m.fake = Recorder(m.fake)
    real = (_real(m, 256), None)
    lo, hi = float("inf"), 0.0
    for step in range(0, 20, 5):   # generator steps: the DM call has no kwargs, the GAN call return_bottleneck
        m.fake.calls.clear()
        m.loss("generator", real, step)
        dm = [c for c in m.fake.calls if not c["kw"]]
        assert len(dm) == 1 and not dm[0]["grad"]
        s = dm[0]["sigma"]
        lo, hi = min(lo, float(s.min())), max(hi, float(s.max()))
        assert float(s.min()) >= float(grid[20]) * (1 - 1e-6) and float(s.max()) <= float(grid[980]) * (1 + 1e-6)
        assert math.isclose(float(grid[20]), 0.00323, rel_tol=5e-3)
        assert math.isclose(float(grid[980]), 72.05, rel_tol=5e-3)
    critic_sigmas = []
    for step in range(1, 5):
        m.fake.calls.clear()
        m.loss("critic", real, step)
        critic_sigmas += [c["sigma"] for c in m.fake.calls]
    s = torch.cat(critic_sigmas)
    assert float(s.min()) >= 0.002 * (1 - 1e-6) and float(s.max()) <= 80.0 * (1 + 1e-6)
    assert float(s.min()) < float(grid[20]) and float(s.max()) > float(grid[980])  # the wider range is used


# ------------------------------------------------------------------------------------------------ DM gradient
def test_fake_equals_real_gives_zero_generator_gradient():
    m = _dmd2(gan_weight=0.0)   # fake score == teacher at initialisation
    loss, logs = m.loss("generator", None, 0)
    loss.backward()
    assert logs["dmd2/dm"] == 0.0
    for p in m.G.parameters():
        assert p.grad is None or torch.equal(p.grad, torch.zeros_like(p.grad))


def test_paired_denoise_shares_dropout_masks():
    teacher, _ = tiny_teacher(UNET_CFG, dropout=0.3)
    a = Recorder(teacher).train()
    b = Recorder(teacher).train()
    x = torch.randn(4, 1, 8, 8)
    s = torch.full((4,), 1.0)
    d_fake, d_real = paired_denoise(a, b, x, s)
    assert torch.equal(d_fake, d_real)
    assert not torch.equal(a(x, s), a(x, s))   # dropout is really active
    assert torch.equal(dm_gradient(x, d_real, d_fake), torch.zeros_like(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_paired_denoise_shares_dropout_masks_on_a_gpu():
    """On a GPU dropout draws from the device's CUDA generator: paired_denoise rewinds it too (Diff-Instruct's
    training/di_loss.py:47-49 restores torch.cuda's RNG state between the two calls)."""
    teacher, _ = tiny_teacher(UNET_CFG, dropout=0.3)
    dev = torch.device("cuda")
    a, b = Recorder(teacher).to(dev), Recorder(teacher).to(dev)
    x, s = torch.randn(4, 1, 8, 8, device=dev), torch.full((4,), 1.0, device=dev)
    d_fake, d_real = paired_denoise(a, b, x, s, training=True)
    assert torch.equal(d_fake, d_real)
    with torch.no_grad():
        assert not torch.equal(a.train()(x, s), a(x, s))


def test_pseudo_loss_gradient_and_value():
    g0 = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 4, generator=g0, requires_grad=True)
    g = torch.randn(3, 2, 4, 4, generator=g0)
    L = dm_pseudo_loss(x, g)
    L.backward()
    assert torch.allclose(x.grad, g / x.numel(), atol=1e-9)
    assert math.isclose(float(L.detach()), 0.5 * float(g.square().mean()), rel_tol=1e-6)


def test_normaliser_scale_invariance():
    gen = torch.Generator().manual_seed(1)
    x, dr, df = (torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64) for _ in range(3))
    g = dm_gradient(x, dr, df)
    a, b = 3.7, -1.3   # pixel units: affine maps with a > 0
    assert torch.allclose(dm_gradient(a * x + b, a * dr + b, a * df + b), g, atol=1e-10)
    c = torch.tensor([0.1, 2.0, 5.0, 0.7], dtype=torch.float64).reshape(-1, 1, 1, 1)  # per-sample residual scale
    assert torch.allclose(dm_gradient(dr + c * (x - dr), dr, dr + c * (df - dr)), g, atol=1e-10)
    ratio = (df - dr).abs().flatten(1).mean(1) / (x - dr).abs().flatten(1).mean(1)
    assert torch.allclose(g.abs().flatten(1).mean(1), ratio, atol=1e-12)


def test_normaliser_nan_becomes_zero():
    x = torch.ones(2, 3)
    dr = x.clone()            # zero normaliser for both samples
    df = torch.tensor([[1.0, 1.0, 1.0], [2.0, 1.0, 1.0]])
    assert torch.equal(dm_gradient(x, dr, df), torch.zeros(2, 3))


def test_di_vs_dmd_relation():
    from diffdistill.methods.diff_instruct import ikl_loss
    gen = torch.Generator().manual_seed(2)
    B, C, H, W = 4, 2, 3, 3
    dr, df = torch.randn(B, C, H, W, generator=gen), torch.randn(B, C, H, W, generator=gen)
    x1 = torch.randn(B, C, H, W, generator=gen, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    dm_pseudo_loss(x1, dm_gradient(x1, dr, df)).backward()
    ikl_loss(x2, dr, df).backward()
    norm = (x1.detach() - dr).abs().flatten(1).mean(1).reshape(-1, 1, 1, 1)
    assert torch.allclose(x1.grad, x2.grad / (C * H * W * norm), rtol=1e-5, atol=1e-9)
    # equal per-sample directions
    cos = torch.nn.functional.cosine_similarity(x1.grad.flatten(1), x2.grad.flatten(1))
    assert torch.allclose(cos, torch.ones(B), atol=1e-5)


def test_gaussian_closed_form_through_the_method():
    """Real N(μ, c²I), generator N(m, c²I), exact denoisers: D_f − D_r = (m − μ)σ²/(c²+σ²) at every x_t; the DMD2
    gradient on m is that over (normaliser·B·CHW), summed over the batch, and a descent step moves m toward μ."""
    mu, m0, c, B = torch.tensor([0.3, -0.2]), torch.tensor([1.0, 0.5]), 0.4, 64
    m = _dmd2(gan_weight=0.0, batch_size=B)
    m.teacher, m.fake = GaussianDenoiser(mu, c), GaussianDenoiser(m0, c)
    mean = torch.nn.Parameter(m0.clone())
    z = torch.randn(B, 2, generator=torch.Generator().manual_seed(3))
    x = mean + c * z
    state = m.ctx.generator.get_state()
    loss, g, t = m.distribution_matching_loss(x, None)
    loss.backward()
    # replay the draws to rebuild x_t and the exact expected gradient
    m.ctx.generator.set_state(state)
    t2 = torch.randint(20, 981, (B,), generator=m.ctx.generator)
    eps = torch.randn(B, 2, generator=m.ctx.generator)
    assert torch.equal(t, t2)
    sigma = m.grid[t].reshape(-1, 1)
    x_t = x.detach() + sigma * eps
    diff = m.fake(x_t, sigma) - m.teacher(x_t, sigma)
    assert torch.allclose(diff, (m0 - mu) * sigma ** 2 / (c ** 2 + sigma ** 2), atol=1e-5)
    norm = (x.detach() - m.teacher(x_t, sigma)).abs().mean(1, keepdim=True)
    want = (diff / norm / (B * 2)).sum(0)
    assert torch.allclose(mean.grad, want, rtol=1e-4, atol=1e-7)
    stepped = mean.detach() - 0.1 * mean.grad / mean.grad.norm()
    assert (stepped - mu).norm() < (m0 - mu).norm()


# ------------------------------------------------------------------------------------------------ GAN
@pytest.mark.parametrize("cfg", [MLP_CFG, UNET_CFG], ids=["points", "images"])
def test_precond_bottleneck_paths_agree(cfg):
    net, _ = tiny_teacher(cfg)
    x = torch.randn((3,) + net.sample_shape)
    s = torch.tensor([0.01, 1.0, 50.0])
    D = net(x, s)
    D2, feats = net(x, s, return_bottleneck=True)
    only = net(x, s, bottleneck_only=True)
    assert torch.equal(D, D2) and torch.equal(feats, only)
    assert feats.shape == ((3, 16, 4, 4) if cfg is UNET_CFG else (3, 32))


def test_gan_losses_at_zero_logits():
    l = torch.zeros(5, requires_grad=True)
    assert math.isclose(float(gan_critic_loss(torch.zeros(5), torch.zeros(5))), 2 * math.log(2), rel_tol=1e-6)
    Lg = gan_generator_loss(l)
    assert math.isclose(float(Lg.detach()), math.log(2), rel_tol=1e-6)
    l2 = torch.tensor([-2.0, 0.0, 3.0], requires_grad=True)
    (gan_generator_loss(l2) * 3).backward()
    assert torch.allclose(l2.grad, -torch.sigmoid(-l2.detach()))


@pytest.mark.parametrize("cfg", [MLP_CFG, UNET_CFG], ids=["points", "images"])
def test_gan_head_shapes_and_grad_isolation(cfg):
    m = _dmd2(cfg, batch_size=8)
    assert isinstance(m.head, PointGANHead if cfg is MLP_CFG else ImageGANHead)
    real = (_real(m, 8), None)
    loss, logs = m.loss("generator", real, 0)
    loss.backward()
    assert "dmd2/g_gan" in logs
    assert any_nonzero(m.G)
    assert all_none(m.fake) and all_none(m.head)          # the G step leaves critic grads empty
    for p in m.G.parameters():
        p.grad = None
    loss, logs = m.loss("critic", real, 0)
    loss.backward()
    assert all_none(m.G)                                   # and the critic step leaves G grads empty
    assert any_nonzero(m.fake) and any_nonzero(m.head)
    assert "dmd2/d_gan" in logs
    # the critic phase right after the generator phase of the same step reused its detached batch
    assert all(p.requires_grad for p in m.fake.parameters())


def test_critic_reuses_pre_update_generator_batch():
    m = _dmd2(gan_weight=0.0)
    m.fake = Recorder(m.fake)
    m.loss("generator", None, 5)
    x_gen = m.generated.detach().clone()
    with torch.no_grad():
        for p in m.G.parameters():   # an optimizer step in between must not change the critic's batch
            p.add_(1.0)
    m.fake.calls.clear()
    state = m.ctx.generator.get_state()
    m.loss("critic", None, 5)
    (call,) = m.fake.calls
    m.ctx.generator.set_state(state)     # replay the critic's draws: t, then ε
    t = torch.randint(0, 1000, (16,), generator=m.ctx.generator)
    eps = torch.randn(16, 2, generator=m.ctx.generator)
    sigma = m.grid[t]
    assert torch.equal(call["sigma"], sigma)
    assert torch.allclose(call["x"], x_gen + sigma[:, None] * eps, atol=1e-6)
    assert m._cache is None
    # on a critic-only step the batch is fresh (G is called again, without grad)
    m.G = Recorder(m.G)
    m.loss("critic", None, 6)
    assert len(m.G.calls) == 1 and not m.G.calls[0]["grad"]


def test_generator_labels_are_uniform_and_independent_of_the_batch():
    """tianweiy/DMD2 main/edm/train_edm.py:227-233: the generator's class labels are torch.randint(0, label_dim)
    one-hot, whatever the real batch holds (its labels only enter the GAN's real branch, :210-215). Here: drawn
    from the method's generator (first draw of the step), uniform; the critic's GAN call gets the real labels then
    the generated batch's."""
    m = _dmd2(label_dim=3, batch_size=6)
    m.G, m.fake = Recorder(m.G), Recorder(m.fake)
    y = torch.eye(3)[[0] * 6]                       # a batch of class 0 only
    state = m.ctx.generator.get_state()
    m.loss("generator", (_real(m, 6), y), 0)
    m.ctx.generator.set_state(state)
    want = torch.nn.functional.one_hot(torch.randint(3, (6,), generator=m.ctx.generator), 3).float()
    got = m.G.calls[-1]["labels"]
    assert torch.equal(got, want) and not torch.equal(got, y)
    m.loss("critic", (_real(m, 6), y), 0)
    gan_call = [c for c in m.fake.calls if c["kw"]][-1]
    assert torch.equal(gan_call["labels"], torch.cat([y, got]))   # real labels then the generated batch's
    big = _dmd2(label_dim=4, batch_size=4000, gan_weight=0.0)
    big.G = Recorder(big.G)
    big.loss("generator", (torch.zeros(4000, 2), torch.eye(4)[[1] * 4000]), 0)
    freq = big.G.calls[-1]["labels"].mean(0)
    assert torch.allclose(freq, torch.full((4,), 0.25), atol=0.03)


def test_dropout_off_so_fake_equal_teacher_gives_zero_gradient():
    """tianweiy/DMD2 main/edm/edm_network.py:11 builds the real, fake and generator networks with dropout 0 (and
    train_edm.py:200 runs them in train mode), so at fake == teacher the DM gradient (edm_guidance.py:96-108) is
    exactly 0 even for a teacher trained with dropout."""
    teacher, cfg = tiny_teacher(UNET_CFG, dropout=0.3)
    m = DMD2(make_ctx(teacher, cfg, batch_size=8), lr=1e-3, warmup_steps=0, gan_weight=0.0)
    loss, logs = m.loss("generator", None, 0)
    x = m.generated
    x.retain_grad()
    loss.backward()
    assert logs["dmd2/dm"] == 0.0 and torch.equal(x.grad, torch.zeros_like(x.grad))
    assert m.fake.training and m.G.training


def test_options_defaults_are_the_official_recipe():
    """tianweiy/DMD2 main/edm/train_edm.py:97-108 (AdamW β (0.9, 0.999), wd 0.01), :469-471 (warm-up 500, steps
    0.02..0.98), experiments/imagenet/imagenet_gan_classifier_genloss3e-3_diffusion1000_lr2e-6_scratch.sh (lr 2e-6
    both, ratio 5, GAN 3e-3 / 1e-2, diffusion GAN on all 1000 steps); no EMA, dropout 0."""
    o = DMD2Options()
    assert (o.lr, o.critic_lr(), o.betas, o.weight_decay, o.warmup_steps) == (2e-6, 2e-6, (0.9, 0.999), 0.01, 500)
    assert (o.dfake_gen_update_ratio, o.gan_weight, o.gan_critic_weight) == (5, 3e-3, 1e-2)
    assert not o.ema_enabled() and o.dropout == 0.0 and not o.warmup_per_process
    assert (o.dm_t_min, o.dm_t_max, o.gan_t_min, o.gan_t_max, o.critic_t_min, o.critic_t_max) == (20, 980, 0, 999,
                                                                                                  0, 999)


@pytest.mark.parametrize("method", ["dmd", "dmd2", "diff_instruct"])
@pytest.mark.parametrize("kind", ["images", "points"])
def test_official_preset_is_exactly_the_dataclass_defaults(method, kind):
    """--preset official on any teacher gives the method's dataclass defaults (no images/points value leaks in:
    on main an image teacher's official DMD run had lr_critic 1e-3, 500× its generator lr)."""
    from diffdistill.distill import distill_config
    from diffdistill.methods.registry import get_method
    net = UNET_CFG if kind == "images" else MLP_CFG
    state = {"net_config": net, "config": {"data": {"name": "digits" if kind == "images" else "ring8"}}}
    cfg = distill_config(method, state, preset="official")
    assert cfg["method"] == {"name": method, **get_method(method).Options.defaults()}
    default = distill_config(method, state)
    assert default["preset"]["name"] == kind and default["method"] != cfg["method"]


# ------------------------------------------------------------------------------------------------ multi-step
def test_student_sigma_rule():
    assert student_sigma_indices(4) == [999, 749, 499, 249]
    assert student_sigma_indices(1) == [999]
    assert student_sigma_indices(2) == [999, 499]
    s = student_sigmas(4, dmd_sigma_grid())
    for got, want in zip(s, [80.0, 17.5, 2.50, 0.168]):
        assert math.isclose(got, want, rel_tol=5e-3)


class ConstGen(torch.nn.Module):
    def __init__(self, x0):
        super().__init__()
        self.x0 = x0

    def forward(self, x, sigma, labels=None):
        return self.x0.expand_as(x)


def test_backward_simulation_inputs():
    sigmas = student_sigmas(4, dmd_sigma_grid())
    z = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    assert torch.equal(backward_simulation_input(ConstGen(torch.zeros(2)), z, sigmas, 0, g), z * sigmas[0])
    x0 = torch.tensor([0.3, -0.7])
    for k in (1, 2, 3):
        g = torch.Generator().manual_seed(10 + k)
        replay = torch.Generator().manual_seed(10 + k)
        eps = [torch.randn(5, 2, generator=replay) for _ in range(k)][-1]
        x = backward_simulation_input(ConstGen(x0), z, sigmas, k, g)
        assert torch.allclose(x, x0 + sigmas[k] * eps, atol=1e-6)


def test_multistep_training_uses_student_rollout_and_k_nfe():
    from diffdistill.eval.generate import generate
    m = _dmd2(student_steps=4, gan_weight=0.0)
    assert m.sampling_spec() == {"sampler": "multistep", "sigmas": m.sigmas} and len(m.sigmas) == 4
    m.G = Recorder(m.G)
    seen = set()
    for step in range(0, 60, 5):
        m.G.calls.clear()
        _, logs = m.loss("generator", None, step)
        k = int(logs["dmd2/k"])
        seen.add(k)
        calls = m.G.calls
        assert len(calls) == k + 1                      # k rollout calls without grad, then the trained call
        assert all(not c["grad"] for c in calls[:-1]) and calls[-1]["grad"]
        assert [float(c["sigma"][0]) for c in calls] == pytest.approx(m.sigmas[:k + 1])
    assert seen == {0, 1, 2, 3}
    _, _, info = generate(m.G.net, range(8), m.sampling_spec())
    assert info["nfe"] == 4


def test_k0_input_is_pure_noise():
    m = _dmd2(student_steps=4, gan_weight=0.0)
    m.G = Recorder(m.G)
    for step in range(0, 100, 5):
        state = m.ctx.generator.get_state()
        m.G.calls.clear()
        _, logs = m.loss("generator", None, step)
        if logs["dmd2/k"] == 0:
            m.ctx.generator.set_state(state)
            z = torch.randn((16, 2), generator=m.ctx.generator)
            assert torch.equal(m.G.calls[0]["x"], z * 80.0)
            return
    pytest.fail("k = 0 never drawn")


# ------------------------------------------------------------------------------------------------ TTUR, trainer
def _trainer(tmp_path, method, steps, teacher_label_dim=0, **opts):
    from diffdistill.train.trainer import Trainer
    teacher, cfg = tiny_teacher(MLP_CFG, label_dim=teacher_label_dim)
    run = {"out": str(tmp_path), "steps": steps, "batch_size": 32, "log_every": 5, "ckpt_every": 0,
           "sample_every": 0, "progress": False, "seed": 0, "device": "cpu", "keep_ckpts": 3, "nan_policy": "stop",
           "grad_clip": 10.0, "resume": None, "num_sample_grid": 16}
    full = {"run": run, "data": {"name": "ring8", "n": 500, "seed": 0}, "net": cfg,
            "method": {"name": method, "lr": 1e-3, "warmup_steps": 2, **opts}}
    return Trainer(full, teacher=teacher, teacher_path="mem")


def test_ttur_counts_and_skipped_generator_is_bit_identical(tmp_path):
    K = 12
    tr = _trainer(tmp_path, "dmd2", K)
    m = tr.method
    counts = {"generator": 0, "critic": 0}
    orig = m.loss

    def counting(phase, batch, step):
        counts[phase] += 1
        return orig(phase, batch, step)
    m.loss = counting
    for step in range(K):
        before = [p.detach().clone() for p in m.G.parameters()]
        crit_before = [p.detach().clone() for p in m.fake.parameters()]
        tr.train_step()
        tr.step += 1
        same = all(torch.equal(a, b) for a, b in zip(before, m.G.parameters()))
        assert same == (step % 5 != 0), step
        assert not all(torch.equal(a, b) for a, b in zip(crit_before, m.fake.parameters()))
    assert counts == {"critic": K, "generator": math.ceil(K / 5)}


def test_resume_is_exact_with_gan(tmp_path):
    full = _trainer(tmp_path / "full", "dmd2", 12)
    full.run()
    half = _trainer(tmp_path / "split", "dmd2", 6)
    half.cfg["run"]["ckpt_every"] = 0
    half.run()
    resumed = _trainer(tmp_path / "split", "dmd2", 12)
    resumed.cfg["run"]["resume"] = "auto"
    resumed.run()
    import json
    steps = [json.loads(l)["step"] for l in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert steps == [5, 6, 10, 12]      # really resumed at step 6, not retrained from 0
    a, b = full.method.state_dict(), resumed.method.state_dict()
    for net in ("generator", "fake_score", "gan_head"):
        for k, v in a["nets"][net].items():
            assert torch.equal(v, b["nets"][net][k]), (net, k)


def test_checkpoint_carries_sampling_spec(tmp_path):
    from diffdistill.io.checkpoint import list_checkpoints, load_checkpoint
    tr = _trainer(tmp_path, "dmd2", 3, student_steps=2)
    tr.run()
    state = load_checkpoint(list_checkpoints(tmp_path / "checkpoints")[-1])
    assert state["role"] == "student" and state["method"] == "dmd2"
    assert state["sampling"]["sampler"] == "multistep"
    assert state["sampling"]["sigmas"] == pytest.approx([80.0, 2.50], rel=5e-3)


# ------------------------------------------------------------------------------------------------ 2-D end to end
def _dmd2_ring8(ring8_teacher, tmp_path, steps, bound):
    res = ring8_teacher.distill_and_eval("dmd2", tmp_path, steps=steps)
    print(f"dmd2 ring8 {steps} it.", {k: v for k, v in res.items() if k != "trainer"})
    m = res["trainer"].method
    # TTUR: the generator steps every 5th iteration
    assert int(m.optimizers["generator"].state[next(m.G.parameters())]["step"]) == steps // 5
    assert m.sigmas == [1.0] and m.head is not None
    assert res["modes_covered"] == 1.0
    assert res["student"] < bound * res["teacher"]
    assert res["student"] < 0.25 * res["untrained"]


def test_dmd2_ring8_end_to_end(ring8_teacher, tmp_path):
    """A 1-step DMD2 student of the ring8 teacher (points preset: TTUR 5, GAN 0.1 / 0.3, input σ = 1; cut to 1,000
    of its 2,000 iterations = 200 generator updates at batch 256): within 1.75× the teacher's sliced W2 at 35 NFE
    and ≥ 4× better than the teacher's own 1-step sample. Measured at 1,000 iterations (run seeds 0–2): student
    0.039, 0.042, 0.050 against the teacher's 0.036 (bound 0.063) and the untrained 0.494. The preset's full length
    against 1.5× is ``-m slow``."""
    _dmd2_ring8(ring8_teacher, tmp_path, 1000, 1.75)


@pytest.mark.slow
def test_dmd2_ring8_end_to_end_full_length(ring8_teacher, tmp_path):
    """The points preset's 2,000 iterations (400 generator updates) within 1.5× the teacher's sliced W2 (≈ 90 s).
    Measured (this metric, seeds 0–3): teacher 0.036, untrained 0.494, student 0.035–0.047."""
    _dmd2_ring8(ring8_teacher, tmp_path, 2000, 1.5)


def test_optional_generator_ema_is_sampled_and_resumes_exactly(tmp_path):
    """Off by default (the official code has none); with a half-life the student samples from the EMA, which lags
    the generator, and resuming restores it bit-exactly."""
    plain = _trainer(tmp_path / "plain", "dmd2", 1).method
    assert plain.ema is None and plain.sampling_net() is plain.G
    opts = {"ema_halflife_kimg": 0.1, "ema_rampup": None}
    full = _trainer(tmp_path / "full", "dmd2", 12, **opts)
    full.run()
    G, E = full.method.G, full.method.sampling_net()
    assert E is not G
    moved = [not torch.equal(a, b) for a, b in zip(G.parameters(), E.parameters())]
    assert any(moved)
    half = _trainer(tmp_path / "split", "dmd2", 6, **opts)
    half.run()
    resumed = _trainer(tmp_path / "split", "dmd2", 12, **opts)
    resumed.cfg["run"]["resume"] = "auto"
    resumed.run()
    for a, b in zip(E.state_dict().values(), resumed.method.sampling_net().state_dict().values()):
        assert torch.equal(a, b)


def test_health_scalars_are_logged(tmp_path):
    """'Is my run healthy?': per-network gradient norms, DM-gradient norm, GAN logits/accuracies, fake-score loss."""
    import json
    tr = _trainer(tmp_path, "dmd2", 10)
    tr.run()
    rec = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    for key in ("grad_norm/generator", "grad_norm/critic", "dmd2/dm_grad_norm", "dmd2/fake_score", "dmd2/d_gan",
                "dmd2/d_real_logit", "dmd2/d_fake_logit", "dmd2/d_real_acc", "dmd2/d_fake_acc", "dmd2/g_gan"):
        assert key in rec and math.isfinite(rec[key]), key
    assert rec["dmd2/dm_grad_norm"] > 0 and 0 <= rec["dmd2/d_real_acc"] <= 1


def test_explicit_student_sigmas(tmp_path):
    """``sigmas`` replaces the grid-index schedule (stored in the checkpoint's sampling spec); bad lists are refused."""
    from diffdistill.errors import UserError
    m = _trainer(tmp_path, "dmd2", 1, sigmas=[2.5]).method
    assert m.sampling_spec() == {"sampler": "multistep", "sigmas": [2.5]}
    x, _, k = m.generate(None, with_grad=False)
    assert k == 0 and x.shape == (32, 2)
    assert _trainer(tmp_path, "dmd2", 1, student_steps=2, sigmas=[10.0, 1.0]).method.sigmas == [10.0, 1.0]
    for bad in ([1.0, 10.0], [2.5, 1.0], [-1.0]):
        with pytest.raises(UserError, match="sigmas"):
            _trainer(tmp_path, "dmd2", 1, sigmas=bad)


def test_student_sigma_max_lowers_the_students_schedule_only(tmp_path):
    """``student_sigma_max`` puts the student's K grid indices on a grid ending at that σ (K = 1: the input is
    σ·z); the DM and critic noise levels keep the teacher's grid. Out-of-range values are refused."""
    from diffdistill.errors import UserError
    m = _trainer(tmp_path, "dmd2", 1, student_sigma_max=1.0).method
    assert m.sigmas == [1.0] and float(m.grid[-1]) == pytest.approx(80.0)
    assert m.sampling_spec() == {"sampler": "multistep", "sigmas": [1.0]}
    m4 = _trainer(tmp_path, "dmd2", 1, student_steps=4, student_sigma_max=1.0).method
    rho, lo = 7.0, 0.002
    ramp = [(lo ** (1 / rho) + (j / 999) * (1.0 - lo ** (1 / rho))) ** rho for j in (999, 749, 499, 249)]
    assert m4.sigmas == pytest.approx(ramp, rel=1e-5)
    # the generator's input at k = 0 is exactly σ·z
    seen = []
    orig = m.G.forward
    m.G.forward = lambda x, sigma, labels=None, **kw: (seen.append((x.clone(), sigma.clone())), orig(x, sigma, labels, **kw))[1]
    state = m.ctx.generator.get_state()
    m.generate(None, with_grad=False)
    m.ctx.generator.set_state(state)
    z = m.randn(m.ctx.batch_size)
    assert torch.allclose(seen[0][0], z * 1.0) and torch.all(seen[0][1] == 1.0)
    for bad in (0.0, 100.0):
        with pytest.raises(UserError, match="student_sigma_max"):
            _trainer(tmp_path, "dmd2", 1, student_sigma_max=bad)


def test_gan_t_max_caps_only_the_gan_noise_levels():
    """With gan_t_max = j the GAN's σ's (the bottleneck-only calls) lie in [grid[0], grid[j]], and the fake-score
    loss still uses the whole grid; out-of-range indices are refused."""
    from diffdistill.errors import UserError
    m = _dmd2(batch_size=256, gan_t_max=300)
    grid = dmd_sigma_grid()
    m.fake = Recorder(m.fake)
    real = (_real(m, 256), None)
    for step in range(1, 4):
        m.loss("critic", real, step)
    gan = torch.cat([c["sigma"] for c in m.fake.calls if c["kw"].get("bottleneck_only")])
    den = torch.cat([c["sigma"] for c in m.fake.calls if not c["kw"]])
    assert len(gan) == 3 * 512 and float(gan.max()) <= float(grid[300]) * (1 + 1e-6)
    assert float(gan.max()) > float(grid[290])          # the cap is reached, not undershot
    assert float(den.max()) > float(grid[900])          # the fake-score loss keeps the whole grid
    for bad in (-1, 1000):
        with pytest.raises(UserError, match="gan_t_max"):
            _dmd2(gan_t_max=bad)
    m = _dmd2(batch_size=256, gan_t_min=200, gan_t_max=400)   # a floor as well
    m.fake = Recorder(m.fake)
    m.loss("critic", (_real(m, 256), None), 1)
    gan = torch.cat([c["sigma"] for c in m.fake.calls if c["kw"].get("bottleneck_only")])
    assert float(gan.min()) >= float(grid[200]) * (1 - 1e-6) and float(gan.max()) <= float(grid[400]) * (1 + 1e-6)
    with pytest.raises(UserError, match="gan_t_min"):
        _dmd2(gan_t_min=500, gan_t_max=400)


def test_dm_t_range_narrows_only_the_dm_noise_levels():
    """With dm_t_min/dm_t_max = 250/600 the DM gradient's σ's lie in [grid[250], grid[600]] and both ends are
    reached; the critic's denoising loss keeps the whole grid unless critic_t_min/critic_t_max narrow it; a reversed
    or out-of-grid range is refused."""
    from diffdistill.errors import UserError
    m = _dmd2(batch_size=256, gan_weight=0.0, dm_t_min=250, dm_t_max=600)
    grid = dmd_sigma_grid()
    m.fake = Recorder(m.fake)
    dm = []
    for step in range(0, 20, 5):
        m.fake.calls.clear()
        m.loss("generator", None, step)
        dm += [c["sigma"] for c in m.fake.calls]
    s = torch.cat(dm)
    assert float(s.min()) >= float(grid[250]) * (1 - 1e-6) and float(s.max()) <= float(grid[600]) * (1 + 1e-6)
    assert float(s.min()) < float(grid[255]) and float(s.max()) > float(grid[595])
    m.fake.calls.clear()
    m.loss("critic", None, 1)
    crit = torch.cat([c["sigma"] for c in m.fake.calls])
    assert float(crit.min()) < float(grid[250]) and float(crit.max()) > float(grid[600])
    for lo, hi in ((600, 250), (-1, 500), (20, 1000)):
        with pytest.raises(UserError, match="dm_t_m"):
            _dmd2(dm_t_min=lo, dm_t_max=hi)
        with pytest.raises(UserError, match="critic_t_m"):
            _dmd2(critic_t_min=lo, critic_t_max=hi)
    m = _dmd2(batch_size=256, gan_weight=0.0, critic_t_min=100, critic_t_max=700)   # the critic's own range
    m.fake = Recorder(m.fake)
    m.loss("critic", None, 1)
    crit = torch.cat([c["sigma"] for c in m.fake.calls])
    assert float(crit.min()) >= float(grid[100]) * (1 - 1e-6) and float(crit.max()) <= float(grid[700]) * (1 + 1e-6)


def test_lr_decay_steps_cosine_to_zero_per_phase():
    """lr_decay_steps = D: warm-up, then the cosine ½(1 + cos(π·s/D)) on both learning rates, reaching 0 at
    iteration D — the critic counted in iterations, the generator in its own updates (D / ratio); without it the
    learning rates stay constant after the warm-up (official)."""
    import math as _m
    from diffdistill.errors import UserError
    m = _dmd2(lr=1e-3, warmup_steps=0, dfake_gen_update_ratio=5, lr_decay_steps=100)
    crit, gen = m.schedulers["critic"], m.schedulers["generator"]
    lrs = []
    for s in range(101):
        lrs.append(m.optimizers["critic"].param_groups[0]["lr"])
        m.optimizers["critic"].step()
        crit.step()
    assert lrs[0] == pytest.approx(1e-3) and lrs[100] == pytest.approx(0.0, abs=1e-12)
    assert lrs[50] == pytest.approx(1e-3 * 0.5 * (1 + _m.cos(_m.pi * 0.5)))
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    for _ in range(10):
        m.optimizers["generator"].step()
        gen.step()
    assert m.optimizers["generator"].param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5 * (1 + _m.cos(_m.pi * 0.5)))
    flat = _dmd2(lr=1e-3, warmup_steps=0)
    for _ in range(200):
        flat.optimizers["critic"].step()
        flat.schedulers["critic"].step()
    assert flat.optimizers["critic"].param_groups[0]["lr"] == pytest.approx(1e-3)
    with pytest.raises(UserError, match="lr_decay_steps"):
        _dmd2(lr_decay_steps=0)


def _official_constant_with_warmup(step: int, warmup: int) -> float:
    """diffusers ``get_scheduler('constant_with_warmup')``'s factor at scheduler step ``step``."""
    return step / max(1, warmup) if step < warmup else 1.0


@pytest.mark.parametrize("per_process", [False, True])
def test_warmup_default_and_per_process(per_process):
    """tianweiy/DMD2 main/edm/train_edm.py:110-123 + :288: the critic's scheduler (constant_with_warmup, 500) is
    stepped after every iteration through accelerate, which steps it once per process, so with P processes the
    factor at iteration s is f(s·P) — full after ~500/P iterations (72 on the released 7-GPU run). With
    ``warmup_per_process`` the critic's factor at iteration s is the official one one step later, f((s+1)·P) (the
    project's warm-up counts the step being taken, as in the default); by default it is f(s+1) whatever P."""
    teacher, cfg = tiny_teacher(MLP_CFG)
    ctx = make_ctx(teacher, cfg)
    ctx.world_size = 7
    m = DMD2(ctx, lr=1e-3, gan_weight=0.0, warmup_per_process=per_process)
    P = 7 if per_process else 1
    lrs = []
    for s in range(600):
        lrs.append(m.optimizers["critic"].param_groups[0]["lr"])
        m.optimizers["critic"].step()
        m.schedulers["critic"].step()
    for s in range(600):
        assert lrs[s] == pytest.approx(1e-3 * _official_constant_with_warmup((s + 1) * P, 500), rel=1e-9), s
    first_full = next(s for s, lr in enumerate(lrs) if lr == pytest.approx(1e-3))
    assert first_full == (71 if per_process else 499)       # official: 72 iterations (7 GPUs) / 500 (1 GPU), less one
    # the generator's rate, counted in its own updates (every ratio-th iteration), reaches full rate as late
    gen = []
    for u in range(120):
        gen.append(m.optimizers["generator"].param_groups[0]["lr"])
        m.optimizers["generator"].step()
        m.schedulers["generator"].step()
    full_u = next(u for u, lr in enumerate(gen) if lr == pytest.approx(1e-3))
    assert abs(5 * full_u - first_full) <= 5
