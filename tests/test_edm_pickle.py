"""EDM pickle teachers: VP/VE preconditioning formulas, NCSN++/ADM layers, the restricted unpickler (round trips in
EDM's persistent-record layout, malicious pickles refused with nothing run), strict weight loading, convert-teacher,
and a student distilled from a converted teacher exported and reloaded."""

import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from helpers.edm_snapshot import edm_snapshot_bytes, stub_persistence_module  # noqa: E402

from diffdistill.cli import main  # noqa: E402
from diffdistill.diffusion.precond import VEPrecond, VPPrecond, vp_sigma, vp_sigma_inv  # noqa: E402
from diffdistill.errors import UserError  # noqa: E402
from diffdistill.nets.factory import build_denoiser  # noqa: E402
from diffdistill.io.edm_pickle import load_edm_snapshot, read_edm_pickle  # noqa: E402


# ------------------------------------------------------------------------------------- VP / VE preconditioning
class Spy(torch.nn.Module):
    def forward(self, x_in, c_noise, labels=None):
        self.seen = (x_in.clone(), c_noise.clone())
        return torch.sin(x_in) + 0.1 * c_noise.reshape(-1, 1)


def test_vp_precond_matches_edm_table1():
    # EDM Table 1 (VP): σ(t) = sqrt(exp(½β_d t² + β_min t) − 1), c_skip 1, c_out −σ, c_in 1/sqrt(σ²+1),
    # c_noise (M−1)·t(σ), with β_d 19.9, β_min 0.1, M 1000; support [σ(1e-5), σ(1)].
    bd, bm, M = 19.9, 0.1, 1000
    t = np.array([1e-5, 1e-3, 0.1, 0.5, 0.9, 1.0])
    sig = np.sqrt(np.exp(0.5 * bd * t ** 2 + bm * t) - 1)
    assert np.allclose(vp_sigma(torch.tensor(t)).numpy(), sig, rtol=1e-12)
    assert np.allclose(vp_sigma_inv(torch.tensor(sig)).numpy(), t, rtol=1e-9, atol=1e-12)
    net = VPPrecond(Spy(), img_channels=2)
    assert net.sigma_min == pytest.approx(max(0.002, sig[0])) and net.sigma_max == 80.0 and sig[-1] > 150
    x = torch.randn(4, 2, dtype=torch.float64)
    s = np.array([0.01, 0.5, 3.0, 80.0])
    D = net(x, torch.tensor(s)).double().numpy()
    x_in, c_noise = (v.double().numpy() for v in net.model.seen)
    xn = x.numpy()
    assert np.allclose(x_in, xn / np.sqrt(s ** 2 + 1)[:, None], rtol=1e-6)
    t_of_s = (np.sqrt(bm ** 2 + 2 * bd * np.log(1 + s ** 2)) - bm) / bd
    assert np.allclose(c_noise, (M - 1) * t_of_s, rtol=2e-3)
    # EDM evaluates t(σ) in float32 (ln(1 + σ²) loses digits at small σ); so do we, to feed identical timesteps
    s32, f32 = s.astype(np.float32), np.float32
    t32 = (np.sqrt(f32(bm) ** 2 + f32(2 * bd) * np.log(f32(1) + s32 ** 2)) - f32(bm)) / f32(bd)
    assert np.allclose(c_noise, f32(M - 1) * t32, rtol=1e-5)
    F_ = np.sin(x_in) + 0.1 * c_noise[:, None]
    assert np.allclose(D, xn - s[:, None] * F_, rtol=1e-5, atol=1e-5)


