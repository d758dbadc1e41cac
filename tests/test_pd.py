"""Progressive Distillation (Salimans & Ho 2022) in EDM σ-space: the target against closed-form oracles (DDIM
landing, Gaussian closed form, point-mass teacher, t > t′ > t″ ordering), the SNR weightings against direct ε-/v-space
computations, the halving bookkeeping inside the method (entered in ``before_step``; ``phases`` has no side
effects), the student's dropout (official: 0), exact resume mid-schedule, the CLI flags, and ring8 end to end
(64 → 1 step)."""

import json
import math

import pytest
import torch
from torch import nn

from helpers.dm_helpers import MLP_CFG, GaussianDenoiser, make_ctx, tiny_teacher
from diffdistill.diffusion.samplers import ddim_sampler, ddim_step
from diffdistill.errors import UserError
from diffdistill.methods.pd import (PDOptions, ProgressiveDistillation, cosine_sigma, halving_stages, pd_loss,
                                    pd_loss_weight, pd_student_sigmas, pd_target)

C2 = 0.3 ** 2   # variance of the Gaussian data in the closed-form oracles


def _pd(teacher=None, batch_size=16, **opts):
    if teacher is None:
        teacher, cfg = tiny_teacher(MLP_CFG)
    else:
        cfg = MLP_CFG
    return ProgressiveDistillation(make_ctx(teacher, cfg, batch_size=batch_size), **opts)


def _karras(u, lo=0.002, hi=80.0, rho=7.0):
    return (hi ** (1 / rho) + u * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho


def _euler_gain(s, u, c2=C2):
    """One Euler/DDIM step s → u of the exact N(0, c²) denoiser multiplies x by (c² + s·u)/(c² + s²)."""
    return (c2 + s * u) / (c2 + s * s)


# ------------------------------------------------------------------------------------------------ target oracles
def test_student_ddim_step_with_target_lands_on_two_teacher_steps_edm_and_vp():
    """Oracle 1: one DDIM step s → s″ with x̂ = x̃ reproduces the teacher's two-step point, in EDM form and in VP
    form (z = α·x_s, α = 1/√(1+s²), σ_vp = s·α, z_u = α_u x̂ + σ_u ε̂, ε̂ = (z_t − α_t x̂)/σ_t)."""
    g = torch.Generator().manual_seed(0)
    teacher, _ = tiny_teacher(MLP_CFG)
    x_s = torch.randn(64, 2, generator=g, dtype=torch.float64) * 3
    s = _karras(torch.rand(64, generator=g, dtype=torch.float64) * 0.9)
    s_mid, s_next = s * 0.6, s * 0.3
    x_t = pd_target(teacher, x_s.float(), s.float(), s_mid.float(), s_next.float()).double()
    # the teacher's two DDIM steps, written out
    with torch.no_grad():
        d1 = teacher(x_s.float(), s.float()).double()
        x_mid = d1 + (s_mid / s)[:, None] * (x_s - d1)
        d2 = teacher(x_mid.float(), s_mid.float()).double()
        x_next = d2 + (s_next / s_mid)[:, None] * (x_mid - d2)
    edm = x_t + (s_next / s)[:, None] * (x_s - x_t)
    assert torch.allclose(edm, x_next, atol=1e-4, rtol=1e-5)
    alpha = lambda v: 1 / torch.sqrt(1 + v ** 2)   # noqa: E731
    a_t, a_u = alpha(s)[:, None], alpha(s_next)[:, None]
    sig_t, sig_u = s[:, None] * a_t, s_next[:, None] * a_u
    z_t = a_t * x_s
    eps_hat = (z_t - a_t * x_t) / sig_t
    z_u = a_u * x_t + sig_u * eps_hat
    assert torch.allclose(z_u, a_u * x_next, atol=1e-4, rtol=1e-5)
    # the same step through the shared helper, with a denoiser that returns x̃
    assert torch.allclose(ddim_step(lambda x, sig, labels=None: x_t, x_s, s, s_next), x_next, atol=1e-4, rtol=1e-5)
    # the DDIM sampler is that step on a list of σ's
    z = torch.randn(64, 2, generator=g)
    got, nfe = ddim_sampler(teacher, z, [80.0, 2.0, 0.5])
    with torch.no_grad():
        want = ddim_step(teacher, ddim_step(teacher, z * 80.0, 80.0, 2.0), 2.0, 0.5)
    assert nfe == 2 and torch.equal(got, want)


@pytest.mark.parametrize("s,s_mid,s_next", [(80.0, 2.0, 0.002), (2.5, 1.0, 0.4), (0.5, 0.2, 0.0)])
def test_gaussian_teacher_target_is_the_closed_form(s, s_mid, s_next):
    """Oracle 3: with the exact N(0, c²) denoiser D = c²/(c²+σ²)·x, x̃ = (a(s→s′)·a(s′→s″) − r)/(1 − r)·x_s with
    a(s→u) = (c² + s·u)/(c² + s²) and r = s″/s (r = 0 gives the two-step point itself)."""
    teacher = GaussianDenoiser(0.0, math.sqrt(C2))
    x_s = torch.randn(32, 2, generator=torch.Generator().manual_seed(1)) * s
    sig = lambda v: torch.full((32,), v)   # noqa: E731
    got = pd_target(teacher, x_s, sig(s), sig(s_mid), sig(s_next))
    r = s_next / s
    two_steps = _euler_gain(s, s_mid) * _euler_gain(s_mid, s_next)
    want = (two_steps - r) / (1 - r) * x_s.double()
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6)
    # Oracle 5: swapping t′ and t″ (diffusers PR #1010) gives a different, wrong x̃.
    swapped = pd_target(teacher, x_s, sig(s), sig(s_next), sig(s_mid)) if s_next > 0 else None
    if swapped is not None:
        assert not torch.allclose(swapped.double(), want, rtol=1e-3)


