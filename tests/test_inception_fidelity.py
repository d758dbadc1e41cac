"""torch-fidelity's Inception state dict (``weights-inception-2015-12-05-6726825d.pth``) as the FID network: a
randomly initialised `InceptionV3Fidelity` saved as a plain state dict in the test (the converter's key set, no
``num_batches_tracked``) stands in for the real file; nothing downloads. TF1 bilinear resize vs its formula by hand,
format detection and strict loading errors, feature shape / determinism / taps, and `ref-stats` + `eval` end to end
against a direct recomputation. (One-off check, not repeatable here: on random weights with randomised BatchNorm
statistics, torch-fidelity's own module and resize gave bit-identical outputs for all six taps at 8×8 … 512×400.)"""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffdistill.cli import main
from diffdistill.errors import UserError
from diffdistill.eval.inception import (FidelityExtractor, TorchScriptExtractor, inception_file_format,
                                        load_extractor)
from diffdistill.nets.inception_fidelity import InceptionV3Fidelity, resize_bilinear_tf1

TEACHER = Path(__file__).resolve().parent.parent / "src/diffdistill/assets/teacher_digits.safetensors"
NAME = "weights-inception-2015-12-05-6726825d.pth"


def random_fidelity_state() -> dict:
    """Random weights whose 2048-d features vary with the input (PyTorch's default conv init shrinks the signal
    through 94 layers until every image gives the same features): He-normal convs, perturbed BatchNorm."""
    torch.manual_seed(0)
    net = InceptionV3Fidelity()
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.05), m.running_var.uniform_(0.8, 1.25)
            m.weight.data.uniform_(0.8, 1.2), m.bias.data.normal_(0, 0.05)
    return {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}  # as the converter


@pytest.fixture(scope="module")
def fidelity_file(tmp_path_factory):
    state = random_fidelity_state()
    path = tmp_path_factory.mktemp("fidelity") / NAME
    torch.save(state, path)
    return path, state


def direct_net(state) -> InceptionV3Fidelity:
    net = InceptionV3Fidelity()
    net.load_state_dict(state, strict=False)  # only the BatchNorm counters are absent
    return net


def test_tf1_resize_matches_its_formula():
    # 2×2 → 3×3 by hand: source coordinate s = i·(2/3) in float32 → 0, 0.667, 1.333; lo = ⌊s⌋, hi = min(lo+1, 1)
    a, b, c, d = 10.0, 40.0, 100.0, 250.0
    x = torch.tensor([[[[a, b], [c, d]]]])
    s = np.arange(3, dtype=np.float32) * np.float32(2 / 3)
    w1 = s[1]  # fractional part at i = 1; i = 2 sits past the last pixel pair, so its hi index is clamped to pixel 1
    row = lambda p, q: [p, p + (q - p) * w1, q]  # noqa: E731  blended horizontally, hi index clamped at i = 2
    top, bot = np.float32(row(a, b)), np.float32(row(c, d))
    want = np.stack([top, top + (bot - top) * w1, bot]).astype(np.float32)
    got = resize_bilinear_tf1(x, (3, 3))[0, 0].numpy()
    assert np.array_equal(got, want)
    assert got[1, 1] == pytest.approx(a + (b - a) * 2 / 3 + ((c + (d - c) * 2 / 3) - (a + (b - a) * 2 / 3)) * 2 / 3)

    # non-square up/down-sampling vs a per-pixel loop of TF's kernel
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 5, 7, generator=g) * 255
    out_h, out_w = 4, 11
    want = np.zeros((2, 3, out_h, out_w), np.float32)
    xn = x.numpy()
    sy, sx = np.float32(5 / out_h), np.float32(7 / out_w)
    for i in range(out_h):
        for j in range(out_w):
            fy, fx = np.float32(i) * sy, np.float32(j) * sx
            y0, x0 = int(np.floor(fy)), int(np.floor(fx))
            y1, x1 = min(y0 + 1, 4), min(x0 + 1, 6)
            dy, dx = fy - np.float32(y0), fx - np.float32(x0)
            t = xn[:, :, y0, x0] + (xn[:, :, y0, x1] - xn[:, :, y0, x0]) * dx
            u = xn[:, :, y1, x0] + (xn[:, :, y1, x1] - xn[:, :, y1, x0]) * dx
            want[:, :, i, j] = t + (u - t) * dy
    assert np.allclose(resize_bilinear_tf1(x, (out_h, out_w)).numpy(), want, rtol=0, atol=1e-4)

    # 299×299 passes through unchanged; upsampling is not torch's half-pixel bilinear
    x299 = torch.rand(1, 3, 299, 299, generator=g) * 255
    assert torch.equal(resize_bilinear_tf1(x299, (299, 299)), x299)
    x8 = torch.rand(1, 1, 8, 8, generator=g)
    assert not torch.allclose(resize_bilinear_tf1(x8, (299, 299)),
                              F.interpolate(x8, size=(299, 299), mode="bilinear", align_corners=False), atol=1e-3)