def test_ve_precond_matches_edm_table1():
    net = VEPrecond(Spy(), img_channels=3)
    assert (net.sigma_min, net.sigma_max) == (0.02, 80.0)  # [0.02, 100] ∩ EDM's [0.002, 80]
    x, s = torch.randn(3, 3, dtype=torch.float64), np.array([0.02, 1.0, 50.0])
    D = net(x, torch.tensor(s)).double().numpy()
    x_in, c_noise = (v.double().numpy() for v in net.model.seen)
    assert np.allclose(x_in, x.numpy(), rtol=1e-6) and np.allclose(c_noise, np.log(0.5 * s), rtol=1e-6)
    assert np.allclose(D, x.numpy() + s[:, None] * (np.sin(x_in) + 0.1 * c_noise[:, None]), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------- NCSN++ / ADM layers
def test_fused_resample_conv_matches_direct_computation():
    """NCSN++'s residual path: 3×3 conv with padding w_pad + f_pad, then the depthwise [1,3,3,1] filter, stride 2."""
    from diffdistill.nets.songunet import Conv2d
    torch.manual_seed(0)
    conv = Conv2d(2, 5, 3, down=True, resample_filter=[1, 3, 3, 1], fused_resample=True, init_bias=1)
    x = torch.randn(2, 2, 8, 8)
    f1 = torch.tensor([1., 3., 3., 1.])
    f2 = torch.outer(f1, f1) / 64
    y = F.conv2d(x, conv.weight, padding=1 + 1)
    want = F.conv2d(y, f2.expand(5, 1, 4, 4), groups=5, stride=2) + conv.bias.reshape(1, -1, 1, 1)
    assert torch.allclose(conv(x), want, atol=1e-6) and want.shape == (2, 5, 4, 4)


def test_ncsnpp_residual_encoder_layout_and_shapes():
    from diffdistill.nets.songunet import SongUNet
    torch.manual_seed(0)
    net = SongUNet(16, 3, 3, model_channels=16, channel_mult=(1, 2, 2), num_blocks=1, attn_resolutions=(8,),
                   embedding_type='fourier', channel_mult_noise=2, encoder_type='residual',
                   resample_filter=(1, 3, 3, 1), dropout=0.0)
    sd = net.state_dict()
    # EDM creates {res}_aux_residual after every down block: caux 3 -> 16 -> 32
    assert sd['enc.8x8_aux_residual.weight'].shape == (16, 3, 3, 3)
    assert sd['enc.4x4_aux_residual.weight'].shape == (32, 16, 3, 3)
    assert sd['map_noise.freqs'].shape == (16,) and sd['enc.8x8_down.conv0.resample_filter'].shape == (1, 1, 4, 4)
    assert net(torch.randn(2, 3, 16, 16), torch.randn(2)).shape == (2, 3, 16, 16)
    skip = SongUNet(16, 3, 3, model_channels=16, channel_mult=(1, 2), num_blocks=1, encoder_type='skip',
                    decoder_type='skip', dropout=0.0)
    ks = skip.state_dict()
    assert 'enc.8x8_aux_skip.weight' in ks and 'dec.16x16_aux_up.resample_filter' in ks and 'dec.8x8_aux_conv.weight' in ks
    assert skip(torch.randn(2, 3, 16, 16), torch.randn(2)).shape == (2, 3, 16, 16)


def test_dhariwalunet_edm_layout():
    """Key names and shapes of EDM's DhariwalUNet for a tiny config (model_channels 32, mult (1, 2), 1 block,
    attention at 4): heads = channels // 64 (so the 32-channel level would get none); label embedding without bias
    added after map_layer1; adaptive scale/shift; zero-initialised output conv."""
    from diffdistill.nets.dhariwalunet import DhariwalUNet
    torch.manual_seed(0)
    net = DhariwalUNet(8, 3, 3, label_dim=10, model_channels=32, channel_mult=(1, 2), num_blocks=1,
                       attn_resolutions=(4, 8), dropout=0.0)
    sd = net.state_dict()
    assert sd['map_label.weight'].shape == (128, 10) and 'map_label.bias' not in sd
    assert sd['map_layer0.weight'].shape == (128, 32) and 'map_noise.freqs' not in sd
    assert sd['enc.8x8_conv.weight'].shape == (32, 3, 3, 3)
    assert sd['enc.4x4_down.conv0.weight'].shape == (32, 32, 3, 3) and 'enc.4x4_down.skip.weight' not in sd
    assert sd['enc.4x4_down.skip.resample_filter'].shape == (1, 1, 2, 2)
    assert sd['enc.4x4_block0.affine.weight'].shape == (128, 128)  # adaptive scale: 2 × 64 out channels
    assert sd['enc.4x4_block0.qkv.weight'].shape == (192, 64, 1, 1) and 'enc.8x8_block0.qkv.weight' not in sd
    assert sd['dec.4x4_in0.qkv.weight'].shape == (192, 64, 1, 1) and 'dec.4x4_in1.qkv.weight' not in sd
    assert sd['dec.4x4_block1.conv0.weight'].shape == (64, 96, 3, 3)   # 64 + the 4x4_down skip (32)
    assert sd['dec.8x8_block1.conv0.weight'].shape == (32, 64, 3, 3)   # 32 + the stem conv skip (32)
    assert sd['out_norm.weight'].shape == (32,) and sd['out_conv.weight'].shape == (3, 32, 3, 3)
    assert net.enc['8x8_block0'].norm0.eps == 1e-5 and net.enc['4x4_block0'].num_heads == 1
    # zero-initialised output head (EDM's init_zero) → F ≡ 0 at initialisation
    out = net(torch.randn(2, 3, 8, 8), torch.randn(2), torch.eye(10)[:2])
    assert out.shape == (2, 3, 8, 8) and out.abs().max() == 0


# ------------------------------------------------------------------------------------- snapshots
CASES = {
    "edm-ddpmpp": dict(precond="EDMPrecond", cfg=dict(arch="songunet", precond="edm", label_dim=0, kwargs=dict(
        model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.13, augment_dim=9,
        embedding_type="positional", encoder_type="standard", decoder_type="standard", channel_mult_noise=1,
        resample_filter=[1, 1])), extra_init=dict(sigma_min=0, sigma_max=float("inf"), sigma_data=0.5,
                                                  use_fp16=False, model_type="SongUNet")),
    "vp-ddpmpp-cond": dict(precond="VPPrecond", cfg=dict(arch="songunet", precond="vp", label_dim=3, kwargs=dict(
        model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)),
        extra_init=dict(beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5, model_type="SongUNet")),
    "ve-ncsnpp": dict(precond="VEPrecond", cfg=dict(arch="songunet", precond="ve", label_dim=0, kwargs=dict(
        model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0,
        embedding_type="fourier", encoder_type="residual", channel_mult_noise=2, resample_filter=[1, 3, 3, 1])),
        extra_init=dict(sigma_min=0.02, sigma_max=100, model_type="SongUNet")),
    "edm-adm-cond": dict(precond="EDMPrecond", cfg=dict(arch="dhariwalunet", precond="edm", label_dim=4, kwargs=dict(
        model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)),
        extra_init=dict()),  # model_type left to EDMPrecond's default, DhariwalUNet
}


def make_case(name, seed=0):
    """(our network with random weights, EDM-recorded constructor kwargs) for a tiny 8×8×3 config."""
    c = CASES[name]
    cfg = dict(c["cfg"], img_channels=3, img_resolution=8)
    if cfg["precond"] == "ve":
        cfg.update(sigma_min=0.02)
    torch.manual_seed(seed)
    net = build_denoiser(cfg)
    with torch.no_grad():  # EDM zero-inits the output convs; random weights make the comparison meaningful
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    init_kwargs = dict(img_resolution=8, img_channels=3, label_dim=cfg["label_dim"], **c["extra_init"],
                       **{k: (np.float64(v) if k == "dropout" else v) for k, v in cfg["kwargs"].items()})
    return net.eval(), init_kwargs


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("protocol", [2, 4])
def test_snapshot_round_trip_matches_our_network(name, protocol, tmp_path):
    net, init_kwargs = make_case(name)
    path = tmp_path / "network-snapshot-000000.pkl"
    path.write_bytes(edm_snapshot_bytes(net, init_kwargs, protocol=protocol))
    state = load_edm_snapshot(path)
    cfg = state["net_config"]
    assert cfg["precond"] == CASES[name]["cfg"]["precond"] and cfg["arch"] == CASES[name]["cfg"]["arch"]
    assert state["source"]["class"] == CASES[name]["precond"] and len(state["source"]["sha256"]) == 64
    loaded = build_denoiser(cfg)
    loaded.load_state_dict(state["sample_net"])
    loaded.eval()
    assert type(loaded) is type(net) and (loaded.sigma_min, loaded.sigma_max) == (net.sigma_min, net.sigma_max)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 8, 8, generator=g)
    sigma = torch.tensor([0.03, 1.0, 40.0])
    labels = torch.eye(cfg["label_dim"])[:3] if cfg["label_dim"] else None
    with torch.no_grad():
        want, got = net(x, sigma, labels), loaded(x, sigma, labels)
    assert torch.equal(want, got)
    assert (want - x).abs().mean() > 1e-3  # the network does something