def test_point_mass_teacher_gives_x0_target_and_zero_loss():
    """Oracle 2: a teacher with D ≡ x₀ gives x̃ = x₀ at every σ; a student initialised from it has loss 0."""

    class PointMass(GaussianDenoiser):
        def forward(self, x, sigma, labels=None):
            return self.mean.expand_as(x) + 0 * x

    teacher = PointMass([0.3, -0.2], 1.0).eval().requires_grad_(False)
    x_s = torch.randn(16, 2, generator=torch.Generator().manual_seed(2)) * 5
    for s, sm, sn in ((80.0, 10.0, 1.0), (1.0, 0.5, 0.002), (0.4, 0.3, 0.0)):
        sig = lambda v: torch.full((16,), v)   # noqa: E731
        assert torch.allclose(pd_target(teacher, x_s, sig(s), sig(sm), sig(sn)), teacher.mean.expand(16, 2),
                              atol=1e-5)
    m = _pd(teacher, start_steps=4, iters_per_halving=2)
    batch = (torch.randn(16, 2, generator=torch.Generator().manual_seed(3)), None)
    loss, _ = m.loss(m.phases(0)[0], batch, 0)
    assert float(loss.detach()) < 1e-9


class OracleStudent(nn.Module):
    """The exact one-step student of an N-step stage for N(0, c²) data: D_S(x; s) = k(s)·x with
    k = (a(s→s′)a(s′→s″) − r)/(1 − r), where s′, s″ follow s on the stage's Karras grid."""

    def __init__(self, n_steps):
        super().__init__()
        self.grid = torch.tensor(pd_student_sigmas(2 * n_steps), dtype=torch.float64)   # the teacher's grid
        self.w = nn.Parameter(torch.zeros(()))   # something to differentiate

    def forward(self, x, sigma, labels=None):
        s = sigma.double().reshape(-1)
        j = (self.grid[None, :] - s[:, None]).abs().argmin(1)
        sm, sn = self.grid[j + 1], self.grid[j + 2]
        k = (_euler_gain(s, sm) * _euler_gain(sm, sn) - sn / s) / (1 - sn / s)
        return (k[:, None] * x.double()).float() + self.w * 0


@pytest.mark.parametrize("start", [2, 8])
def test_exact_student_has_zero_loss_through_the_method(start):
    """The whole per-iteration path (σ draws on the stage grid, x_s = x + σε, two teacher steps, weighting): a
    student that outputs the exact two-step target of a perfect Gaussian teacher has zero loss, and the
    teacher-initialised student (which makes the one-step error) has a positive one."""
    teacher = GaussianDenoiser(0.0, math.sqrt(C2)).eval().requires_grad_(False)
    m = _pd(teacher, batch_size=256, start_steps=start, iters_per_halving=3)
    batch = (torch.randn(256, 2, generator=torch.Generator().manual_seed(4)) * math.sqrt(C2), None)
    loss_init, _ = m.loss(m.phases(0)[0], batch, 0)
    m.student = OracleStudent(m.student_steps)
    loss, _ = m.loss("student", batch, 0)
    assert float(loss.detach()) < 1e-8 * max(1.0, float(loss_init.detach())) and float(loss_init.detach()) > 1e-4


