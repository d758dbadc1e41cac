"""CFD (Sun et al. 2023) and RDD (Feng et al. 2024) on top of progressive distillation: every loss against a direct
computation from the papers' definitions on small tensors, the memory bank's FIFO rules, the official enqueue (the
reshape bug behind the compat flag, and the per-pixel normalisation before it) against the official code's steps,
the pluggable classifier, the method wiring (what the classifier sees, where gradients go, the head's own phase with
the official gradient, per-stage reset), and exact resume with a memory bank."""

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F

from helpers.dm_helpers import MLP_CFG, UNET_CFG, make_ctx, tiny_teacher
from diffdistill.errors import UserError
from diffdistill.methods.cfd import CFD, cfd_diversity_loss, cfd_entropy_loss, cfd_feature_kl, cfd_loss
from diffdistill.methods.feature_classifiers import classifier_outputs, load_feature_classifier
from diffdistill.methods.pd import pd_loss, pd_target
from diffdistill.methods.rdd import (RDD, PixelMemoryBank, intra_sample_p2p_loss, memory_p2p_loss, pixel_rows)

SMALL_CNN = "helpers.pd_helpers:random_digits_cnn"
SMALL_MLP = "helpers.pd_helpers:random_points_mlp"


def _softmax(v):
    m = max(v)
    e = [math.exp(a - m) for a in v]
    return [a / sum(e) for a in e]


def _kl(p, q):
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q) if a > 0)


# ------------------------------------------------------------------------------------------------ CFD losses
def test_feature_kl_matches_a_double_loop_and_its_gradient():
    g = torch.Generator().manual_seed(0)
    f_s, f_t = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.rand(3, 5, generator=g, dtype=torch.float64)
    tau = 0.9
    want = sum(_kl(_softmax([v / tau for v in f_t[b].tolist()]), _softmax(f_s[b].tolist())) for b in range(3)) / 3
    assert float(cfd_feature_kl(f_s, f_t, tau)) == pytest.approx(want, rel=1e-12)
    # ∂L/∂f_S = (softmax(f_S) − softmax(f_T/τ))/B, and no gradient reaches the teacher's features
    f_s.requires_grad_(True)
    f_t.requires_grad_(True)
    cfd_feature_kl(f_s, f_t, tau).backward()
    want_grad = (torch.softmax(f_s.detach(), -1) - torch.softmax(f_t.detach() / tau, -1)) / 3
    assert torch.allclose(f_s.grad, want_grad, atol=1e-14) and f_t.grad is None


def test_feature_kl_zero_exactly_at_the_sharpened_teacher():
    """Oracle 1: L_feat ≥ 0, = 0 iff f_S = f_T/τ + c·1; for τ ≠ 1 and non-constant f_T it is > 0 at f_S = f_T."""
    g = torch.Generator().manual_seed(1)
    f_t = torch.rand(4, 6, generator=g, dtype=torch.float64) * 3
    shift = torch.randn(4, 1, generator=g, dtype=torch.float64)
    for tau in (0.5, 0.9, 0.95, 1.0):
        assert float(cfd_feature_kl(f_t / tau + shift, f_t, tau)) == pytest.approx(0.0, abs=1e-14)
        at_teacher = float(cfd_feature_kl(f_t, f_t, tau))
        assert at_teacher == pytest.approx(0.0, abs=1e-14) if tau == 1.0 else at_teacher > 1e-4
    for _ in range(5):
        assert float(cfd_feature_kl(torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g), 0.9)) >= 0


