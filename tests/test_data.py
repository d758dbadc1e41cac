"""Data layer: digits, 2-D toys and the exact GMM denoiser, user-image loaders and their error messages."""

import json
import math
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from diffdistill.data import (Dataset, digits_split, gmm_denoiser, load_dataset, load_digits_dataset, load_edm_zip,
                              load_image_folder, load_npz, make_toy2d, mode_assignments, ring8_gmm, ring8_modes)
from diffdistill.errors import UserError


# ---- digits ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    return load_digits_dataset()


def test_digits_shape_range_levels_labels(digits):
    assert len(digits) == 1797 and digits.x.shape == (1797, 1, 8, 8) and digits.x.dtype == torch.float32
    assert digits.x.min() == -1 and digits.x.max() == 1
    assert digits.x.unique().numel() <= 17
    assert digits.labels.dtype == torch.int64 and sorted(digits.labels.unique().tolist()) == list(range(10))
    assert (digits.num_classes, digits.kind, digits.sample_shape, digits.name) == (10, "images", (1, 8, 8), "digits")
    x, y = digits[5]
    assert x.shape == (1, 8, 8) and y.shape == (10,) and y.dtype == torch.float32 and y[digits.labels[5]] == 1


def test_digits_split_deterministic_and_disjoint(digits):
    tr, he = digits_split(heldout=297, seed=0)
    tr2, he2 = digits_split(heldout=297, seed=0)
    assert len(tr) == 1500 and len(he) == 297
    assert torch.equal(tr.x, tr2.x) and torch.equal(he.labels, he2.labels)
    rows = lambda d: {tuple(r.tolist()) + (int(l),) for r, l in zip(d.x.reshape(len(d), -1), d.labels)}
    assert rows(tr) | rows(he) == rows(digits)  # together they cover the data (digits has a few exact duplicates)
    _, he3 = digits_split(heldout=297, seed=1)
    assert not torch.equal(he.x, he3.x)
    # index-level disjointness via a tagged copy
    tagged = Dataset(torch.zeros(100, 2), labels=torch.arange(100), kind="points")
    a, b = tagged.split(0.2, seed=3)
    assert len(b) == 20 and set(a.labels.tolist()).isdisjoint(b.labels.tolist())
    assert sorted(a.labels.tolist() + b.labels.tolist()) == list(range(100))
    assert torch.equal(b.labels, tagged.split(20, seed=3)[1].labels)


def test_default_collate_labelled_and_unlabelled(digits):
    xb, yb = next(iter(torch.utils.data.DataLoader(digits, batch_size=4)))
    assert xb.shape == (4, 1, 8, 8) and yb.shape == (4, 10)
    pts = make_toy2d("ring8", 64, seed=0)
    xb, yb = next(iter(torch.utils.data.DataLoader(pts, batch_size=8)))
    assert xb.shape == (8, 2) and yb.shape == (8, 0) and pts.num_classes == 0
    xb, yb = digits.sample(16, generator=torch.Generator().manual_seed(0))
    assert xb.shape == (16, 1, 8, 8) and yb.shape == (16, 10) and torch.all(yb.sum(1) == 1)


# ---- 2-D toys -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ring8", "checkerboard", "two_moons"])
def test_toy2d_seeded_and_scaled(name):
    a, b, c = make_toy2d(name, 20000, seed=1), make_toy2d(name, 20000, seed=1), make_toy2d(name, 20000, seed=2)
    assert torch.equal(a.x, b.x) and not torch.equal(a.x, c.x)
    assert a.x.shape == (20000, 2) and a.x.dtype == torch.float32 and a.kind == "points" and a.sample_shape == (2,)
    assert torch.allclose(a.x.std(0), torch.full((2,), 0.5), atol=0.02)
    assert a.x.mean(0).abs().max() < 0.03


def test_ring8_mode_structure():
    means, std, weights = ring8_gmm()
    assert means.shape == (8, 2) and weights.shape == (8,) and math.isclose(float(weights.sum()), 1.0)
    assert torch.equal(means, ring8_modes())
    r = means.norm(dim=1)
    assert torch.allclose(r, r[0].expand(8), atol=1e-6)
    assert math.isclose(r[0].item() ** 2 / 2 + std ** 2, 0.25, rel_tol=1e-5)  # population std exactly 0.5
    ds = make_toy2d("ring8", 8000, seed=0)
    a = mode_assignments(ds.x, means, std)
    assert (a >= 0).float().mean() > 0.98 and a[a >= 0].unique().numel() == 8
    counts = torch.bincount(a[a >= 0], minlength=8).float()
    assert counts.min() / counts.max() > 0.8
    assert (mode_assignments(torch.zeros(3, 2), means, std) == -1).all()  # the centre is no mode