# ------------------------------------------------------------------------------------------------ weighting
def test_weightings_match_direct_eps_and_v_space_mses():
    """Oracle 4: max(e, ε-MSE) = max(SNR, 1)·e and v-MSE = (1 + SNR)·e, with ε and v computed directly in VP form;
    at SNR = 1: e, e, 2e."""
    g = torch.Generator().manual_seed(5)
    x_hat, x_til, eps = (torch.randn(6, 1, 3, 3, generator=g, dtype=torch.float64) for _ in range(3))
    sigma = torch.tensor([0.01, 0.3, 1.0, 2.0, 17.0, 80.0], dtype=torch.float64)
    x_s = x_til + sigma[:, None, None, None] * eps
    b = lambda v: v[:, None, None, None]   # noqa: E731
    alpha = 1 / torch.sqrt(1 + sigma ** 2)
    sig_vp = sigma * alpha
    e = (x_hat - x_til).square().flatten(1).mean(1)
    eps_hat, eps_til = (x_s - x_hat) / b(sigma), (x_s - x_til) / b(sigma)
    e_eps = (eps_hat - eps_til).square().flatten(1).mean(1)
    v = lambda x0, ep: b(alpha) * ep - b(sig_vp) * x0   # noqa: E731
    e_v = (v(x_hat, eps_hat) - v(x_til, eps_til)).square().flatten(1).mean(1)
    assert torch.allclose(pd_loss_weight(sigma, "truncated_snr") * e, torch.maximum(e, e_eps), rtol=1e-10)
    assert torch.allclose(pd_loss_weight(sigma, "snr_plus_one") * e, e_v, rtol=1e-10)
    assert torch.allclose(pd_loss_weight(sigma, "snr") * e, e_eps, rtol=1e-10)
    assert torch.equal(pd_loss_weight(sigma, "x"), torch.ones(6, dtype=torch.float64))
    assert torch.allclose(pd_loss_weight(sigma, "karras", 0.5), 1 / sigma ** 2 + 4, rtol=1e-12)
    one = torch.ones(1, dtype=torch.float64)
    assert [float(pd_loss_weight(one, w)) for w in ("x", "truncated_snr", "snr_plus_one")] == [1.0, 1.0, 2.0]
    # reduction: mean over pixels per example, then the batch mean of the weighted errors
    want = sum(float(torch.maximum(e, e_eps)[i]) for i in range(6)) / 6
    assert float(pd_loss(x_hat, x_til, sigma)) == pytest.approx(want, rel=1e-10)
    with pytest.raises(UserError):
        pd_loss_weight(sigma, "lpips")


def test_loss_gradient_points_from_student_to_target():
    x_til = torch.randn(8, 2, generator=torch.Generator().manual_seed(6))
    x_hat = torch.zeros(8, 2, requires_grad=True)
    sigma = torch.full((8,), 0.5)
    pd_loss(x_hat, x_til, sigma).backward()
    want = 4.0 * 2 * (x_hat.detach() - x_til) / (2 * 8)   # w = 1/0.25 = 4; d/dx̂ of mean_b mean_2 (x̂ − x̃)²
    assert torch.allclose(x_hat.grad, want, atol=1e-6)


# ------------------------------------------------------------------------------------------------ grid, stages
def test_grid_endpoints_nesting_and_draws():
    for n in (1, 2, 4, 8):
        s = pd_student_sigmas(n)
        assert len(s) == n + 1 and s[0] == pytest.approx(80.0) and s[-1] == pytest.approx(0.002)
        assert all(a > b for a, b in zip(s, s[1:]))
        t = pd_student_sigmas(2 * n)
        assert all(abs(a - b) <= 1e-9 * a for a, b in zip(s, t[::2]))        # the teacher's grid nests
    assert pd_student_sigmas(4)[2] == pytest.approx(_karras(0.5))
    c = [float(v) for v in cosine_sigma(torch.tensor([0.0, 1.0]))]
    assert c == pytest.approx([80.0, 0.002]) and pd_student_sigmas(2, grid="cosine") == pytest.approx(
        [80.0, float(cosine_sigma(0.5)), 0.002])
    m = _pd(batch_size=4000, start_steps=8, iters_per_halving=5)
    s, sm, sn = m.stage_sigmas(4000)
    grid = torch.tensor(pd_student_sigmas(4), dtype=torch.float32)   # stage 0: a 4-step student
    idx = (s[:, None] - grid[None]).abs().argmin(1)
    assert torch.equal(s, grid[idx]) and torch.equal(sn, grid[idx + 1]) and set(idx.tolist()) == set(range(4))
    assert torch.allclose(sm, _karras((idx.double() + 0.5) / 4).float())
    assert bool((s > sm).all() and (sm > sn).all())                          # t > t′ > t″