def test_entropy_diversity_and_beta():
    """Oracle 3: uniform logits give L_ent = log C; L_div = −log C for balanced classes and 0 when every sample is
    the same one-hot class; β = 0 leaves L_feat exactly; otherwise L = L_feat + β(γL_ent + (1 − γ)L_div)."""
    C = 7
    assert float(cfd_entropy_loss(torch.zeros(5, C))) == pytest.approx(math.log(C), rel=1e-6)
    balanced = 60.0 * torch.eye(C)                       # sample c is (numerically) one-hot on class c
    assert float(cfd_diversity_loss(balanced)) == pytest.approx(-math.log(C), rel=1e-6)
    assert float(cfd_entropy_loss(balanced)) == pytest.approx(0.0, abs=1e-20)
    same = torch.zeros(4, C)
    same[:, 2] = 60.0
    assert float(cfd_diversity_loss(same)) == pytest.approx(0.0, abs=1e-20)
    g = torch.Generator().manual_seed(2)
    f_s, f_t, logits = torch.randn(6, 9, generator=g), torch.rand(6, 9, generator=g), torch.randn(6, C, generator=g)
    l0, _ = cfd_loss(f_s, f_t, logits, tau=0.9, beta=0.0)
    assert torch.equal(l0, cfd_feature_kl(f_s, f_t, 0.9))
    q = [_softmax(row) for row in logits.double().tolist()]
    ent = sum(-sum(a * math.log(a) for a in row) for row in q) / 6
    qbar = [sum(row[c] for row in q) / 6 for c in range(C)]
    div = sum(a * math.log(a) for a in qbar)
    l1, logs = cfd_loss(f_s, f_t, logits, tau=0.95, beta=0.003, gamma=0.75)
    want = float(cfd_feature_kl(f_s, f_t, 0.95)) + 0.003 * (0.75 * ent + 0.25 * div)
    assert float(l1) == pytest.approx(want, rel=1e-6)
    assert logs["cfd/entropy"] == pytest.approx(ent, rel=1e-5) and logs["cfd/diversity"] == pytest.approx(div, rel=1e-5)
    with pytest.raises(UserError, match="forward_head"):
        cfd_loss(f_s, f_t, None, beta=0.003)


# ------------------------------------------------------------------------------------------------ RDD losses
def _is_p2p_by_hand(ms, mt, tau=1.0):
    """The 4-deep loop of the sheet: for every (b, d, i) a softmax over the pixels j of d of ⟨ŝ_{b,i}, ŝ_{d,j}⟩/τ."""
    B, C, H, W = ms.shape
    HW = H * W

    def pixels(m):
        out = []
        for b in range(B):
            row = []
            for y in range(H):
                for x in range(W):
                    v = [float(m[b, c, y, x]) for c in range(C)]
                    n = math.sqrt(sum(a * a for a in v))
                    row.append([a / n for a in v])
            out.append(row)
        return out
    S, T = pixels(ms), pixels(mt)
    total = 0.0
    for b in range(B):
        for d in range(B):
            for i in range(HW):
                rs = [sum(a * c for a, c in zip(S[b][i], S[d][j])) / tau for j in range(HW)]
                rt = [sum(a * c for a, c in zip(T[b][i], T[d][j])) / tau for j in range(HW)]
                total += _kl(_softmax(rt), _softmax(rs))
    return total / (B * B * HW)


def test_is_p2p_hand_computed_on_2x2_pixels():
    """B = 2 samples of C = 2 channels on 2×2 pixels, written out; the loop above is the sheet's definition."""
    ms = torch.tensor([[[[1.0, 0.0], [2.0, 1.0]], [[0.0, 1.0], [1.0, 3.0]]],
                       [[[0.5, 2.0], [1.0, 0.0]], [[1.0, 1.0], [0.0, 2.0]]]], dtype=torch.float64)
    mt = torch.tensor([[[[1.0, 1.0], [0.0, 2.0]], [[2.0, 0.0], [1.0, 1.0]]],
                       [[[0.0, 1.0], [3.0, 1.0]], [[1.0, 0.5], [1.0, 0.0]]]], dtype=torch.float64)
    # one row by hand: b = d = 0, pixel i = (0,0) of the student: ŝ = (1, 0); the pixels of sample 0 normalise to
    # (1,0), (0,1), (2,1)/√5, (1,3)/√10, so the row is (1, 0, 2/√5, 1/√10)
    row = torch.einsum("c,cj->j", F.normalize(ms, dim=1)[0, :, 0, 0], F.normalize(ms, dim=1)[0].flatten(1))
    assert torch.allclose(row, torch.tensor([1.0, 0.0, 2 / math.sqrt(5), 1 / math.sqrt(10)], dtype=torch.float64))
    for tau in (1.0, 0.5):
        want = _is_p2p_by_hand(ms, mt, tau)
        assert float(intra_sample_p2p_loss(ms, mt, tau)) == pytest.approx(want, rel=1e-12)
    assert want > 0


