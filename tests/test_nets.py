"""Network tests: SongUNet shapes, EDM-compatible state-dict layout, determinism, gradients; MLP denoiser at init."""

import pytest
import torch

from diffdistill.diffusion.precond import EDMPrecond, edm_coefficients
from diffdistill.nets.mlp import MLPDenoiserNet
from diffdistill.nets.songunet import SongUNet, digits_unet_config

# SongUNet(32, 3, 3, model_channels=32, channel_mult=(1,2,2), num_blocks=2, attn_resolutions=(16,)), derived from
# the EDM layout. Per UNetBlock: norm0/conv0/affine/norm1/conv1 weight+bias = 10 keys; +2 for a 1×1 skip conv
# when channels change; a down/up block (in == out) has conv0.resample_filter + skip.{weight,bias,resample_filter}
# (= 14); attention adds norm2/qkv/proj weight+bias (+6). Mapping: map_layer0/1 (4).
# enc: 32x32_conv 2, block0 10, block1 10, 16x16_down 14, block0 18 (32->64, attn), block1 16 (attn),
#      8x8_down 14, block0 10, block1 10                                                          = 104
# dec: 8x8_in0 16 (attn), in1 10, block0-2 3*12; 16x16_up 14, block0 12, block1 12, block2 18 (attn);
#      32x32_up 14, block0-2 3*12; 32x32_aux_norm 2, aux_conv 2                                   = 172
EDM32_NUM_KEYS = 4 + 104 + 172
EDM32_KEYS = [
    'map_layer0.weight', 'map_layer0.bias', 'map_layer1.weight', 'map_layer1.bias',
    'enc.32x32_conv.weight', 'enc.32x32_conv.bias',
    'enc.32x32_block0.norm0.weight', 'enc.32x32_block0.conv0.weight', 'enc.32x32_block0.affine.weight',
    'enc.32x32_block0.affine.bias', 'enc.32x32_block0.norm1.bias', 'enc.32x32_block0.conv1.weight',
    'enc.32x32_block1.conv1.bias',
    'enc.16x16_down.conv0.weight', 'enc.16x16_down.conv0.resample_filter', 'enc.16x16_down.skip.weight',
    'enc.16x16_down.skip.bias', 'enc.16x16_down.skip.resample_filter',
    'enc.16x16_block0.skip.weight', 'enc.16x16_block0.norm2.weight', 'enc.16x16_block0.qkv.weight',
    'enc.16x16_block0.qkv.bias', 'enc.16x16_block0.proj.weight', 'enc.16x16_block0.proj.bias',
    'enc.16x16_block1.qkv.weight', 'enc.8x8_down.conv0.resample_filter', 'enc.8x8_block1.conv1.weight',
    'dec.8x8_in0.norm2.weight', 'dec.8x8_in0.qkv.weight', 'dec.8x8_in0.proj.bias', 'dec.8x8_in1.conv1.weight',
    'dec.8x8_block0.skip.weight', 'dec.8x8_block2.skip.bias',
    'dec.16x16_up.conv0.resample_filter', 'dec.16x16_up.skip.weight', 'dec.16x16_up.skip.resample_filter',
    'dec.16x16_block2.qkv.weight', 'dec.16x16_block2.proj.weight', 'dec.32x32_up.conv0.weight',
    'dec.32x32_block2.skip.weight', 'dec.32x32_aux_norm.weight', 'dec.32x32_aux_norm.bias',
    'dec.32x32_aux_conv.weight', 'dec.32x32_aux_conv.bias',
]
EDM32_ABSENT = [  # modules EDM does not create for this config (no attention / no skip / no resampling there)
    'map_label.weight', 'map_augment.weight', 'enc.32x32_block0.skip.weight', 'enc.32x32_block0.qkv.weight',
    'enc.32x32_block0.conv0.resample_filter', 'enc.8x8_block0.qkv.weight', 'dec.8x8_in1.qkv.weight',
    'dec.8x8_block2.qkv.weight', 'dec.16x16_block1.qkv.weight', 'dec.32x32_block2.qkv.weight',
    'dec.16x16_aux_conv.weight', 'enc.16x16_block1.skip.weight',
]


def small(**kw):
    cfg = dict(img_resolution=8, in_channels=1, out_channels=1, model_channels=16, channel_mult=(1, 2),
               num_blocks=1, attn_resolutions=(4,), dropout=0.0)
    return SongUNet(**{**cfg, **kw})


def test_songunet_shapes():
    torch.manual_seed(0)
    x, n = torch.randn(3, 1, 8, 8), torch.randn(3)
    assert small()(x, n).shape == (3, 1, 8, 8)
    assert small(label_dim=10)(x, n, torch.eye(10)[:3]).shape == (3, 1, 8, 8)
    net = SongUNet(16, 3, 3, model_channels=16, channel_mult=(1, 2, 2), num_blocks=1, attn_resolutions=(8,))
    assert net(torch.randn(2, 3, 16, 16), torch.randn(2)).shape == (2, 3, 16, 16)
    out, feat = small()(x, n, return_bottleneck=True)
    assert out.shape == (3, 1, 8, 8) and feat.shape == (3, 32, 4, 4)