def test_halving_bookkeeping():
    """Oracle 6: N_k = N₀/2^k over log₂N₀ stages; each stage's teacher is the previous stage's student; a fresh
    optimizer per halving; the sampling recipe is the current student's own DDIM grid."""
    assert halving_stages(8) == [(8, 4), (4, 2), (2, 1)]
    assert halving_stages(64, 4) == [(64, 32), (32, 16), (16, 8), (8, 4)]
    for bad in ((6, 1), (8, 8), (1, 1), (8, 3), (8, 0)):
        with pytest.raises(UserError):
            halving_stages(*bad)
    assert ProgressiveDistillation.planned_steps({"start_steps": 16, "iters_per_halving": 7}) == 28
    assert ProgressiveDistillation.planned_steps({"start_steps": 16, "iters_per_halving": 7, "student_steps": 4}) == 14

    m = _pd(start_steps=8, iters_per_halving=3, lr=1e-2)
    batch = (torch.randn(16, 2, generator=torch.Generator().manual_seed(7)), None)
    seen = []
    for step in range(11):
        stage = m.stage
        assert m.phases(step) == ["student"] and m.stage == stage      # phases() has no side effects
        m.before_step(step)                                            # the trainer's start-of-iteration hook
        phase = m.phases(step)[0]
        if step in (3, 6):                           # a stage boundary: the new teacher is the trained student
            for a, b in zip(m.teacher.state_dict().values(), m.student.state_dict().values()):
                assert torch.equal(a, b)
            assert not m.optimizers[phase].state and m.optimizers[phase].param_groups[0]["lr"] == 1e-2
        seen.append((m.stage, m.teacher_steps, m.student_steps))
        spec = m.sampling_spec()
        assert spec["sampler"] == "ddim" and spec["sigmas"] == pd_student_sigmas(m.student_steps)
        assert m.sampling_variants() == {m.student_steps: spec}
        before = [p.detach().clone() for p in m.teacher.parameters()]
        loss, _ = m.loss(phase, batch, step)
        m.optimizers[phase].zero_grad()
        loss.backward()
        m.optimizers[phase].step()
        m.schedulers[phase].step()
        assert all(torch.equal(a, b) for a, b in zip(before, m.teacher.parameters()))   # the teacher is frozen
    assert seen == [(0, 8, 4)] * 3 + [(1, 4, 2)] * 3 + [(2, 2, 1)] * 5       # stays at the last stage
    # linear decay to 0 within the halving (official PD): lr ∝ 1 − k/K
    m2 = _pd(start_steps=2, iters_per_halving=4, lr=1.0)
    lrs = []
    for _ in range(4):
        lrs.append(m2.optimizers["student"].param_groups[0]["lr"])
        m2.optimizers["student"].step()
        m2.schedulers["student"].step()
    assert lrs == pytest.approx([1.0, 0.75, 0.5, 0.25])
    # a longer last halving (more --iters than the schedule) stretches its decay; earlier halvings keep K
    m3 = _pd(start_steps=4, iters_per_halving=2, lr=1.0, final_stage_iters=4)
    m3.before_step(2)
    lrs = []
    for _ in range(4):
        lrs.append(m3.optimizers["student"].param_groups[0]["lr"])
        m3.optimizers["student"].step()
        m3.schedulers["student"].step()
    assert m3.stage == 1 and lrs == pytest.approx([1.0, 0.75, 0.5, 0.25])