def test_is_p2p_zero_cases_and_scale_invariance():
    g = torch.Generator().manual_seed(3)
    m = torch.rand(3, 4, 2, 3, generator=g, dtype=torch.float64)
    assert float(intra_sample_p2p_loss(m, m)) == pytest.approx(0.0, abs=1e-15)
    other = torch.rand(3, 4, 2, 3, generator=g, dtype=torch.float64)
    base = float(intra_sample_p2p_loss(m, other))
    scale_s = torch.rand(3, 1, 2, 3, generator=g, dtype=torch.float64) + 0.1     # positive per-pixel scales
    scale_t = torch.rand(3, 1, 2, 3, generator=g, dtype=torch.float64) + 0.1
    assert float(intra_sample_p2p_loss(m * scale_s, other * scale_t)) == pytest.approx(base, rel=1e-10)
    # HW = 1: every row has one entry, the loss is identically 0
    assert float(intra_sample_p2p_loss(torch.randn(5, 4, 1, 1, generator=g), torch.randn(5, 4, 1, 1, generator=g))) == 0
    # gradient reaches the student map only
    s = m.clone().requires_grad_(True)
    t = other.clone().requires_grad_(True)
    intra_sample_p2p_loss(s, t).backward()
    assert s.grad is not None and float(s.grad.abs().sum()) > 0 and t.grad is None


def test_memory_p2p_matches_a_loop_and_its_oracles():
    g = torch.Generator().manual_seed(4)
    B, C, H, W, M = 2, 3, 1, 2, 4
    s, t = torch.randn(B, C, H, W, generator=g, dtype=torch.float64), torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    q = F.normalize(torch.randn(M, C, generator=g, dtype=torch.float64), dim=1)
    for tau_c, tau_kd in ((0.1, 1.0), (0.5, 2.0)):
        total = 0.0
        for b in range(B):
            for y in range(H):
                for x in range(W):
                    vs = F.normalize(s[b, :, y, x], dim=0).tolist()
                    vt = F.normalize(t[b, :, y, x], dim=0).tolist()
                    ls = [sum(a * c for a, c in zip(vs, q[m].tolist())) / tau_c / tau_kd for m in range(M)]
                    lt = [sum(a * c for a, c in zip(vt, q[m].tolist())) / tau_c / tau_kd for m in range(M)]
                    total += _kl(_softmax(lt), _softmax(ls))
        want = tau_kd ** 2 * total / (B * H * W)
        assert float(memory_p2p_loss(s, t, q, tau_c, tau_kd)) == pytest.approx(want, rel=1e-12)
    assert float(memory_p2p_loss(t, t, q)) == pytest.approx(0.0, abs=1e-15)          # S = T (head bypassed)
    scale = torch.rand(B, 1, H, W, generator=g, dtype=torch.float64) + 0.2
    assert float(memory_p2p_loss(s * scale, t, q)) == pytest.approx(float(memory_p2p_loss(s, t, q)), rel=1e-10)


# ------------------------------------------------------------------------------------------------ memory bank
def test_memory_bank_fifo():
    """Oracle 2: after n updates with no wrap p = n·K; the wrap writes the last K slots and resets p; the written
    rows are the L2-normalised, randomly chosen pixels; K = min(#pixels, adds)."""
    g = torch.Generator().manual_seed(5)
    bank = PixelMemoryBank(10, 3, 3, 4, g)
    assert torch.allclose(bank.queue.norm(dim=1), torch.ones(10)) and bank.ptr == 0
    assert bank.contrast_index.tolist() == [0, 3, 6, 9]
    for n in range(1, 4):
        fmap = torch.randn(2, 3, 1, 2, generator=g)                 # 4 pixels, K = 3
        before = bank.queue.clone()
        replay = torch.Generator().set_state(g.get_state())
        rows = fmap.permute(0, 2, 3, 1).reshape(-1, 3)
        pick = torch.randperm(4, generator=replay)[:3]
        assert bank.enqueue(fmap, g) == 3
        p0 = 3 * (n - 1)
        assert bank.ptr == 3 * n
        assert torch.allclose(bank.queue[p0:p0 + 3], F.normalize(rows[pick], dim=1))
        keep = [i for i in range(10) if not p0 <= i < p0 + 3]
        assert torch.equal(bank.queue[keep], before[keep])
    before = bank.queue.clone()                                     # p = 9: 9 + 3 ≥ 10 → slots 7..9, p = 0
    bank.enqueue(torch.randn(2, 3, 1, 2, generator=g), g)
    assert bank.ptr == 0 and torch.equal(bank.queue[:7], before[:7]) and not torch.equal(bank.queue[7:], before[7:])
    bank.ptr = 7                                                    # exactly filling the end also wraps (p + K ≥ Q)
    bank.enqueue(torch.randn(2, 3, 1, 2, generator=g), g)
    assert bank.ptr == 0
    assert bank.enqueue(torch.randn(1, 3, 1, 2, generator=g), g) == 2 and bank.ptr == 2     # K = min(2 pixels, 3)
    official = PixelMemoryBank(20_000, 4, 128, 4096, torch.Generator().manual_seed(0))
    idx = official.contrast_index
    assert int(idx[0]) == 0 and int(idx[-1]) == 19_999 and idx.unique().numel() == 4096
    for bad in ((10, 3, 11, 4), (10, 3, 3, 11), (10, 3, 0, 4)):
        with pytest.raises(UserError):
            PixelMemoryBank(*bad, g)


