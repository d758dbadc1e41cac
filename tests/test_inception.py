"""Inception metrics with a tiny random TorchScript module standing in for inception-2015-12-05.pt (same call
signature, saved in the test; nothing downloads): FID vs scipy's sqrtm formula, reference statistics vs numpy,
`ref-stats` + `eval --inception --ref` end to end against a direct recomputation, labels and recipe, precision /
recall vs brute force, two ranks == one rank."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

from diffdistill.cli import main
from diffdistill.errors import UserError
from diffdistill.eval.inception import (FeatureStats, TorchScriptExtractor, fid_label, frechet_distance,
                                        load_reference, resolve_inception_path)
from diffdistill.eval.metrics import precision_recall

TEACHER = Path(__file__).resolve().parent.parent / "src/diffdistill/assets/teacher_digits.safetensors"


class TinyInception(nn.Module):
    """Called like StyleGAN's detector: net(uint8 images [B, 3, H, W], return_features=True) → [B, 32]."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3)
        self.fc = nn.Linear(32, 10)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = img.to(torch.float32) / 127.5 - 1
        x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
        h = torch.tanh(self.conv(x))
        f = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        if return_features:
            return f
        return self.fc(f).softmax(dim=1)


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / "inception-2015-12-05.pt"
    torch.jit.script(TinyInception().eval()).save(str(path))
    return path


def direct_features(path, uint8_nchw: np.ndarray) -> np.ndarray:
    """Features the way EDM's fid.py gets them: the TorchScript on uint8 RGB (grey tiled)."""
    net = torch.jit.load(str(path)).eval()
    x = torch.from_numpy(uint8_nchw)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    with torch.no_grad():
        return net(x, return_features=True).double().numpy()


def scipy_fid(mu1, s1, mu2, s2) -> float:
    """EDM fid.py's formula: |μ1−μ2|² + tr(Σ1 + Σ2 − 2·sqrtm(Σ1Σ2)), real part."""
    m = np.square(mu1 - mu2).sum()
    s = scipy.linalg.sqrtm(np.dot(s1, s2))
    return float(np.real(m + np.trace(s1 + s2 - s * 2)))


def test_fid_streaming_float64_matches_scipy(inception_file):
    ext = TorchScriptExtractor(inception_file)
    g = torch.Generator().manual_seed(0)
    a = torch.rand(300, 3, 12, 12, generator=g) * 2 - 1
    b = (torch.rand(250, 3, 12, 12, generator=g) * 1.6 - 0.9).clamp(-1, 1)
    sa, sb = FeatureStats(), FeatureStats()
    for i in range(0, 300, 7):  # uneven batches: streaming sums
        sa.update(ext(a[i:i + 7]))
    for i in range(0, 250, 11):
        sb.update(ext(b[i:i + 11]))
    q = lambda x: np.clip(x.numpy() * 127.5 + 128, 0, 255).astype(np.uint8)  # noqa: E731  EDM's PNG quantisation
    fa, fb = direct_features(inception_file, q(a)), direct_features(inception_file, q(b))
    want = scipy_fid(fa.mean(0), np.cov(fa, rowvar=False), fb.mean(0), np.cov(fb, rowvar=False))
    got = frechet_distance(sa.mean, sa.cov, sb.mean, sb.cov)
    assert want > 1e-3 and got == pytest.approx(want, rel=1e-6)
    assert np.allclose(sa.cov.numpy(), np.cov(fa, rowvar=False), rtol=1e-9, atol=1e-12)