def test_options_are_checked():
    for bad in ({"start_steps": 12}, {"iters_per_halving": 0}, {"weighting": "nope"}, {"grid": "linear"},
                {"lr_schedule": "step"}, {"student_steps": 2, "start_steps": 2}):
        with pytest.raises(UserError):
            _pd(**bad)
    teacher, cfg = tiny_teacher(MLP_CFG)
    ctx = make_ctx(None, cfg)
    with pytest.raises(UserError):
        ProgressiveDistillation(ctx)


def dropout_rates(net):
    """Every dropout rate of ``net``: nn.Dropout modules and the float ``dropout`` of the U-Net blocks."""
    return [float(m.p) if isinstance(m, nn.modules.dropout._DropoutNd) else float(m.dropout) for m in net.modules()
            if isinstance(m, nn.modules.dropout._DropoutNd)
            or isinstance(getattr(m, "dropout", None), float)]


def test_options_schema_and_official_defaults():
    """The defaults are the official CIFAR-10 recipe (google-research diffusion_distillation
    config/cifar_distill.py:22-24 8192 → 1, 50k per halving; :82-88 Adam 5e-5, no warm-up, linear decay, wd 0,
    clip 1 (a run setting); :67 snr_trunc); bad values are refused by the schema with one line."""
    o = PDOptions()
    assert (o.start_steps, o.student_steps, o.iters_per_halving, o.lr, o.lr_schedule, o.weight_decay, o.weighting,
            o.student_dropout) == (8192, 1, 50_000, 5e-5, "linear", 0.0, "truncated_snr", 0.0)
    assert ProgressiveDistillation.planned_steps({}) == 13 * 50_000
    for bad, match in (({"lr": 0}, "method.lr must be > 0"), ({"start_steps": 12}, "power-of-two"),
                       ({"student_dropout": 1.0}, "student_dropout"), ({"grid": "linear"}, "one of .karras., .cosine.")):
        with pytest.raises(UserError, match=match):
            PDOptions.from_dict(bad)


@pytest.mark.parametrize("method", ["pd", "cfd", "rdd"])
def test_student_has_no_dropout_by_default(method):
    """Issue 17 item 9. Both official PD configs train the student without dropout (google-research
    diffusion_distillation config/cifar_distill.py:52 "same as teacher but with 0 dropout", :61 dropout=0.;
    imagenet64_distill.py:63 dropout=0.), as do RCFD (zju-SWJ/RCFD config/CIFAR10_RCFD.txt:21 --dropout=0.) and RDD
    (cantbebetter2/RDD config/CIFAR10_PD.txt:21). A teacher with dropout 0.13 (an EDM CIFAR-10 snapshot's) gives a
    student whose every dropout rate is 0; student_dropout=null keeps the teacher's."""
    from helpers.dm_helpers import UNET_CFG
    from diffdistill.methods.registry import get_method
    import diffdistill.methods.rdd  # noqa: F401  (registers cfd and rdd)
    cls = get_method(method)
    extra = {} if method == "pd" else {"classifier": "helpers.pd_helpers:random_digits_cnn"}
    if method == "rdd":
        extra.update(queue_size=64, queue_adds=16, contrast_size=32)
    teacher, cfg = tiny_teacher(UNET_CFG, dropout=0.13)
    rates = dropout_rates(teacher)
    assert rates and all(r == pytest.approx(0.13) for r in rates)
    m = cls(make_ctx(teacher, cfg), start_steps=2, iters_per_halving=2, **extra)
    assert dropout_rates(m.student) == [0.0] * len(rates)
    assert dropout_rates(teacher) == rates                        # the caller's teacher is not touched
    keep = cls(make_ctx(teacher, cfg), start_steps=2, iters_per_halving=2, student_dropout=None, **extra)
    assert dropout_rates(keep.student) == rates


# ------------------------------------------------------------------------------------------------ trainer, resume
def _trainer(out, steps, method="pd", resume=None, **opts):
    from diffdistill.train.trainer import Trainer
    teacher, cfg = tiny_teacher(MLP_CFG)
    run = {"out": str(out), "steps": steps, "batch_size": 32, "log_every": 1, "ckpt_every": 0, "sample_every": 0,
           "progress": False, "seed": 0, "device": "cpu", "keep_ckpts": 3, "nan_policy": "stop", "grad_clip": 1.0,
           "resume": resume, "num_sample_grid": 16}
    full = {"run": run, "data": {"name": "ring8", "n": 500, "seed": 0}, "net": cfg,
            "method": {"name": method, "lr": 1e-3, "start_steps": 8, "iters_per_halving": 4, **opts}}
    return Trainer(full, teacher=teacher, teacher_path="mem")