def test_enqueue_reshape_correct_vs_official_view_bug():
    """Oracle 3: with every pixel a unique one-hot code, the correct enqueue stores exactly those codes and the
    official view does not (B > 1); at B = 1 they agree."""
    B, HW, C = 2, 2, 4
    codes = torch.eye(C).reshape(B, 1, HW, C).permute(0, 3, 1, 2)   # [B, C, 1, HW]; pixel (b, p) = e_{b·HW+p}
    assert torch.equal(pixel_rows(codes), torch.eye(C))
    assert not torch.equal(pixel_rows(codes, compat_view_bug=True), torch.eye(C))
    right, compat = (PixelMemoryBank(8, C, 4, 8, torch.Generator().manual_seed(0)) for _ in range(2))
    right.enqueue(codes, torch.Generator().manual_seed(1))
    compat.enqueue(codes, torch.Generator().manual_seed(1), compat_view_bug=True)
    as_set = lambda rows: sorted(map(tuple, rows.tolist()))   # noqa: E731
    assert as_set(right.queue[:4]) == as_set(torch.eye(C))
    assert as_set(compat.queue[:4]) != as_set(torch.eye(C))
    one = codes[:1]
    assert torch.equal(pixel_rows(one), pixel_rows(one, compat_view_bug=True))


def _official_enqueue_rows(fmap, perm, K):
    """The rows the official enqueue writes (cantbebetter2/RDD losses/losses.py): the teacher map L2-normalised
    per pixel (:160) is passed to _dequeue_and_enqueue (:166), viewed as C × (B·H·W) without moving the channels
    last (:133), K columns picked by a random permutation (:137-139), transposed (:140) and each row normalised
    again before it is written (:144, :147)."""
    t = F.normalize(fmap, p=2, dim=1)
    C = t.shape[1]
    feat = t.contiguous().view(C, -1)[:, perm[:K]]
    return F.normalize(feat.t(), p=2, dim=1)


def test_compat_queue_holds_the_official_rows_on_random_maps():
    """Issue 17 item 8. With random maps (pixels not of unit norm) the compat queue holds exactly the official rows,
    through a wrap of the ring pointer; the default mode holds the normalised channels-last pixels. (Normalising the
    raw map's mixed rows instead, as before, gives rows far from the official ones.)"""
    B, C, H, W, K, Q = 3, 5, 2, 2, 8, 20
    g = torch.Generator().manual_seed(7)
    maps = [torch.randn(B, C, H, W, generator=g) * 3 + 0.5 for _ in range(3)]
    for compat in (True, False):
        bank = PixelMemoryBank(Q, C, K, Q, torch.Generator().manual_seed(0))
        gen = torch.Generator().manual_seed(1)
        want = bank.queue.clone()
        ptr = 0
        for fmap in maps:
            perm = torch.randperm(B * H * W, generator=torch.Generator().set_state(gen.get_state()))
            bank.enqueue(fmap, gen, compat_view_bug=compat)
            rows = (_official_enqueue_rows(fmap, perm, K) if compat else
                    F.normalize(fmap.permute(0, 2, 3, 1).reshape(-1, C)[perm[:K]], dim=1))
            if ptr + K >= Q:                                        # losses.py:143-145
                want[Q - K:], ptr = rows, 0
            else:
                want[ptr:ptr + K], ptr = rows, ptr + K
            assert bank.ptr == ptr
        assert torch.allclose(bank.queue, want, atol=1e-6), compat
    # the normalisation matters for the official view only: the old order (view the raw map, then normalise) is off
    perm = torch.randperm(B * H * W, generator=torch.Generator().manual_seed(1))
    old = F.normalize(maps[0].contiguous().view(C, -1)[:, perm[:K]].t(), dim=1)
    assert not torch.allclose(old, _official_enqueue_rows(maps[0], perm, K), atol=1e-2)