def test_format_detection_and_strict_loading(fidelity_file, tmp_path, monkeypatch):
    path, state = fidelity_file
    assert inception_file_format(path) == "state_dict"
    monkeypatch.setenv("DIFFDISTILL_INCEPTION", str(path))
    from diffdistill.eval.inception import resolve_inception_path
    assert isinstance(load_extractor(resolve_inception_path()), FidelityExtractor)

    class Tiny(nn.Module):
        def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return img.float().mean(dim=(2, 3))
    ts = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(Tiny()).save(str(ts))
    assert inception_file_format(ts) == "torchscript" and isinstance(load_extractor(ts), TorchScriptExtractor)
    assert load_extractor(ts).recipe()["extractor_format"] == "TorchScript"

    # a module's own state_dict() (with BatchNorm counters) loads too
    torch.save(direct_net(state).state_dict(), tmp_path / "with_counters.pth")
    assert isinstance(load_extractor(tmp_path / "with_counters.pth"), FidelityExtractor)

    def bad(name, mutate):
        s = dict(state)
        mutate(s)
        torch.save(s, tmp_path / name)
        return tmp_path / name

    missing = bad("missing.pth", lambda s: s.pop("Mixed_6c.branch7x7dbl_3.bn.running_var"))
    with pytest.raises(UserError, match=r"^missing\.pth does not match .*missing Mixed_6c\.branch7x7dbl_3\.bn\."
                                        r"running_var") as e:
        load_extractor(missing)
    assert "\n" not in str(e.value)
    shape = bad("shape.pth", lambda s: s.__setitem__("fc.weight", torch.zeros(1000, 2048)))
    with pytest.raises(UserError, match=r"fc\.weight has shape \[1000, 2048\], expected \[1008, 2048\]"):
        load_extractor(shape)
    extra = bad("extra.pth", lambda s: s.__setitem__("aux.weight", torch.zeros(3)))
    with pytest.raises(UserError, match="unexpected aux.weight"):
        load_extractor(extra)
    many = bad("many.pth", lambda s: [s.pop(k) for k in list(s)[:10]])
    with pytest.raises(UserError, match=r"\(\+7 more\)"):
        load_extractor(many)
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(UserError, match="holds a Tensor, not a state dict"):
        load_extractor(tmp_path / "tensor.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(UserError, match="not a readable torch.save state dict"):
        load_extractor(tmp_path / "junk.pth")

    class Boom:  # a pickle that would create a file if it were executed
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))
    torch.save({"fc.weight": Boom()}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match="not a readable torch.save state dict"):
        load_extractor(tmp_path / "evil.pth")
    assert not (tmp_path / "pwned").exists()
    # the CLI: exit 2 before any sampling
    assert main(["eval", str(TEACHER), "--inception", str(shape), "--ref", str(tmp_path / "r.npz")]) == 2