@pytest.mark.parametrize("split", [6, 8])
def test_resume_mid_schedule_is_bitwise_exact(tmp_path, split):
    """12 iterations (stages 8→4, 4→2, 2→1 of 4 iterations each) in one go, or stopped at ``split`` (mid-stage or
    at a boundary) and resumed: identical student, teacher, optimizer state and stage."""
    full = _trainer(tmp_path / "full", 12)
    full.run()
    _trainer(tmp_path / "split", split).run()
    ck = torch.load(sorted((tmp_path / "split" / "checkpoints").glob("*.pt"))[-1], weights_only=True)
    assert ck["method_state"]["extra"]["stage"] == 1     # at step 8 the next stage starts in before_step(8)
    assert ck["sampling"]["sigmas"] == pd_student_sigmas(2)
    resumed = _trainer(tmp_path / "split", 12, resume="auto")
    resumed.run()
    steps = [json.loads(line)["step"] for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))
    a, b = full.method.state_dict(), resumed.method.state_dict()
    assert a["extra"] == b["extra"] == {"stage": 2}
    for net in ("student", "teacher"):
        for k, v in a["nets"][net].items():
            assert torch.equal(v, b["nets"][net][k]), (net, k)
    sa, sb = a["optimizers"]["student"]["state"], b["optimizers"]["student"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)
    assert a["schedulers"] == b["schedulers"]
    logs = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert [r["pd/student_steps"] for r in logs] == [4.0] * 4 + [2.0] * 4 + [1.0] * 4


# ------------------------------------------------------------------------------------------------ CLI, config
def test_distill_config_plans_the_schedule_and_cli_flags(ring8_teacher, tmp_path, capsys):
    from diffdistill.cli import main
    from diffdistill.distill import distill_config
    tstate = {"config": {"data": {"name": "ring8"}}, "net_config": dict(MLP_CFG)}
    cfg = distill_config("pd", tstate, flags={"method": {"start_steps": 16, "iters_per_halving": 10}})
    assert cfg["run"]["steps"] == 40
    cfg = distill_config("pd", tstate, overrides=["method.iters_per_halving=3"])
    assert cfg["run"]["steps"] == 3 * 6                       # points preset: 64 → 1
    cfg = distill_config("pd", tstate, flags={"run": {"steps": 5}, "method": {"iters_per_halving": 10}})
    assert cfg["run"]["steps"] == 5                           # explicit --iters below the plan: stops early
    cfg = distill_config("pd", tstate, flags={"run": {"steps": 75}, "method": {"iters_per_halving": 10}})
    assert cfg["run"]["steps"] == 75 and cfg["method"]["final_stage_iters"] == 25   # the last halving runs longer
    cfg = distill_config("pd", tstate, flags={"run": {"steps": 1000}})
    assert cfg["method"]["iters_per_halving"] == 166 and cfg["run"]["steps"] == 996   # --iters alone: spread evenly
    assert cfg["run"]["ckpt_every"] == 166                    # every halving boundary gets a checkpoint
    cfg = distill_config("pd", tstate, overrides=["method.iters_per_halving=1000"])
    assert cfg["run"]["ckpt_every"] == 250                    # the largest divisor of K within the preset's 300
    cfg = distill_config("pd", tstate, overrides=["method.iters_per_halving=1000", "run.ckpt_every=7"])
    assert cfg["run"]["ckpt_every"] == 7                      # an explicit value is kept
    cfg = distill_config("pd", tstate, flags={"run": {"steps": 10 ** 7, "max_minutes": 2}})
    assert cfg["run"]["steps"] == 1800                        # a time budget keeps the preset's schedule as the cap
    with pytest.raises(UserError, match="one iteration per halving"):
        distill_config("pd", tstate, flags={"run": {"steps": 3}})
    # the CLI: the flags reach the method; the schema of a method without a halving schedule refuses them
    out = str(tmp_path / "cli")
    assert main(["distill", "--method", "dmd2", "--teacher", str(ring8_teacher.path), "--start-steps", "8",
                 "--out", out]) == 2
    err = capsys.readouterr().err
    assert "is not an option of dmd2" in err and len(err.strip().splitlines()) == 1
    assert main(["distill", "--method", "pd", "--teacher", str(ring8_teacher.path), "--iters-per-halving", "0",
                 "--out", out]) == 2
    assert "method.iters_per_halving must be >= 1" in capsys.readouterr().err