def test_correct_and_compat_memory_losses_differ_exactly_when_channels_and_samples_exceed_one():
    """The two enqueues give the same M_P2P loss exactly when C = 1 or B = 1 (the official view is right there),
    and different ones otherwise, whatever the pixels per sample (HW = 1 included)."""
    for B, C, HW in itertools.product((1, 2), (1, 3), (1, 4)):
        g = torch.Generator().manual_seed(10 * B + C + HW)
        fmap = torch.rand(B, C, 1, HW, generator=g) + 0.1
        student = torch.rand(B, C, 1, HW, generator=g) + 0.1
        losses = []
        for compat in (False, True):
            bank = PixelMemoryBank(16, C, 16, 16, torch.Generator().manual_seed(0))
            bank.enqueue(fmap, torch.Generator().manual_seed(1), compat_view_bug=compat)
            losses.append(float(memory_p2p_loss(student, fmap, bank.contrast())))
        differ = abs(losses[0] - losses[1]) > 1e-7
        assert differ == (B > 1 and C > 1), (B, C, HW, losses)


# ------------------------------------------------------------------------------------------------ classifiers
def test_digits_feature_classifier_is_trained_cached_and_not_the_proxy_fid_network(tmp_path):
    from diffdistill.eval.features import digits_heldout_accuracy
    from diffdistill.nets.classifier import DigitsClassifier
    from diffdistill.nets.feature_classifier import DigitsFeatureCNN
    clf = load_feature_classifier("auto", (1, 8, 8))
    assert isinstance(clf, DigitsFeatureCNN) and not isinstance(clf, DigitsClassifier)
    assert not clf.training and not any(p.requires_grad for p in clf.parameters())
    from diffdistill.eval.evaluate import digits_reference
    proxy = digits_reference()["classifier"]
    shapes = lambda net: {(k, tuple(v.shape)) for k, v in net.state_dict().items()}   # noqa: E731
    assert shapes(proxy) != shapes(clf) and any("bn" in k for k, _ in shapes(clf))   # another architecture
    for k, v in clf.state_dict().items():                           # and none of the proxy's trained weights
        if k in proxy.state_dict() and proxy.state_dict()[k].shape == v.shape:
            assert not torch.allclose(v, proxy.state_dict()[k])
    assert digits_heldout_accuracy(clf) >= 0.97
    again = load_feature_classifier("digits", (1, 8, 8))            # from the cache, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(clf.state_dict().values(), again.state_dict().values()))
    fmap, pooled, logits = classifier_outputs(clf, torch.zeros(3, 1, 8, 8))
    assert fmap.shape == (3, 64, 4, 4) and pooled.shape == (3, 64) and logits.shape == (3, 10)
    assert bool((fmap >= 0).all())                                  # post-ReLU, as DenseNet's final map


def test_classifier_choice_and_errors():
    from diffdistill.nets.feature_classifier import PointsComponentMLP
    ring = load_feature_classifier("auto", (2,), "ring8")
    assert isinstance(ring, PointsComponentMLP)
    from diffdistill.data.toy2d import ring8_gmm
    gmm = ring8_gmm()
    k = torch.arange(800) % 8
    x = gmm.means[k] + gmm.std * torch.randn(800, 2, generator=torch.Generator().manual_seed(0))
    assert float((ring(x).argmax(1) == k).float().mean()) > 0.99
    for args in (("auto", (2,), "two_moons"), ("auto", (3, 32, 32), None), ("digits", (2,), None),
                 ("nope", (2,), None), ("no.such.module:f", (2,), None)):
        with pytest.raises(UserError):
            load_feature_classifier(*args)
    plugged = load_feature_classifier(SMALL_CNN, (1, 8, 8))
    assert not plugged.training and not any(p.requires_grad for p in plugged.parameters())


# ------------------------------------------------------------------------------------------------ method wiring
def _method(cls=CFD, cfg=UNET_CFG, batch_size=8, data_name=None, **opts):
    teacher, cfg = tiny_teacher(cfg)
    opts.setdefault("classifier", SMALL_CNN if cfg["img_resolution"] else SMALL_MLP)
    ctx = make_ctx(teacher, cfg, batch_size=batch_size)
    ctx.data_name = data_name
    return cls(ctx, **opts)