# ---- exact GMM denoiser ---------------------------------------------------------------------------------------------
def _numpy_gmm_denoiser(x, sigma, means, std, weights):
    out = np.zeros_like(x)
    for i, xi in enumerate(x):
        v = std ** 2 + sigma ** 2
        dens = np.array([w * np.exp(-np.sum((xi - m) ** 2) / (2 * v)) / (2 * np.pi * v) for m, w in zip(means, weights)])
        post = dens / dens.sum()
        out[i] = sum(p * (m + std ** 2 / v * (xi - m)) for p, m in zip(post, means))
    return out


def test_gmm_denoiser_matches_direct_computation():
    means, std, weights = ring8_gmm()
    weights = torch.tensor([0.05, 0.1, 0.15, 0.2, 0.1, 0.1, 0.15, 0.15])
    g = torch.Generator().manual_seed(0)
    for sigma in (0.05, 0.3, 1.0, 5.0):
        x = torch.randn(50, 2, generator=g, dtype=torch.float64) * 0.7
        ref = _numpy_gmm_denoiser(x.numpy(), sigma, means.double().numpy(), std, weights.double().numpy())
        got = gmm_denoiser(x, sigma, means, std, weights)
        assert got.dtype == torch.float64 and np.allclose(got.numpy(), ref, atol=1e-10)
    # per-sample sigma tensor agrees with the scalar form
    x = torch.randn(4, 2, generator=g)
    sig = torch.tensor([0.1, 0.5, 1.0, 2.0])
    per = gmm_denoiser(x, sig.view(4, 1), means, std, weights)
    one = torch.cat([gmm_denoiser(x[i:i + 1], float(s), means, std, weights) for i, s in enumerate(sig)])
    assert torch.allclose(per, one, atol=1e-6)


def test_gmm_denoiser_limits():
    means, std, weights = ring8_gmm()
    x = make_toy2d("ring8", 200, seed=3).x
    assert torch.allclose(gmm_denoiser(x, 1e-4, means, std, weights), x, atol=1e-5)  # σ→0: D ≈ x
    far = torch.randn(10, 2) * 3
    big = gmm_denoiser(far, 1e4, means, std, weights)  # σ→∞: D ≈ mixture mean (0 for the ring)
    assert torch.allclose(big, (weights[:, None] * means).sum(0).expand_as(big), atol=1e-3)
    assert torch.isfinite(gmm_denoiser(torch.full((2, 2), 1e3), 1e-3, means, std, weights)).all()  # stable far out


# ---- user images: round trips ---------------------------------------------------------------------------------------
def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _rgb(seed, size=6):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_folder_labelled_and_flat(tmp_path):
    imgs = {("cat", "a.png"): _rgb(0), ("cat", "b.png"): _rgb(1), ("dog", "c.png"): _rgb(2)}
    for (cls, f), a in imgs.items():
        _png(tmp_path / "lab" / cls / f, a)
    ds = load_image_folder(tmp_path / "lab")
    assert ds.x.shape == (3, 3, 6, 6) and ds.labels.tolist() == [0, 0, 1] and ds.num_classes == 2
    assert ds.class_names == ["cat", "dog"]
    assert torch.allclose(ds.x[2], torch.from_numpy(_rgb(2)).permute(2, 0, 1).float() / 127.5 - 1)
    flat = tmp_path / "flat"
    for i in range(3):
        _png(flat / f"{i}.png", _rgb(i)[..., 0])
    (flat / "notes.txt").write_text("ignored")
    ds = load_dataset(str(flat))
    assert ds.x.shape == (3, 1, 6, 6) and ds.labels is None and ds.num_classes == 0 and ds[0][1].shape == (0,)
    assert ds.x.min() >= -1 and ds.x.max() <= 1


def test_edm_zip_round_trip(tmp_path):
    z = tmp_path / "data.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for i in range(4):
            buf = tmp_path / f"{i}.png"
            _png(buf, _rgb(i))
            zf.write(buf, f"00000/img{i:08d}.png")
        zf.writestr("dataset.json", json.dumps({"labels": [[f"00000/img{i:08d}.png", i % 3] for i in range(4)]}))
    ds = load_dataset(z)
    assert ds.x.shape == (4, 3, 6, 6) and ds.labels.tolist() == [0, 1, 2, 0] and ds.num_classes == 3
    assert torch.allclose(ds.x[1], torch.from_numpy(_rgb(1)).permute(2, 0, 1).float() / 127.5 - 1)
    z2 = tmp_path / "nolabels.zip"
    with zipfile.ZipFile(z2, "w") as zf:
        zf.write(tmp_path / "0.png", "a.png")
        zf.writestr("dataset.json", json.dumps({"labels": None}))
    assert load_edm_zip(z2).num_classes == 0