def test_cli_distill_pd_end_to_end(tmp_path, capsys):
    from diffdistill.cli import main
    from diffdistill.config import resolve
    from diffdistill.eval.evaluate import evaluate_checkpoint
    from diffdistill.train.trainer import Trainer
    tcfg = resolve("ring8", flags={"run": {"out": str(tmp_path / "t"), "steps": 20, "batch_size": 64,
                                           "ckpt_every": 0, "sample_every": 0, "progress": False},
                                   "net": {"kwargs": {"hidden": 32, "depth": 2}}, "data": {"n": 500}})
    Trainer(tcfg).run()
    ckpt = sorted((tmp_path / "t" / "checkpoints").glob("*.pt"))[-1]
    rc = main(["distill", "--method", "pd", "--teacher", str(ckpt), "--start-steps", "4", "--iters-per-halving", "3",
               "--batch-size", "32", "--out", str(tmp_path / "s"), "--no-progress", "--set", "run.sample_every=0"])
    assert rc == 0, capsys.readouterr().err
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    assert cfg["run"]["steps"] == 6 and cfg["method"]["start_steps"] == 4
    final = sorted((tmp_path / "s" / "checkpoints").glob("*.pt"))[-1]
    m = evaluate_checkpoint(final, num_samples=200)
    assert m["nfe"] == 1 and m["method"] == "pd" and m["sigmas"][0] == pytest.approx(80.0)
    assert evaluate_checkpoint(final, steps=1, num_samples=50)["nfe"] == 1      # its own step count is accepted
    with pytest.raises(UserError, match="trained for 1 step"):
        evaluate_checkpoint(final, steps=2, num_samples=50)


# ------------------------------------------------------------------------------------------------ ring8 end to end
def _ring8(ring8_teacher, out, seed=0, n=2000):
    from diffdistill.distill import distill
    from diffdistill.eval.evaluate import evaluate_net, load_for_sampling
    tr = distill("pd", ring8_teacher.path, flags={
        "run": {"out": str(out), "progress": False, "ckpt_every": 0, "sample_every": 0, "batch_size": 256,
                "seed": seed},
        "method": {"iters_per_halving": 100}})
    data = ring8_teacher.data_cfg
    student = evaluate_net(tr.method.sampling_net(), tr.method.sampling_spec(), data, n, seed=0)
    net, _ = load_for_sampling(ring8_teacher.path)
    teacher = evaluate_net(net, {"sampler": "heun", "nfe": 35}, data, n, seed=0)
    euler1 = evaluate_net(net, {"sampler": "euler", "nfe": 1}, data, n, seed=0)
    return tr, student, teacher, euler1


def test_pd_ring8_64_to_1_step(ring8_teacher, tmp_path):
    """The points preset's 64 → 1 schedule (6 halvings × 100 iterations, batch 256; ≈ 15 s on one thread) turns the
    ring8 teacher (35 NFE) into a 1-step DDIM student. Measured: sliced W2 0.039 against the teacher's 0.036 at 35
    NFE (1.09×) and 0.50 for the teacher's own 1-step Euler; asserted: ≤ 1.5× the teacher and ≤ 0.2× its 1-step."""
    tr, student, teacher, euler1 = _ring8(ring8_teacher, tmp_path)
    print("pd ring8 sliced W2: 1-step student", student["sliced_w2"], "teacher 35 NFE", teacher["sliced_w2"],
          "teacher 1-step Euler", euler1["sliced_w2"], "modes", student.get("modes_covered"))
    assert tr.step == 600 and tr.method.student_steps == 1 and student["nfe"] == 1
    assert student["sliced_w2"] <= 1.5 * teacher["sliced_w2"]
    assert student["sliced_w2"] <= 0.2 * euler1["sliced_w2"]
    assert student["modes_covered"] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_pd_ring8_other_seeds(ring8_teacher, tmp_path, seed):
    _, student, teacher, euler1 = _ring8(ring8_teacher, tmp_path, seed=seed)
    print(f"pd ring8 seed {seed}: student", student["sliced_w2"], "teacher", teacher["sliced_w2"])
    assert student["sliced_w2"] <= 1.5 * teacher["sliced_w2"]