def _batch(n=8, shape=(1, 8, 8), seed=0):
    return torch.rand((n,) + shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1, None


def _replay(m, state, batch):
    """Re-draw the PD part of one loss call from generator state ``state``: (x_s, σ, x̃, x̂)."""
    g = m.ctx.generator
    g.set_state(state)
    x = batch[0]
    sigma, sm, sn = m.stage_sigmas(len(x))
    x_s = x + sigma.reshape(-1, 1, 1, 1) * torch.randn(x.shape, generator=g)
    x_t = pd_target(m.teacher, x_s, sigma, sm, sn)
    return x_s, sigma, x_t, m.student(x_s, sigma)


def test_cfd_loss_reads_the_classifier_on_target_and_student():
    m = _method(beta=0.003, gamma=0.75, tau=0.95, start_steps=2, iters_per_halving=5)
    batch = _batch()
    state = m.ctx.generator.get_state()
    loss, logs = m.loss(m.phases(0)[0], batch, 0)
    _, sigma, x_t, x_hat = _replay(m, state, batch)
    _, f_t, _ = classifier_outputs(m.classifier, x_t)
    _, f_s, logits = classifier_outputs(m.classifier, x_hat)
    want, _ = cfd_loss(f_s, f_t, logits, 0.95, 0.003, 0.75)
    assert torch.allclose(loss, want, rtol=1e-5) and "pd/mse" not in logs and "cfd/entropy" in logs
    m.student.zero_grad(set_to_none=True)
    loss.backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in m.student.parameters())
    assert all(p.grad is None for p in m.classifier.parameters()) and all(p.grad is None for p in m.teacher.parameters())
    # pd_weight adds PD's own loss on the same target
    m2 = _method(start_steps=2, iters_per_halving=5, pd_weight=0.5)
    state = m2.ctx.generator.get_state()
    loss2, logs2 = m2.loss("student", batch, 0)
    _, sigma, x_t, x_hat = _replay(m2, state, batch)
    f_t, f_s = classifier_outputs(m2.classifier, x_t)[1], classifier_outputs(m2.classifier, x_hat)[1]
    want2 = cfd_feature_kl(f_s, f_t, 0.9) + 0.5 * pd_loss(x_hat, x_t, sigma)
    assert torch.allclose(loss2, want2, rtol=1e-5) and "pd/mse" in logs2


def test_cfd_plugs_in_from_the_8_step_teacher():
    """Plain PD while the teacher has more than ``feature_from_steps`` steps (official: PD down to 8, then CFD)."""
    m = _method(start_steps=16, iters_per_halving=2, feature_from_steps=8)
    batch = _batch()
    kinds = []
    for step in range(4):
        m.before_step(step)
        _, logs = m.loss(m.phases(step)[0], batch, step)
        kinds.append(("pd" if "pd/mse" in logs else "cfd", m.teacher_steps))
    assert kinds == [("pd", 16), ("pd", 16), ("cfd", 8), ("cfd", 8)]


def test_rdd_loss_is_cfd_plus_relations_with_the_enqueued_bank():
    m = _method(RDD, start_steps=2, iters_per_halving=5, queue_size=64, queue_adds=16, contrast_size=32)
    batch = _batch()
    state = m.ctx.generator.get_state()
    queue0 = m.bank.queue.clone()
    loss, logs = m.loss(m.phases(0)[0], batch, 0)
    assert m.bank.ptr == 16 and logs["rdd/is_p2p"] > 0
    # replay: PD draws, then the enqueue's random pixels (correct layout), then the three terms
    _, _, x_t, x_hat = _replay(m, state, batch)
    map_t, f_t, _ = classifier_outputs(m.classifier, x_t)
    map_s, f_s, _ = classifier_outputs(m.classifier, x_hat)
    bank = PixelMemoryBank(64, map_t.shape[1], 16, 32, torch.Generator().manual_seed(0))
    bank.queue = queue0
    bank.enqueue(map_t, m.ctx.generator)
    assert torch.equal(bank.queue, m.bank.queue)
    head_out = m.head(map_s)
    want = (cfd_feature_kl(f_s, f_t, 0.9) + 1.0 * intra_sample_p2p_loss(map_s, map_t, 1.0)
            + 0.1 * memory_p2p_loss(head_out, map_t, bank.contrast(), 0.1, 1.0))
    assert torch.allclose(loss, want, rtol=1e-5)


def _grads(module):
    return [p.grad.clone() for p in module.parameters()]