def test_npz_layouts_round_trip(tmp_path):
    u8 = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    ref = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 127.5 - 1
    np.savez(tmp_path / "nhwc.npz", x=u8, labels=np.array([0, 1, 2, 3, 4]))
    np.savez(tmp_path / "nchw.npz", images=u8.transpose(0, 3, 1, 2))
    np.savez(tmp_path / "float.npz", x=ref.numpy())
    a = load_npz(tmp_path / "nhwc.npz")
    assert torch.allclose(a.x, ref) and a.labels.tolist() == [0, 1, 2, 3, 4] and a.num_classes == 5
    assert torch.allclose(load_dataset(str(tmp_path / "nchw.npz")).x, ref)
    assert torch.allclose(load_npz(tmp_path / "float.npz").x, ref)
    np.savez(tmp_path / "grey.npz", x=u8[..., 0])
    assert load_npz(tmp_path / "grey.npz").sample_shape == (1, 8, 8)


def test_load_dataset_builtin_names():
    assert load_dataset("digits").num_classes == 10
    ds = load_dataset("two_moons", n=500, seed=4)
    assert len(ds) == 500 and torch.equal(ds.x, make_toy2d("two_moons", 500, seed=4).x)


# ---- user images: errors --------------------------------------------------------------------------------------------
def _raises(fn, *words):
    with pytest.raises(UserError) as ei:
        fn()
    msg = str(ei.value)
    assert "\n" not in msg and all(w.lower() in msg.lower() for w in words), msg
    return msg


def test_errors_paths_and_names(tmp_path):
    _raises(lambda: load_dataset(tmp_path / "nope"), "not found")
    _raises(lambda: load_image_folder(tmp_path / "nope"), "not found")
    _raises(lambda: load_dataset("cifar11"), "unknown dataset", "digits")
    _raises(lambda: make_toy2d("spiral", 10, 0), "unknown", "ring8")
    (tmp_path / "empty").mkdir()
    _raises(lambda: load_image_folder(tmp_path / "empty"), "no images")
    (tmp_path / "x.txt").write_text("hi")
    _raises(lambda: load_dataset(tmp_path / "x.txt"), "unsupported")


def test_errors_unreadable(tmp_path):
    d = tmp_path / "bad"
    _png(d / "good.png", _rgb(0))
    (d / "broken.png").write_bytes(b"not an image at all")
    _raises(lambda: load_image_folder(d), "cannot read", "broken.png")
    (tmp_path / "bad.zip").write_bytes(b"garbage")
    _raises(lambda: load_edm_zip(tmp_path / "bad.zip"), "cannot read")
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    _raises(lambda: load_npz(tmp_path / "bad.npz"), "cannot read")


def test_errors_mixed_size_and_channels(tmp_path):
    _png(tmp_path / "size" / "a.png", _rgb(0, 6))
    _png(tmp_path / "size" / "b.png", _rgb(1, 8))
    _raises(lambda: load_image_folder(tmp_path / "size"), "mixed size", "a.png", "b.png", "6x6", "8x8")
    _png(tmp_path / "ch" / "a.png", _rgb(0))
    _png(tmp_path / "ch" / "b.png", _rgb(1)[..., 0])
    _raises(lambda: load_image_folder(tmp_path / "ch"), "mixed channel", "a.png", "b.png")
    _png(tmp_path / "rgba" / "a.png", np.zeros((4, 4, 4), np.uint8))
    _raises(lambda: load_image_folder(tmp_path / "rgba"), "4 channels", "1 (greyscale) or 3 (RGB)")
    np.savez(tmp_path / "four.npz", x=np.zeros((2, 8, 8, 4), np.uint8))
    _raises(lambda: load_npz(tmp_path / "four.npz"), "channels")


def test_errors_labels_and_arrays(tmp_path):
    np.savez(tmp_path / "neg.npz", x=np.zeros((2, 4, 4, 3), np.uint8), labels=np.array([0, -1]))
    _raises(lambda: load_npz(tmp_path / "neg.npz"), "out of range")
    _raises(lambda: Dataset(torch.zeros(3, 2), labels=[0, 1, 5], num_classes=3), "out of range")
    np.savez(tmp_path / "nox.npz", labels=np.array([0, 1]), other=np.zeros(3))
    _raises(lambda: load_npz(tmp_path / "nox.npz"), "no image array", "'x'")
    np.savez(tmp_path / "range.npz", x=np.full((2, 4, 4, 3), 200.0, np.float32))
    _raises(lambda: load_npz(tmp_path / "range.npz"), "[-1, 1]")
    z = tmp_path / "lab.zip"
    with zipfile.ZipFile(z, "w") as zf:
        _png(tmp_path / "p.png", _rgb(0))
        zf.write(tmp_path / "p.png", "a.png")
        zf.write(tmp_path / "p.png", "b.png")
        zf.writestr("dataset.json", json.dumps({"labels": [["a.png", 0]]}))
    _raises(lambda: load_edm_zip(z), "no label", "b.png")
    with zipfile.ZipFile(z, "w") as zf:
        zf.write(tmp_path / "p.png", "a.png")
        zf.writestr("dataset.json", json.dumps({"labels": [["a.png", -2]]}))
    _raises(lambda: load_edm_zip(z), "out of range")
