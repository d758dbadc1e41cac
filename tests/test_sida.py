"""SiDA (SiD + adversarial term on real data; Zhou et al. 2024b): losses vs direct computations, the schedule, the
gradient clip, data use, and a 2-D run."""

import math

import pytest
import torch

from helpers.dm_helpers import MLP_CFG, UNET_CFG, make_ctx, tiny_teacher
from diffdistill.errors import UserError
from diffdistill.methods.sid import SiD, sida_critic_loss, sida_generator_loss, sida_logits


def _sig(v):
    return 1.0 / (1.0 + math.exp(-v))


def test_critic_loss_matches_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    lr, lf = torch.randn(3, 2, 2, generator=g), torch.randn(3, 2, 2, generator=g)
    sigma = torch.tensor([0.1, 1.0, 5.0])
    total = 0.0
    for b in range(3):
        s = float(sigma[b])
        lam = (s * s + 0.25) / (s * 0.5) ** 2
        real = sum(-math.log(_sig(float(v))) for v in lr[b].flatten()) / 4
        fake = sum(-math.log(1 - _sig(float(v))) for v in lf[b].flatten()) / 4
        total += lam * 0.5 * (real + fake)
    assert float(sida_critic_loss(lr, lf, sigma)) == pytest.approx(total / 3, rel=1e-5)


def test_generator_adv_loss_matches_a_direct_computation_and_clamps():
    logits = torch.tensor([[0.5, -2.0], [30.0, -30.0]])   # ±30 are clamped to ±10
    w = torch.tensor([0.2, 0.5])
    chw = 12
    direct = 0.0
    for b in range(2):
        bce = sum(-math.log(_sig(max(-10.0, min(10.0, float(v)))) ) for v in logits[b]) / 2
        direct += bce * chw / float(w[b])
    direct *= 0.01 * 100 / 2
    assert float(sida_generator_loss(logits, w, chw)) == pytest.approx(direct, rel=1e-5)
    # gradient direction: the generator is pushed to raise the discriminator's logits (toward "real")
    x = torch.zeros(2, 2, requires_grad=True)
    sida_generator_loss(x, w, chw).backward()
    assert (x.grad < 0).all()


def test_logits_are_the_channel_mean_of_the_bottleneck():
    teacher, cfg = tiny_teacher(UNET_CFG)
    x, s = torch.randn(2, *teacher.sample_shape), torch.tensor([0.5, 2.0])
    feats = teacher(x, s, bottleneck_only=True)
    assert feats.ndim == 4
    assert torch.equal(sida_logits(teacher, x, s), feats.mean(1))


def _sida(batch_size=16, **opts):
    teacher, cfg = tiny_teacher(MLP_CFG)
    return SiD(make_ctx(teacher, cfg, batch_size=batch_size), sida=True, **opts)


def test_schedule_data_use_and_missing_data():
    assert not SiD.uses_data({}) and SiD.uses_data({"sida": True})
    m = _sida(batch_size=10, sida_g_start_kimg=0.05, sida_gan_start_kimg=0.1)
    assert m.phases(0) == ["critic"] and m.phases(4) == ["critic"] and m.phases(5) == ["critic", "generator"]
    with pytest.raises(UserError, match="real data"):
        m.loss("critic", None, 0)


def test_critic_and_generator_losses_and_fake_score_grad_clip():
    m = _sida(sida_g_start_kimg=0.0, sida_gan_start_kimg=0.0)
    real = (torch.randn(16, 2) * 0.5, None)
    loss, logs = m.loss("critic", real, 0)
    assert {"sida/d", "sida/d_real_acc", "sida/d_fake_acc", "sid/fake_score"} <= set(logs)
    (loss * 1e6).backward()                              # a huge loss: every fake-score gradient entry hits the clip
    gmax = max(float(p.grad.abs().max()) for p in m.fake.parameters() if p.grad is not None)
    assert gmax == pytest.approx(1.0)
    m.fake.zero_grad(set_to_none=True)
    loss, logs = m.loss("generator", real, 1)
    assert "sida/g_adv" in logs and math.isfinite(float(loss.detach()))
    loss.backward()
    assert all(p.grad is None for p in m.fake.parameters())      # the discriminator is frozen in the G phase
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.G.parameters())


def test_plain_sid_still_builds_no_loader_and_sida_does(tmp_path):
    from diffdistill.train.trainer import Trainer
    teacher, cfg = tiny_teacher(MLP_CFG)
    run = {"out": str(tmp_path), "steps": 2, "batch_size": 8, "log_every": 1, "ckpt_every": 0, "sample_every": 0,
           "progress": False, "seed": 0, "device": "cpu", "keep_ckpts": 1, "nan_policy": "stop", "grad_clip": None,
           "resume": None, "num_sample_grid": 4}
    data = {"name": "ring8", "n": 200, "seed": 0}
    plain = Trainer({"run": run, "data": data, "net": cfg, "method": {"name": "sid"}}, teacher=teacher,
                    teacher_path="mem")
    assert plain.dataset is None
    sida = Trainer({"run": dict(run, out=str(tmp_path / "a")), "data": data, "net": cfg,
                    "method": {"name": "sid", "sida": True, "sida_g_start_kimg": 0.0, "sida_gan_start_kimg": 0.0}},
                   teacher=teacher, teacher_path="mem")
    assert sida.dataset is not None
    logs = sida.run()
    assert math.isfinite(logs["sida/g_adv"]) and math.isfinite(logs["sida/d"])


@pytest.mark.slow  # ≈ 60 s alone; SiD's own ring8 run stays in the default suite
def test_sida_ring8_end_to_end(ring8_teacher, tmp_path):
    """SiDA on the ring8 teacher (points preset, α 1.0 as official SiDA, schedule scaled to the run) still
    converges: measured 1.56× the teacher's sliced W2 at 35 NFE (α 1.2: 1.96×; plain SiD 0.93–1.21×). On 2-D data
    the discriminator term weighs far more against the 2-pixel denoising loss than on images, so SiDA is not the
    choice there; the bound checks it trains, not that it helps."""
    r = ring8_teacher.distill_and_eval("sid", tmp_path, 800, overrides=[
        "method.sida=true", "method.alpha=1.0", "method.sida_g_start_kimg=20", "method.sida_gan_start_kimg=40"])
    assert r["student"] <= 2.0 * r["teacher"], r
    assert r["student"] <= r["untrained"] / 3, r
    assert r["trainer"].dataset is not None