def test_rdd_head_is_a_trainer_phase_with_the_official_gradient():
    """Officially one backward of L_CFD + L_IS + 0.1·L_M(head(map_S)) fills the student's and the head's gradients
    (cantbebetter2/RDD train_rdd.py:211-219, diffusion.py:320-331), the student is clipped and stepped, and the head's
    own Adam (train_rdd.py:173) steps unclipped with no schedule (:220-225). Here the student phase differentiates
    w.r.t. the student only (the head's parameters held constant) and the ``rdd_head`` phase w.r.t. the head only:
    both gradients equal the official single backward's, and the head's BatchNorm statistics move once."""
    opts = dict(start_steps=4, iters_per_halving=2, queue_size=64, queue_adds=16, contrast_size=32)
    m, ref = _method(RDD, **opts), _method(RDD, **opts)
    assert m.phases(0) == ["student", "rdd_head"] and "rdd_head" not in m.schedulers
    assert {id(p) for p in m.trainable_params("rdd_head")} == {id(p) for p in m.head.parameters()}
    assert {id(p) for p in m.trainable_params("student")} == {id(p) for p in m.student.parameters()}
    batch = _batch()
    state = m.ctx.generator.get_state()
    loss, logs = m.loss("student", batch, 0)
    loss.backward()
    assert all(p.grad is None for p in m.head.parameters())       # the student phase leaves the head alone
    head_loss, _ = m.loss("rdd_head", batch, 0)
    head_loss.backward()
    # the official computation on the twin method, one backward of the total loss
    _, _, x_t, x_hat = _replay(ref, state, batch)
    map_t, f_t, _ = classifier_outputs(ref.classifier, x_t)
    map_s, f_s, _ = classifier_outputs(ref.classifier, x_hat)
    ref.bank.enqueue(map_t, ref.ctx.generator)
    total = (cfd_feature_kl(f_s, f_t, 0.9) + intra_sample_p2p_loss(map_s, map_t, 1.0)
             + 0.1 * memory_p2p_loss(ref.head(map_s), map_t, ref.bank.contrast(), 0.1, 1.0))
    total.backward()
    assert torch.allclose(loss, total, rtol=1e-6)
    for a, b in zip(_grads(m.student), _grads(ref.student)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-9)
    for a, b in zip(_grads(m.head), _grads(ref.head)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-9)
    assert float(head_loss.detach()) == pytest.approx(0.1 * logs["rdd/memory_p2p"], rel=1e-6)
    for a, b in zip(m.head.buffers(), ref.head.buffers()):       # one running-statistics update, as officially
        assert torch.equal(a, b)
    # a new halving (entered by before_step): the queue, its pointer, the head and its optimizer start afresh
    old_head, old_queue = m.head, m.bank.queue.clone()
    m.before_step(2)
    assert m.stage == 1 and m.bank.ptr == 0 and not torch.equal(m.bank.queue, old_queue)
    assert m.head is not old_head and m.nets["rdd_head"] is m.head and not m.optimizers["rdd_head"].state
    # a plain-PD stage has no head phase and leaves the head alone
    m2 = _method(RDD, start_steps=16, iters_per_halving=2, feature_from_steps=8, queue_size=64, queue_adds=16,
                 contrast_size=32)
    assert m2.phases(0) == ["student"]
    loss, logs = m2.loss("student", batch, 0)
    loss.backward()
    assert "rdd/is_p2p" not in logs and all(p.grad is None for p in m2.head.parameters())


def test_rdd_head_phase_runs_in_the_trainer(tmp_path):
    """Through the trainer: the head's optimizer steps every iteration of a feature stage (its Adam step count),
    with no LR schedule, and the head's gradient norm is logged (the trainer clips it at run.grad_clip too)."""
    import diffdistill.methods.rdd  # noqa: F401
    tr = _trainer(tmp_path, 3, "rdd", queue_size=128, queue_adds=32, contrast_size=64)
    tr.run()
    st = tr.method.optimizers["rdd_head"].state_dict()["state"]
    assert st and all(int(v["step"]) == 3 for v in st.values())
    assert tr.method.optimizers["rdd_head"].param_groups[0]["lr"] == 1e-3
    log = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert "grad_norm/rdd_head" in log and math.isfinite(log["loss/rdd_head"])


def test_options_and_unsupported_data():
    for bad in ({"tau": 0.0}, {"gamma": 1.5}):
        with pytest.raises(UserError):
            _method(**bad)
    with pytest.raises(UserError):                                   # 2-D data other than ring8
        _method(cfg=MLP_CFG, classifier="auto", data_name="two_moons")
    m = _method(cfg=MLP_CFG, classifier="auto", data_name="ring8", start_steps=2, iters_per_halving=2)
    assert type(m.classifier).__name__ == "PointsComponentMLP"             # ctx.data_name picks the classifier
    with pytest.raises(UserError, match="forward_head"):
        m = _method(classifier="helpers.pd_helpers:features_only", beta=0.01, start_steps=2, iters_per_halving=2)
        m.loss(m.phases(0)[0], _batch(), 0)