def test_fid_label_and_extractor_errors(inception_file, tmp_path, monkeypatch):
    assert fid_label(50_000) == "FID-50k" and fid_label(49_999) == "FID (n=49,999)" and fid_label(2000) == "FID (n=2,000)"
    monkeypatch.setenv("DIFFDISTILL_INCEPTION", str(inception_file))
    assert resolve_inception_path() == inception_file
    with pytest.raises(UserError, match="not found"):
        resolve_inception_path(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(UserError, match="not a TorchScript file"):
        TorchScriptExtractor(tmp_path / "junk.pt")
    assert main(["eval", str(TEACHER), "--ref", str(tmp_path / "r.npz"), "--inception", str(tmp_path / "no.pt")]) == 2
    assert main(["eval", str(TEACHER), "--inception", str(inception_file)]) == 2  # no --ref


def test_precision_recall_matches_brute_force():
    g = np.random.default_rng(0)
    real, fake = g.normal(size=(40, 3)), g.normal(loc=0.7, size=(30, 3))

    def brute(ref, other, k):
        d_ref = np.linalg.norm(ref[:, None] - ref[None], axis=2)
        radii = np.sort(d_ref, axis=1)[:, k]  # column 0 is the point itself
        d = np.linalg.norm(other[:, None] - ref[None], axis=2)
        return np.mean([(d[j] <= radii).any() for j in range(len(other))])

    p, r = precision_recall(torch.tensor(real), torch.tensor(fake), k=3, block=7)
    assert p == pytest.approx(brute(real, fake, 3)) and r == pytest.approx(brute(fake, real, 3))
    assert 0 < p < 1 and 0 < r < 1
    assert precision_recall(torch.tensor(real), torch.tensor(real))[0] == 1.0


@pytest.fixture(scope="module")
def digit_pngs(tmp_path_factory):
    """120 training digits as 8×8 greyscale PNGs (a stand-in reference image folder)."""
    from PIL import Image
    from diffdistill.data.digits import digits_split
    root = tmp_path_factory.mktemp("ref") / "digits"
    root.mkdir()
    x = digits_split()[0].x[:120]
    u8 = np.clip(x.numpy() * 127.5 + 128, 0, 255).astype(np.uint8)
    for i, a in enumerate(u8):
        Image.fromarray(a[0], mode="L").save(root / f"{i:05d}.png")
    return root, u8


def test_ref_stats_then_eval_end_to_end(inception_file, digit_pngs, tmp_path):
    root, u8 = digit_pngs
    ref = tmp_path / "ref.npz"
    assert main(["ref-stats", str(root), "--inception", str(inception_file), "--out", str(ref),
                 "--batch-size", "50"]) == 0
    z = np.load(ref)
    f_ref = direct_features(inception_file, u8)
    assert int(z["num_images"]) == 120 and z["features"].shape == (120, 32)
    assert np.allclose(z["mu"], f_ref.mean(0), rtol=1e-9, atol=1e-12)
    assert np.allclose(z["sigma"], np.cov(f_ref, rowvar=False), rtol=1e-8, atol=1e-12)
    assert json.loads(str(z["recipe"]))["extractor_sha256"] == hashlib.sha256(inception_file.read_bytes()).hexdigest()

    out = tmp_path / "m.json"
    assert main(["eval", str(TEACHER), "--steps", "2", "--num-samples", "40", "--seed", "5", "--inception",
                 str(inception_file), "--ref", str(ref), "--out", str(out)]) == 0
    m = json.loads(out.read_text())
    # direct recomputation: the same seeds through `sample`, EDM quantisation, the TorchScript, scipy
    assert main(["sample", str(TEACHER), "--steps", "2", "--num-samples", "40", "--seed", "5",
                 "--out", str(tmp_path / "s.npz")]) == 0
    s = np.load(tmp_path / "s.npz")["samples"]
    f = direct_features(inception_file, np.clip(s * 127.5 + 128, 0, 255).astype(np.uint8))
    want = scipy_fid(f.mean(0), np.cov(f, rowvar=False), z["mu"], z["sigma"])
    assert m["fid"] == pytest.approx(want, rel=1e-6) and m["fid_label"] == "FID (n=40)"
    p, r = precision_recall(torch.tensor(z["features"]).double(), torch.tensor(f))
    assert m["precision"] == pytest.approx(p) and m["recall"] == pytest.approx(r)
    assert 0 <= m["kid"] < 1 and m["num_samples"] == 40 and m["nfe"] == 3
    rec = m["fid_recipe"]
    assert rec["extractor_sha256"] == hashlib.sha256(inception_file.read_bytes()).hexdigest()
    assert rec["reference_sha256"] == hashlib.sha256(ref.read_bytes()).hexdigest()
    assert rec["num_samples"] == 40 and rec["seeds"].startswith("5..44") and "resize" in rec
    assert rec["checkpoint_sha256"] == hashlib.sha256(TEACHER.read_bytes()).hexdigest()
    assert "VGG-16" in rec["precision_recall"] and rec["sigmas"][0] == pytest.approx(80.0)

    # an image folder as --ref gives the same FID as its statistics file; an EDM-style mu/sigma-only .npz too
    m2 = {}
    assert main(["eval", str(TEACHER), "--steps", "2", "--num-samples", "40", "--seed", "5", "--inception",
                 str(inception_file), "--ref", str(root), "--out", str(tmp_path / "m2.json")]) == 0
    m2 = json.loads((tmp_path / "m2.json").read_text())
    assert m2["fid"] == pytest.approx(m["fid"], rel=1e-9)
    np.savez(tmp_path / "edm_ref.npz", mu=z["mu"], sigma=z["sigma"])
    ref_only = load_reference(tmp_path / "edm_ref.npz")
    assert ref_only.features is None and ref_only.mu.shape == (32,)


def test_two_ranks_give_the_one_rank_numbers(inception_file, digit_pngs, tmp_path):
    root, _ = digit_pngs
    args = ["eval", str(TEACHER), "--steps", "1", "--num-samples", "30", "--inception", str(inception_file),
            "--ref", str(root)]
    assert main(args + ["--out", str(tmp_path / "one.json")]) == 0
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29547",
                        "-m", "diffdistill.cli"] + args + ["--out", str(tmp_path / "two.json")],
                       capture_output=True, text=True, timeout=300, env={**__import__("os").environ,
                                                                         "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two["fid_recipe"]["world_size"] == 2 and two["num_samples"] == 30
    for k in ("fid", "kid", "precision", "recall"):
        assert two[k] == pytest.approx(one[k], rel=1e-9, abs=1e-12), k