def test_snapshot_numpy_scalars_and_dataset_entries(tmp_path):
    """Records carry numpy float64 values (EDM: skip_scale=np.sqrt(0.5) etc.); they load as Python floats."""
    net, init_kwargs = make_case("edm-ddpmpp")
    path = tmp_path / "s.pkl"
    path.write_bytes(edm_snapshot_bytes(net, init_kwargs))
    top = read_edm_pickle(path)
    assert set(top) == {"ema", "loss_fn", "augment_pipe", "dataset_kwargs"}
    state = load_edm_snapshot(path)
    assert state["net_config"]["kwargs"]["dropout"] == pytest.approx(0.13) and state["net_config"]["kwargs"]["augment_dim"] == 9
    assert load_edm_snapshot(path, dropout=0.0)["net_config"]["kwargs"]["dropout"] == 0.0


# ------------------------------------------------------------------------------------- refusing code
class _System:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        import os
        return os.system, (self.cmd,)


class _OpenForWrite:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


class _Eval:
    def __init__(self, src):
        self.src = src

    def __reduce__(self):
        return eval, (self.src,)


@pytest.mark.parametrize("kind", ["system", "open", "eval", "top-level"])
def test_malicious_pickle_is_refused_and_nothing_runs(kind, tmp_path):
    marker = tmp_path / "pwned"
    payload = {"system": _System(f"touch {marker}"), "open": _OpenForWrite(str(marker)),
               "eval": _Eval(f"open({str(marker)!r}, 'w')"), "top-level": _System(f"touch {marker}")}[kind]
    net, init_kwargs = make_case("edm-ddpmpp")
    path = tmp_path / "evil.pkl"
    if kind == "top-level":
        path.write_bytes(pickle.dumps(payload))
    else:  # a genuine-looking snapshot with one poisoned entry
        path.write_bytes(edm_snapshot_bytes(net, init_kwargs, extra={"augment_pipe": payload}))
    # sanity: plain pickle.load of this file WOULD create the marker
    probe = tmp_path / "probe.pkl"
    probe.write_bytes(pickle.dumps({"system": _System(f"touch {tmp_path / 'probe'}"),
                                    "open": _OpenForWrite(str(tmp_path / "probe")),
                                    "eval": _Eval(f"open({str(tmp_path / 'probe')!r}, 'w')"),
                                    "top-level": _System(f"touch {tmp_path / 'probe'}")}[kind]))
    pickle.loads(probe.read_bytes())
    assert (tmp_path / "probe").exists()
    with pytest.raises(UserError, match=r"refused to unpickle global (posix|os|builtins|io)\.(system|open|eval)"):
        load_edm_snapshot(path)
    assert not marker.exists()
    assert main(["convert-teacher", str(path), str(tmp_path / "t.safetensors")]) == 2
    assert not marker.exists() and not (tmp_path / "t.safetensors").exists()