# ------------------------------------------------------------------------------------------------ trainer, resume
def _trainer(out, steps, method, resume=None, **opts):
    from diffdistill.train.trainer import Trainer
    teacher, cfg = tiny_teacher(MLP_CFG)
    run = {"out": str(out), "steps": steps, "batch_size": 32, "log_every": 1, "ckpt_every": 0, "sample_every": 0,
           "progress": False, "seed": 0, "device": "cpu", "keep_ckpts": 3, "nan_policy": "stop", "grad_clip": 1.0,
           "resume": resume, "num_sample_grid": 16}
    full = {"run": run, "data": {"name": "ring8", "n": 500, "seed": 0}, "net": cfg,
            "method": {"name": method, "lr": 1e-3, "start_steps": 8, "iters_per_halving": 4, "classifier": "ring8",
                       **opts}}
    return Trainer(full, teacher=teacher, teacher_path="mem")


@pytest.mark.parametrize("method,compat", [("cfd", False), ("rdd", False), ("rdd", True)])
def test_resume_with_memory_bank_is_bitwise_exact(tmp_path, method, compat):
    import diffdistill.methods.cfd  # noqa: F401  (registers cfd and rdd)
    import diffdistill.methods.rdd  # noqa: F401
    opts = {"queue_size": 128, "queue_adds": 32, "contrast_size": 64, "rdd_compat_view_bug": compat} \
        if method == "rdd" else {}
    full = _trainer(tmp_path / "full", 12, method, **opts)
    full.run()
    _trainer(tmp_path / "split", 6, method, **opts).run()
    resumed = _trainer(tmp_path / "split", 12, method, resume="auto", **opts)
    resumed.run()
    a, b = full.method.state_dict(), resumed.method.state_dict()
    assert a["extra"]["stage"] == b["extra"]["stage"] == 2
    for net in a["nets"]:
        for k, v in a["nets"][net].items():
            assert torch.equal(v, b["nets"][net][k]), (net, k)
    if method == "rdd":
        assert torch.equal(a["extra"]["memory_bank"]["queue"], b["extra"]["memory_bank"]["queue"])
        # the last halving's fresh queue took 4 × 32 pixels: 32, 64, 96, then 96 + 32 ≥ 128 wraps to 0
        assert a["extra"]["memory_bank"]["ptr"] == b["extra"]["memory_bank"]["ptr"] == 0
        for k, v in a["optimizers"]["rdd_head"]["state"].items():
            assert torch.equal(v["exp_avg"], b["optimizers"]["rdd_head"]["state"][k]["exp_avg"])
    logs = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss/student"]) for r in logs) and "cfd/feat_kl" in logs[-1]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["cfd", "rdd"])
def test_digits_8_to_1_learns(method, tmp_path):
    """The images preset's recipe on the shipped digits teacher, cut to 50 updates per halving at batch 64 (8 → 4 →
    2 → 1, ≈ 1–2 min): the 1-step student's proxy-FID (1,000 samples) falls far below the teacher's own 1-step DDIM
    (≈ 1,170; the 100-update benchmark reaches 55–60), and RDD's pixel-relation term is active on the 4×4 map."""
    import diffdistill.methods.rdd  # noqa: F401
    from diffdistill.demo import SHIPPED_TEACHER
    from diffdistill.distill import distill
    from diffdistill.eval.evaluate import evaluate_net, load_for_sampling
    if not SHIPPED_TEACHER.exists():
        pytest.skip("no shipped teacher in this checkout")
    tr = distill(method, SHIPPED_TEACHER, flags={
        "run": {"out": str(tmp_path), "progress": False, "ckpt_every": 0, "sample_every": 0, "batch_size": 64},
        "method": {"start_steps": 8, "iters_per_halving": 50}})
    data = tr.cfg["data"]
    student = evaluate_net(tr.method.sampling_net(), tr.method.sampling_spec(), data, 1000, seed=0)
    net, _ = load_for_sampling(SHIPPED_TEACHER)
    teacher1 = evaluate_net(net, tr.method.sampling_spec(), data, 1000, seed=0)
    log = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    print(f"{method} digits 8→1: student {student['proxy_fid']:.1f}, teacher 1-step DDIM {teacher1['proxy_fid']:.1f}")
    assert tr.step == 150 and student["nfe"] == 1 and student["proxy_fid"] < 0.2 * teacher1["proxy_fid"]
    if method == "rdd":
        assert log["rdd/is_p2p"] > 0 and log["rdd/memory_p2p"] > 0