def test_features_shape_determinism_and_taps(fidelity_file):
    path, state = fidelity_file
    ext = load_extractor(path)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 1, 8, 8, generator=g) * 2 - 1
    f = ext(x)
    assert f.shape == (3, 2048) and f.dtype == torch.float64 and ext.dim == 2048
    assert torch.equal(ext(x), f)  # deterministic
    assert torch.allclose(ext(x[1:2]), f[1:2], rtol=1e-5, atol=1e-6)  # batch-independent
    assert f.std(0).mean() > 1e-3  # the inputs are told apart

    # the extractor = the network with the file's weights on EDM-quantised, grey-tiled uint8 images
    u8 = (x * 127.5 + 128).clip(0, 255).to(torch.uint8).repeat(1, 3, 1, 1)
    net = direct_net(state)
    taps = net(u8, ("64", "768", "2048", "logits_unbiased", "logits"))
    assert torch.equal(taps["2048"].double(), f)
    assert taps["64"].shape == (3, 64) and taps["768"].shape == (3, 768)
    w, b = state["fc.weight"].double(), state["fc.bias"].double()
    assert torch.allclose(taps["logits_unbiased"].double(), f @ w.T, rtol=1e-5, atol=1e-5)
    assert torch.allclose(taps["logits"].double(), f @ w.T + b, rtol=1e-5, atol=1e-5)
    rec = ext.recipe()
    assert rec["extractor_format"].startswith("torch-fidelity state dict") and "TF1 bilinear" in rec["resize"]
    assert rec["extractor_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and rec["feature_dim"] == 2048


def exact_fid(f1, f2) -> float:
    """|μ1−μ2|² + tr Σ1 + tr Σ2 − 2 tr √(Σ1Σ2) with Σi = AiᵀAi/(ni−1) (Ai centred features). With n ≪ d, Σ1Σ2 is
    singular (scipy's sqrtm is slow and inexact there); its non-zero eigenvalues are those of
    (A1A2ᵀ)(A1A2ᵀ)ᵀ/((n1−1)(n2−1)), so tr √(Σ1Σ2) = Σ singular values of A1A2ᵀ / √((n1−1)(n2−1))."""
    a1, a2 = f1 - f1.mean(0), f2 - f2.mean(0)
    n1, n2 = len(f1), len(f2)
    tr_sqrt = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
    return float(np.square(f1.mean(0) - f2.mean(0)).sum() + (a1 ** 2).sum() / (n1 - 1) + (a2 ** 2).sum() / (n2 - 1)
                 - 2 * tr_sqrt)


def test_ref_stats_and_eval_with_state_dict(fidelity_file, tmp_path, monkeypatch):
    """ref-stats via $DIFFDISTILL_INCEPTION, eval via --inception; FID vs the network + scipy directly (8 + 8 images:
    the full 299×299 network costs ~0.4 s per image on one CPU thread)."""
    from PIL import Image
    from diffdistill.data.digits import digits_split
    path, state = fidelity_file
    root = tmp_path / "digits"
    root.mkdir()
    u8 = np.clip(digits_split()[0].x[:8].numpy() * 127.5 + 128, 0, 255).astype(np.uint8)
    for i, a in enumerate(u8):
        Image.fromarray(a[0], mode="L").save(root / f"{i:03d}.png")

    monkeypatch.setenv("DIFFDISTILL_INCEPTION", str(path))
    ref = tmp_path / "ref.npz"
    assert main(["ref-stats", str(root), "--out", str(ref)]) == 0
    monkeypatch.delenv("DIFFDISTILL_INCEPTION")
    out = tmp_path / "m.json"
    assert main(["eval", str(TEACHER), "--steps", "1", "--num-samples", "8", "--seed", "3", "--inception", str(path),
                 "--ref", str(ref), "--out", str(out)]) == 0
    m = json.loads(out.read_text())

    assert main(["sample", str(TEACHER), "--steps", "1", "--num-samples", "8", "--seed", "3",
                 "--out", str(tmp_path / "s.npz")]) == 0
    s = np.load(tmp_path / "s.npz")["samples"]
    gen_u8 = np.clip(s * 127.5 + 128, 0, 255).astype(np.uint8)
    net = direct_net(state)
    with torch.no_grad():
        f = net.features(torch.from_numpy(np.concatenate([u8, gen_u8])).repeat(1, 3, 1, 1)).double().numpy()
    f_ref, f_gen = f[:8], f[8:]
    z = np.load(ref)
    assert np.allclose(z["mu"], f_ref.mean(0), rtol=1e-5, atol=1e-6) and z["features"].shape == (8, 2048)
    want = exact_fid(f_gen, f_ref)
    assert want > 1e-4 and m["fid"] == pytest.approx(want, rel=1e-3)
    assert m["fid_label"] == "FID (n=8)" and 0 <= m["precision"] <= 1 and "kid" in m
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    rec = m["fid_recipe"]
    assert rec["extractor"] == "inception-2015-12-05/torch-fidelity" and rec["extractor_sha256"] == sha
    assert rec["extractor_format"].startswith("torch-fidelity") and rec["reference_extractor_sha256"] == sha
    assert json.loads(str(z["recipe"]))["extractor_format"].startswith("torch-fidelity")