def test_module_src_is_never_executed(tmp_path):
    """EDM's own loader execs the record's module_src; ours keeps only its hash."""
    marker = tmp_path / "ran"
    net, init_kwargs = make_case("edm-ddpmpp")
    path = tmp_path / "s.pkl"
    path.write_bytes(edm_snapshot_bytes(net, init_kwargs, module_src=f"open({str(marker)!r}, 'w').write('x')\n"))
    state = load_edm_snapshot(path)
    assert not marker.exists() and state["net_config"]["arch"] == "songunet"


def test_stub_persistence_module_is_gone_after_writing():
    with stub_persistence_module():
        assert "torch_utils.persistence" in sys.modules
    assert "torch_utils.persistence" not in sys.modules and "torch_utils" not in sys.modules


# ------------------------------------------------------------------------------------- strict loading
def test_missing_or_misshapen_weights_are_user_errors(tmp_path):
    net, init_kwargs = make_case("edm-ddpmpp")
    bad = dict(init_kwargs, model_channels=8)  # the recorded architecture no longer fits the weights
    (tmp_path / "shape.pkl").write_bytes(edm_snapshot_bytes(net, bad))
    with pytest.raises(UserError, match="wrong shape"):
        load_edm_snapshot(tmp_path / "shape.pkl")
    del net.model.map_layer0.bias  # drop one parameter from the record tree
    net.model.map_layer0.register_parameter("bias", None)
    (tmp_path / "missing.pkl").write_bytes(edm_snapshot_bytes(net, init_kwargs))
    with pytest.raises(UserError, match=r"1 missing \(model\.map_layer0\.bias\)"):
        load_edm_snapshot(tmp_path / "missing.pkl")
    (tmp_path / "unknown.pkl").write_bytes(edm_snapshot_bytes(make_case("edm-ddpmpp")[0],
                                                              dict(init_kwargs, fancy_option=3)))
    with pytest.raises(UserError, match="fancy_option"):
        load_edm_snapshot(tmp_path / "unknown.pkl")
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle at all")
    with pytest.raises(UserError, match="not a readable EDM snapshot"):
        load_edm_snapshot(tmp_path / "junk.pkl")