def test_songunet_edm_state_dict_layout():
    torch.manual_seed(0)
    net = SongUNet(img_resolution=32, in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2, 2),
                   num_blocks=2, attn_resolutions=(16,))
    sd = net.state_dict()
    assert len(sd) == EDM32_NUM_KEYS == 280
    missing = [k for k in EDM32_KEYS if k not in sd]
    assert not missing, missing
    assert not [k for k in EDM32_ABSENT if k in sd]
    # resample_filter: persistent buffer, only on up/down convs; [1,1] -> 2x2 box filter / 4
    assert sum(k.endswith('resample_filter') for k in sd) == 8
    assert torch.equal(sd['enc.16x16_down.conv0.resample_filter'], torch.full((1, 1, 2, 2), 0.25))
    assert sd['enc.16x16_block0.qkv.weight'].shape == (192, 64, 1, 1)
    assert sd['dec.8x8_block0.conv0.weight'].shape == (64, 128, 3, 3)
    assert sd['dec.32x32_aux_conv.weight'].shape == (3, 32, 3, 3)
    assert net.enc['16x16_down'].norm0.num_groups == 8 and net.dec['8x8_in0'].norm0.num_groups == 16
    # EDMPrecond wraps it as `model`, as in EDM pickles; a strict reload of the same layout works
    pre = EDMPrecond(net, img_channels=3, img_resolution=32)
    assert 'model.enc.32x32_conv.weight' in pre.state_dict()
    pre.load_state_dict({k: v.clone() for k, v in pre.state_dict().items()}, strict=True)


def test_songunet_conditional_and_augment_keys():
    sd = small(label_dim=10, augment_dim=9).state_dict()
    assert sd['map_label.weight'].shape == (16, 10) and sd['map_label.bias'].shape == (16,)
    assert sd['map_augment.weight'].shape == (16, 9) and 'map_augment.bias' not in sd


def test_songunet_matches_edm_reference_numbers():
    # Reference values computed with NVlabs/edm's training/networks.py SongUNet, same seed and arguments.
    torch.manual_seed(0)
    net = small(label_dim=3).eval()
    g = torch.Generator().manual_seed(1)
    x, n, y = torch.randn(2, 1, 8, 8, generator=g), torch.tensor([-1.0, 0.5]), torch.eye(3)[[0, 2]]
    out, feat = net(x, n, y, return_bottleneck=True)
    assert out.double().abs().sum().item() == pytest.approx(0.000649321935490832, rel=1e-4)
    assert out.double().sum().item() == pytest.approx(-8.534095007206588e-05, rel=1e-3)
    assert feat.double().abs().sum().item() == pytest.approx(18.769890180585207, rel=1e-4)


def test_songunet_deterministic_and_label_sensitive():
    x, n = torch.randn(4, 1, 8, 8), torch.randn(4)
    y0, y1 = torch.eye(10)[[0, 1, 2, 3]], torch.eye(10)[[4, 5, 6, 7]]
    torch.manual_seed(3)
    a = small(label_dim=10)
    torch.manual_seed(3)
    b = small(label_dim=10)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert torch.equal(a(x, n, y0), b(x, n, y0))
    assert (a(x, n, y0) - a(x, n, y1)).abs().max() > 0
    with pytest.raises(ValueError, match="class-conditional"):
        a(x, n)


def test_songunet_rejects_unsupported_types():
    with pytest.raises(ValueError, match="standard"):
        small(encoder_type='progressive')
    with pytest.raises(ValueError, match="standard"):
        small(decoder_type='residual')


def test_songunet_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = small(label_dim=3, augment_dim=2, dropout=0.1).train()
    x, n, y = torch.randn(4, 1, 8, 8), torch.randn(4), torch.eye(3)[[0, 1, 2, 0]]
    (net(x, n, y) * torch.randn(4, 1, 8, 8)).sum().backward()
    # only the augmentation mapping is unused when no augment_labels are given
    assert net.map_augment.weight.grad is None
    dead = [k for k, p in net.named_parameters() if k != 'map_augment.weight' and (p.grad is None or not p.grad.any())]
    assert not dead, dead
    net.zero_grad(set_to_none=True)
    net(x, n, y, torch.randn(4, 2)).square().sum().backward()
    assert net.map_augment.weight.grad.any()


def test_digits_config_size():
    net = SongUNet(**digits_unet_config())
    n = sum(p.numel() for p in net.parameters())
    assert 350_000 <= n <= 450_000
    assert net(torch.randn(2, 1, 8, 8), torch.randn(2)).shape == (2, 1, 8, 8)


@pytest.mark.parametrize('label_dim', [0, 4])
def test_mlp_zero_at_init_gives_gaussian_denoiser(label_dim):
    torch.manual_seed(0)
    D = EDMPrecond(MLPDenoiserNet(dim=2, hidden=64, depth=3, emb_dim=32, label_dim=label_dim), img_channels=2,
                   img_resolution=0, label_dim=label_dim)
    x, sigma = torch.randn(16, 2) * 3, torch.rand(16) * 10 + 0.01
    y = torch.eye(4)[torch.arange(16) % 4] if label_dim else None
    assert torch.equal(D.model(x, sigma.log() / 4, y), torch.zeros(16, 2))
    c_skip = edm_coefficients(sigma)[0]
    assert torch.equal(D(x, sigma, y), c_skip[:, None] * x)
    D(x, sigma, y).square().sum().backward()
    assert D.model.out.weight.grad.any() and D.model.out.bias.grad.any()


def test_mlp_label_sensitive_after_training_step():
    torch.manual_seed(0)
    net = MLPDenoiserNet(hidden=32, depth=2, emb_dim=16, label_dim=3)
    torch.nn.init.normal_(net.out.weight)
    x, n = torch.randn(5, 2), torch.randn(5)
    assert (net(x, n, torch.eye(3)[[0] * 5]) - net(x, n, torch.eye(3)[[1] * 5])).abs().max() > 0
    with pytest.raises(ValueError, match="class-conditional"):
        net(x, n)
