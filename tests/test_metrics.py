"""Metrics math (vs independent numpy/scipy/double-loop references and torchmetrics) and the digits classifier."""

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from diffdistill.eval.features import (digits_heldout_accuracy, load_or_train_digits_classifier,
                                       train_digits_classifier)
from diffdistill.eval.metrics import (FeatureStats, frechet_distance, kid, manifold_membership, mmd_rbf,
                                      mode_coverage, precision_recall, proxy_fid, sliced_w2, total_variation)
from diffdistill.nets.classifier import DigitsClassifier


def _feats(n, d, seed, shift=0.0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) @ mix) * scale + shift


def _fid_scipy(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    m1, m2 = a.mean(0), b.mean(0)
    c1, c2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(c1 @ c2)
    return float(((m1 - m2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.trace(covmean.real))


class _Identity(nn.Module):
    """Feature extractor for torchmetrics: inputs already are features."""

    def __init__(self, d):
        super().__init__()
        self.num_features = d

    def forward(self, x):
        return x


# ---------------------------------------------------------------- FID

def test_feature_stats_streaming_and_merge():
    x = _feats(300, 8, 0, shift=3.0)
    s = FeatureStats()
    for chunk in x.split(37):
        s.update(chunk)
    assert s.n == 300
    torch.testing.assert_close(s.mean, x.mean(0))
    torch.testing.assert_close(s.cov, torch.from_numpy(np.cov(x.numpy(), rowvar=False)))
    m = FeatureStats.from_features(x[:100]).merge(FeatureStats(dim=8).update(x[100:]))
    torch.testing.assert_close(m.cov, s.cov)
    assert s.all_reduce_() is s and s.n == 300  # no process group: no-op


def test_fid_matches_scipy_sqrtm():
    a, b = _feats(500, 16, 1), _feats(400, 16, 2, shift=0.3, scale=1.5)
    assert proxy_fid(a, b) == pytest.approx(_fid_scipy(a, b), rel=1e-8, abs=1e-9)


def test_fid_identical_is_zero_and_shift_gives_mean_gap():
    a = _feats(1000, 16, 3)
    assert abs(proxy_fid(a, a)) < 1e-9
    delta = torch.linspace(-1, 1, 16, dtype=torch.float64)
    assert proxy_fid(a, a + delta) == pytest.approx(delta.square().sum().item(), rel=1e-9)
    s = _feats(10, 16, 4)  # rank-deficient covariance (n < d): no negative round-off
    assert 0 <= frechet_distance(s.mean(0), torch.cov(s.T), s.mean(0), torch.cov(s.T)) < 1e-12


def test_fid_rank_deficient_exact():
    # n < d: with centred data A, B (Σ = AᵀA/(n−1)), tr (Σ₁^½Σ₂Σ₁^½)^½ = ‖A Bᵀ‖_* / (n−1), a well-conditioned n×n SVD
    a, b = _feats(10, 64, 4).numpy(), _feats(10, 64, 5).numpy()
    ac, bc = a - a.mean(0), b - b.mean(0)
    exact = (((a.mean(0) - b.mean(0)) ** 2).sum() + (ac ** 2).sum() / 9 + (bc ** 2).sum() / 9
             - 2 * np.linalg.svd(ac @ bc.T, compute_uv=False).sum() / 9)
    assert proxy_fid(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(exact, rel=1e-12)


def test_fid_matches_torchmetrics():
    from torchmetrics.image.fid import FrechetInceptionDistance

    a, b = _feats(600, 12, 5), _feats(500, 12, 6, shift=0.2, scale=0.8)
    tm = FrechetInceptionDistance(feature=_Identity(12))
    tm.update(a, real=True)
    tm.update(b, real=False)
    assert proxy_fid(a, b) == pytest.approx(tm.compute().item(), rel=1e-9)


# ---------------------------------------------------------------- KID

def _mmd2_loop(x, y, k):
    m, n = len(x), len(y)
    sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    syy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return sxx + syy - 2 * sxy


def test_kid_unbiased_matches_double_loop():
    a, b = _feats(25, 6, 7).numpy(), _feats(25, 6, 8, shift=0.5).numpy()
    ref = _mmd2_loop(a, b, lambda x, y: (x @ y / 6 + 1) ** 3)
    mean, std = kid(torch.from_numpy(a), torch.from_numpy(b), subsets=3, subset_size=25)
    assert mean == pytest.approx(ref, rel=1e-10) and std < 1e-12  # full-size subsets: all identical


def test_kid_same_vs_shifted():
    a, a2 = _feats(2000, 16, 9).chunk(2)
    b = a2 + 0.5
    m_same, s_same = kid(a, a2, subsets=20, subset_size=300)
    m_shift, _ = kid(a, b, subsets=20, subset_size=300)
    assert abs(m_same) < 3 * s_same + 1e-3
    assert m_shift > 10 * max(abs(m_same), 1e-3)
    assert kid(a, b, subsets=5, subset_size=200, seed=1) == kid(a, b, subsets=5, subset_size=200, seed=1)


def test_kid_matches_torchmetrics():
    from torchmetrics.image.kid import KernelInceptionDistance

    a, b = _feats(200, 12, 11), _feats(200, 12, 12, shift=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        tm = KernelInceptionDistance(feature=_Identity(12), subsets=1, subset_size=200)
    tm.update(a, real=True)
    tm.update(b, real=False)
    # subset = whole set, so torchmetrics' unseeded permutation cannot matter
    assert kid(a, b, subsets=1, subset_size=200)[0] == pytest.approx(tm.compute()[0].item(), rel=1e-9)


# ---------------------------------------------------------------- 2-D metrics

def test_sliced_w2_shifted_gaussians():
    g = torch.Generator().manual_seed(0)
    x1, y1 = torch.randn(4000, 1, generator=g), torch.randn(4000, 1, generator=g) + 1.5
    assert sliced_w2(x1, y1, n_proj=4) == pytest.approx(1.5, abs=0.05)  # 1-D: SW2 = W2 = |shift|
    x2, y2 = torch.randn(4000, 2, generator=g), torch.randn(4000, 2, generator=g) + torch.tensor([2.0, 0.0])
    assert sliced_w2(x2, y2, n_proj=2000) == pytest.approx(2.0 / math.sqrt(2), rel=0.03)  # ‖δ‖/√D
    assert sliced_w2(x2, x2) == 0.0
    # unequal sizes: exact quantile coupling; duplicating every point leaves the empirical measure unchanged
    assert sliced_w2(x2[:500], y2[:300]) == pytest.approx(sliced_w2(x2[:500], y2[:300].repeat(2, 1)), rel=1e-12)
    assert sliced_w2(x2[:500], y2[:500].repeat_interleave(3, 0)) == pytest.approx(sliced_w2(x2[:500], y2[:500]),
                                                                                   rel=1e-12)


def test_mmd_rbf_unbiased_matches_double_loop():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(20, 2, generator=g, dtype=torch.float64), torch.randn(15, 2, generator=g, dtype=torch.float64)
    bw = (0.5, 1.0, 2.0)
    k = lambda x, y: sum(np.exp(-((x - y) ** 2).sum() / (2 * h * h)) for h in bw)  # noqa: E731
    assert mmd_rbf(a, b + 0.7, bandwidths=bw) == pytest.approx(_mmd2_loop(a.numpy(), (b + 0.7).numpy(), k), rel=1e-10)
    big = torch.randn(2000, 2, generator=g)
    assert abs(mmd_rbf(big[:1000], big[1000:])) < 5e-3 < mmd_rbf(big[:1000], big[1000:] + 0.5)


def test_mode_coverage():
    ang = torch.arange(8) * (2 * math.pi / 8)
    means = 2.0 * torch.stack([ang.cos(), ang.sin()], 1)
    std = 0.05
    g = torch.Generator().manual_seed(2)
    perfect = means.repeat(250, 1) + std * torch.randn(2000, 2, generator=g)
    r = mode_coverage(perfect, means, std)
    assert r["modes_covered"] == 1.0 and r["n_modes_covered"] == 8 and r["high_quality"] > 0.97
    single = means[:1] + std * torch.randn(2000, 2, generator=g)
    r = mode_coverage(single, means, std)
    assert r["modes_covered"] == 1 / 8 and r["high_quality"] > 0.97
    assert mode_coverage(torch.zeros(100, 2), means, std)["high_quality"] == 0.0  # all off-mode


def test_mode_weights_and_their_tv():
    ang = torch.arange(8) * (2 * math.pi / 8)
    means = 2.0 * torch.stack([ang.cos(), ang.sin()], 1)
    g = torch.Generator().manual_seed(3)
    # 300 samples at mode 0, 100 at mode 3, one far off-mode point nearest to mode 3: weights count every sample
    pts = torch.cat([means[0] + 0.05 * torch.randn(300, 2, generator=g),
                     means[3] + 0.05 * torch.randn(99, 2, generator=g), 10 * means[3:4]])
    w = mode_coverage(pts, means, 0.05)["weights"]
    assert w == pytest.approx([0.75, 0, 0, 0.25, 0, 0, 0, 0])
    assert total_variation(w, [1 / 8] * 8) == pytest.approx(0.5 * (0.625 + 0.125 + 6 / 8))
    assert total_variation([0.5, 0.5], [0.5, 0.5]) == 0 and total_variation([1, 0], [0, 1]) == 1


def test_points_quality_reports_diversity():
    from diffdistill.data import dataset_from_config
    from diffdistill.eval.evaluate import points_quality
    good = dataset_from_config({"name": "ring8", "n": 1000, "seed": 5}).x
    q = points_quality(good, {"name": "ring8"})
    assert q["precision"] > 0.9 and q["recall"] > 0.9 and q["mode_tv"] < 0.06 and len(q["mode_weights"]) == 8
    one_mode = good[torch.cdist(good.double(), good[:1].double())[:, 0] < 0.2]  # the samples of one mode only
    q1 = points_quality(one_mode, {"name": "ring8"})
    assert q1["precision"] > 0.9 and q1["recall"] < 0.25 and q1["mode_tv"] == pytest.approx(7 / 8, abs=0.01)


# ---------------------------------------------------------------- precision / recall (k-NN manifolds)

def _membership_loops(ref, other, k):
    """For each point of ``other``: inside ∪_i B(ref_i, r_i), r_i = distance from ref_i to its k-th nearest other
    point of ``ref``. Plain Python loops over every pair."""
    def dist(p, q):
        return math.sqrt(sum((a - b) ** 2 for a, b in zip(p, q)))
    radii = []
    for i, p in enumerate(ref):
        d = sorted(dist(p, q) for j, q in enumerate(ref) if j != i)
        radii.append(d[k - 1])
    return [any(dist(x, c) <= r for c, r in zip(ref, radii)) for x in other]


def test_precision_recall_against_loops_over_pairs():
    g = np.random.default_rng(7)
    for (nr, nf, d, shift), k in zip(((25, 20, 3, 0.6), (15, 30, 2, 0.0), (12, 12, 5, 1.5)), (3, 1, 5)):
        real, fake = g.normal(size=(nr, d)), g.normal(loc=shift, size=(nf, d))
        in_real = _membership_loops(real.tolist(), fake.tolist(), k)   # fake inside the real manifold
        in_fake = _membership_loops(fake.tolist(), real.tolist(), k)   # real inside the fake manifold
        p, r = precision_recall(torch.tensor(real), torch.tensor(fake), k=k, block=4)
        assert p == pytest.approx(sum(in_real) / nf, abs=1e-12) and r == pytest.approx(sum(in_fake) / nr, abs=1e-12)
        f_in, r_in = manifold_membership(torch.tensor(real), torch.tensor(fake), k=k, block=5)
        assert f_in.tolist() == in_real and r_in.tolist() == in_fake


def test_precision_recall_edge_cases():
    x = torch.randn(30, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert precision_recall(x, x.clone()) == (1.0, 1.0)              # identical sets
    assert precision_recall(x, x + 1000.0) == (0.0, 0.0)             # disjoint, far apart
    with pytest.raises(ValueError, match="more than k"):
        precision_recall(x, x[:3], k=3)


def test_per_class_recall_against_loops():
    from diffdistill.eval.evaluate import _precision_recall
    g = np.random.default_rng(2)
    real = g.normal(size=(30, 2)) + np.repeat([[0, 0], [5, 0], [0, 5]], 10, axis=0)
    labels = np.repeat([0, 1, 2], 10)
    fake = g.normal(size=(20, 2)) + np.repeat([[0, 0], [5, 0]], 10, axis=0)     # class 2 missing
    out = _precision_recall(torch.tensor(real), torch.tensor(fake), torch.tensor(labels))
    inside = np.array(_membership_loops(fake.tolist(), real.tolist(), 3))
    assert out["recall"] == pytest.approx(inside.mean())
    assert out["class_recall"] == pytest.approx([round(inside[labels == c].mean(), 4) for c in range(3)])
    assert out["class_recall"][2] == 0.0 and min(out["class_recall"][:2]) > 0.5
    assert _precision_recall(torch.tensor(real), torch.tensor(fake[:3]))["precision"] is None  # ≤ k samples


def test_conditional_spread_against_loops():
    """Within-condition diversity: per requested class, the spread ratio √(Σ_d var_gen / Σ_d var_real) (ddof 1)
    and the recall of that class's real samples against the manifold of the samples asked for it, by loops."""
    from diffdistill.eval.evaluate import conditional_spread
    g = np.random.default_rng(3)
    centres = np.array([[0, 0], [6, 0], [0, 6]])
    real_labels = np.repeat([0, 1, 2], 12)
    real = g.normal(size=(36, 2)) + centres[real_labels]
    asked = np.repeat([0, 1, 2], [10, 10, 3])                                 # class 2: ≤ k samples
    scale = np.array([1.0, 0.1, 1.0])[asked][:, None]                          # class 1 collapsed tenfold
    fake = g.normal(size=(23, 2)) * scale + centres[asked]
    out = conditional_spread(torch.tensor(fake), torch.tensor(asked), torch.tensor(real), torch.tensor(real_labels))

    def var_sum(x):
        m = [sum(col) / len(col) for col in zip(*x)]
        return sum(sum((v[d] - m[d]) ** 2 for v in x) / (len(x) - 1) for d in range(len(m)))
    for c in range(2):
        gc, rc = fake[asked == c].tolist(), real[real_labels == c].tolist()
        assert out["cond_spread_per_class"][c] == pytest.approx((var_sum(gc) / var_sum(rc)) ** 0.5, abs=1e-4)
        inside = _membership_loops(gc, rc, 3)                                  # real of c inside gen-of-c manifold
        assert out["cond_recall_per_class"][c] == pytest.approx(sum(inside) / len(inside), abs=1e-4)
    assert out["cond_spread_per_class"][2] is None and out["cond_recall_per_class"][2] is None
    assert out["cond_spread_per_class"][1] < 0.2 < 0.6 < out["cond_spread_per_class"][0]
    assert out["cond_spread"] == pytest.approx(sum(out["cond_spread_per_class"][:2]) / 2)
    assert out["cond_recall"] == pytest.approx(sum(out["cond_recall_per_class"][:2]) / 2)


# ---------------------------------------------------------------- digits classifier

@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return cache, load_or_train_digits_classifier(cache_dir=cache)


def test_classifier_shapes():
    m = DigitsClassifier()
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    assert m.features(x).shape == (5, m.num_features) == (5, 64) and m(x).shape == (5, 10)


def test_default_cache_dir_env(monkeypatch, tmp_path):
    from diffdistill.eval.features import default_cache_dir

    monkeypatch.setenv("DIFFDISTILL_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("DIFFDISTILL_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "diffdistill"


def test_classifier_training_is_deterministic():
    w1 = train_digits_classifier(seed=3, epochs=1).state_dict()
    threads = torch.get_num_threads()
    w2 = train_digits_classifier(seed=3, epochs=1).state_dict()
    assert torch.get_num_threads() == threads  # restored after training
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert not torch.equal(w1["head.weight"], train_digits_classifier(seed=4, epochs=1).state_dict()["head.weight"])


def test_classifier_heldout_accuracy_and_cache(trained):
    cache, model = trained
    assert digits_heldout_accuracy(model) >= 0.96
    files = list(cache.glob("digits_classifier-*.safetensors"))
    assert len(files) == 1 and not list(cache.glob("*.tmp"))
    again = load_or_train_digits_classifier(cache_dir=cache)  # loaded, not retrained
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_classifier_features_separate_real_from_noise(trained):
    from sklearn.datasets import load_digits

    _, model = trained
    x = torch.from_numpy(load_digits().images).float().div(8).sub(1).unsqueeze(1)
    with torch.no_grad():
        f_real, f_real2 = model.features(x[::2]), model.features(x[1::2])
        f_noise = model.features(torch.rand(800, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert proxy_fid(f_real, f_real2) < 0.1 * proxy_fid(f_real, f_noise)


def test_digits_class_histogram_and_tv():
    """digits_quality reports the classifier's class histogram and its total-variation distance to the training
    digits': small for held-out real digits (sampling noise), ≈ 0.9 for samples of one class only;
    class_histogram counts argmaxes."""
    from diffdistill.data.digits import digits_split
    from diffdistill.eval.evaluate import class_histogram, digits_quality
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 1.0], [0.0, 0.0, 5.0], [9.0, 0.0, 0.0]])
    assert class_histogram(logits).tolist() == [0.5, 0.25, 0.25]
    _, held = digits_split()
    real = digits_quality(held.x)
    assert len(real["class_hist"]) == 10 and math.isclose(sum(real["class_hist"]), 1.0, abs_tol=1e-3)
    assert real["class_tv"] < 0.15          # 297 digits: sampling noise alone gives ≈ 0.07
    zeros = held.x[held.labels == 0]
    one_class = digits_quality(zeros)
    assert one_class["class_tv"] > 0.8
    # precision/recall in the same 64-d features: held-out real digits lie on the training manifold and cover it;
    # zeros alone are precise but recall only the zeros
    assert real["precision"] > 0.8 and real["recall"] > 0.8 and real["pr_k"] == 3
    assert len(real["class_recall"]) == 10 and min(real["class_recall"]) > 0.6
    assert one_class["precision"] > 0.8 and one_class["recall"] < 0.2
    assert one_class["class_recall"][0] > 0.6 and max(one_class["class_recall"][1:]) < 0.1