# ------------------------------------------------------------------------------------- CLI, distill, export
@pytest.fixture
def vp_snapshot(tmp_path):
    net, init_kwargs = make_case("vp-ddpmpp-cond")
    path = tmp_path / "edm-tiny-cond-vp.pkl"
    path.write_bytes(edm_snapshot_bytes(net, init_kwargs))
    return net, path


def test_convert_teacher_cli_then_sample_and_eval(vp_snapshot, tmp_path, capsys):
    net, pkl = vp_snapshot
    out = tmp_path / "teacher.safetensors"
    assert main(["convert-teacher", str(pkl), str(out)]) == 0
    assert "reloaded output identical" in capsys.readouterr().out
    assert out.is_file() and out.with_suffix(".json").is_file()
    from diffdistill.io import load_for_sampling
    t, state = load_for_sampling(out)
    assert state["role"] == "teacher" and state["source"]["class"] == "VPPrecond"
    x, s, y = torch.randn(2, 3, 8, 8), torch.tensor([0.1, 5.0]), torch.eye(3)[:2]
    with torch.no_grad():
        assert torch.equal(t(x, s, y), net(x, s, y))
    # the .pkl itself is accepted wherever a checkpoint is
    assert main(["sample", str(pkl), "--steps", "2", "--num-samples", "3", "--out", str(tmp_path / "a.npz")]) == 0
    assert main(["sample", str(out), "--steps", "2", "--num-samples", "3", "--out", str(tmp_path / "b.npz")]) == 0
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert np.array_equal(a["samples"], b["samples"]) and a["samples"].shape == (3, 3, 8, 8)
    assert main(["eval", str(out), "--steps", "2", "--num-samples", "4"]) == 0
    assert main(["convert-teacher", str(pkl), str(tmp_path / "t.pt")]) == 2


def test_student_of_converted_teacher_exports_and_reloads(vp_snapshot, tmp_path):
    """distill --teacher on a converted VP teacher (SiD, data-free), export the student, reload it alone."""
    from diffdistill.distill import distill
    from diffdistill.io import export_checkpoint, load_for_sampling
    from diffdistill.eval.generate import generate
    from diffdistill.io.checkpoint import list_checkpoints
    _, pkl = vp_snapshot
    teacher = tmp_path / "teacher.safetensors"
    assert main(["convert-teacher", str(pkl), str(teacher), "--dropout", "0"]) == 0
    tr = distill("sid", teacher, flags={"run": {"out": str(tmp_path / "sid"), "steps": 2, "batch_size": 4,
                                                "progress": False, "ckpt_every": 2, "sample_every": 0}})
    ckpt = list_checkpoints(tmp_path / "sid" / "checkpoints")[-1]
    out = tmp_path / "student.safetensors"
    meta = export_checkpoint(ckpt, out)
    assert meta["role"] == "student" and meta["net_config"]["precond"] == "vp"
    student, state = load_for_sampling(out)
    assert type(student).__name__ == "VPPrecond" and state["sampling"]["sampler"] == "multistep"
    live = tr.method.sampling_net().eval()
    a, _, _ = generate(live, range(3), state["sampling"])
    b, _, _ = generate(student, range(3), state["sampling"])
    assert torch.allclose(a, b, atol=1e-6) and a.shape == (3, 3, 8, 8)
    assert main(["sample", str(out), "--num-samples", "2", "--out", str(tmp_path / "s.npz")]) == 0


def test_tensor_forms_from_other_torch_versions(tmp_path):
    """Parameters, tensors with Python state (_rebuild_from_type_v2) and protocol-2 bytes all rebuild as tensors."""
    t = torch.randn(3, 2)
    t.note = "state"
    for protocol in (2, 4):
        (tmp_path / "t.pkl").write_bytes(pickle.dumps({"t": t, "p": torch.nn.Parameter(torch.ones(2))}, protocol=protocol))
        out = read_edm_pickle(tmp_path / "t.pkl")
        assert torch.equal(out["t"], t) and torch.equal(out["p"], torch.ones(2)) and type(out["p"]) is torch.Tensor
