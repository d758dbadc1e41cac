"""Tiny random-weight diffusers pipelines (SD1.5-, SDXL-, SD3-, FLUX-, SANA- and Wan-shaped) built from small
configs the way diffusers' and transformers' own tests build theirs, and saved with ``save_pretrained`` — but
with tokenizers made here from a written vocabulary (transformers' tests download ``hf-internal-testing``
tokenizers; nothing is downloaded here): a byte-level CLIP BPE with no merges (one token per byte), a Unigram T5 /
umT5 tokenizer over single letters, a Gemma BPE over single letters."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

L_CLIP, L_T5 = 16, 12   # model_max_length of the tiny CLIP tokenizers; max_sequence_length of the T5-family ones


def _bytes_to_unicode() -> list:
    """GPT-2's byte → printable-character table, from the toy pipeline script that builds its CLIP tokenizer on it."""
    path = Path(__file__).resolve().parents[2] / "scripts" / "make_toy_t2i_pipeline.py"
    spec = importlib.util.spec_from_file_location("make_toy_t2i_pipeline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._bytes_to_unicode()


CLIP_VOCAB = 2 + 2 * 256


def clip_tokenizer():
    from transformers import CLIPTokenizer
    chars = _bytes_to_unicode()
    vocab = {t: i for i, t in enumerate(["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars])}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=L_CLIP)


def t5_tokenizer():
    from transformers import T5Tokenizer
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)] + [(c, -2.0) for c in
                                                                          "abcdefghijklmnopqrstuvwxyz"]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=L_T5)


def gemma_tokenizer():
    from transformers import GemmaTokenizer
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "▁"] + list("abcdefghijklmnopqrstuvwxyz"))}
    return GemmaTokenizer(vocab=vocab, merges=[], model_max_length=L_T5)


def clip_text(d: int, proj: int | None = None, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=CLIP_VOCAB, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=L_CLIP, projection_dim=proj or d,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if proj else CLIPTextModel)(cfg).eval()


def t5_text(d: int = 16, seed: int = 3, umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel
    torch.manual_seed(seed)
    kw = dict(vocab_size=32, d_model=d, d_kv=8, d_ff=2 * d, num_layers=2, num_heads=2,
              relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return (UMT5EncoderModel(UMT5Config(**kw)) if umt5 else T5EncoderModel(T5Config(**kw))).eval()


def vae(in_channels: int = 3, scaling_factor: float = 0.18215, shift_factor=None, seed: int = 1):
    """AutoencoderKL with two blocks (factor 2), 4 latent channels."""
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=in_channels, out_channels=in_channels,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         block_out_channels=(8, 16), latent_channels=4, norm_num_groups=8, layers_per_block=1,
                         sample_size=16, scaling_factor=scaling_factor, shift_factor=shift_factor).eval()


def unet(cross_dim: int, sample_size: int = 8, sdxl_pooled: int | None = None, seed: int = 2):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    kw = dict(block_out_channels=(8, 16), layers_per_block=1, sample_size=sample_size, in_channels=4, out_channels=4,
              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_dim,
              attention_head_dim=2, norm_num_groups=8)
    if sdxl_pooled:
        kw.update(addition_embed_type="text_time", addition_time_embed_dim=4,
                  projection_class_embeddings_input_dim=sdxl_pooled + 6 * 4, use_linear_projection=True)
    return UNet2DConditionModel(**kw).eval()


def ddpm_scheduler():
    from diffusers import EulerDiscreteScheduler
    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


def build(kind: str, root, **kw):
    """Save a tiny pipeline of ``kind`` (sd, sdxl, sd3, flux, sana, wan) under ``root``; returns the pipeline."""
    import diffusers as d
    from diffusers import FlowMatchEulerDiscreteScheduler
    if kind == "sd":
        pipe = d.StableDiffusionPipeline(vae=vae(kw.get("in_channels", 3)), text_encoder=clip_text(16),
                                         tokenizer=clip_tokenizer(), unet=unet(16, kw.get("sample_size", 8)),
                                         scheduler=ddpm_scheduler(), safety_checker=None, feature_extractor=None,
                                         requires_safety_checker=False)
    elif kind == "sdxl":
        pipe = d.StableDiffusionXLPipeline(vae=vae(), text_encoder=clip_text(8), tokenizer=clip_tokenizer(),
                                           text_encoder_2=clip_text(16, proj=12, seed=5), tokenizer_2=clip_tokenizer(),
                                           unet=unet(24, sdxl_pooled=12), scheduler=ddpm_scheduler())
    elif kind == "sd3":
        torch.manual_seed(4)
        tr = d.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                     num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                     pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8)
        pipe = d.StableDiffusion3Pipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                          vae=vae(scaling_factor=1.5305, shift_factor=0.0609),
                                          text_encoder=clip_text(8, proj=8), tokenizer=clip_tokenizer(),
                                          text_encoder_2=clip_text(8, proj=8, seed=5), tokenizer_2=clip_tokenizer(),
                                          text_encoder_3=t5_text(16), tokenizer_3=t5_tokenizer())
    elif kind == "flux":
        torch.manual_seed(4)
        tr = d.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                      attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                      pooled_projection_dim=8, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
        pipe = d.FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae(scaling_factor=0.3611,
                                                                                   shift_factor=0.1159),
                              text_encoder=clip_text(8, seed=6), tokenizer=clip_tokenizer(),
                              text_encoder_2=t5_text(16), tokenizer_2=t5_tokenizer(), transformer=tr)
    elif kind == "sana":
        from transformers import Gemma2Config, Gemma2Model
        torch.manual_seed(7)
        te = Gemma2Model(Gemma2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                      max_position_embeddings=2048, pad_token_id=0)).eval()
        tr = d.SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=4,
                                      num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=4,
                                      cross_attention_dim=8, caption_channels=16, sample_size=8, patch_size=1)
        dc = d.AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2,
                             encoder_block_types=("ResBlock", "EfficientViTBlock"),
                             decoder_block_types=("ResBlock", "EfficientViTBlock"),
                             encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                             encoder_qkv_multiscales=((), (5,)), encoder_layers_per_block=(1, 1),
                             decoder_layers_per_block=[1, 1], downsample_block_type="conv",
                             upsample_block_type="interpolate", decoder_qkv_multiscales=((), (5,)),
                             scaling_factor=0.41407, decoder_norm_types="rms_norm", decoder_act_fns="silu")
        pipe = d.SanaPipeline(tokenizer=gemma_tokenizer(), text_encoder=te, vae=dc, transformer=tr,
                              scheduler=FlowMatchEulerDiscreteScheduler())
    elif kind == "wan":
        torch.manual_seed(8)
        tr = d.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                     out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
                                     cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
        vw = d.AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                temperal_downsample=[False, True, True])
        pipe = d.WanPipeline(tokenizer=t5_tokenizer(), text_encoder=t5_text(16, umt5=True), vae=vw,
                             scheduler=FlowMatchEulerDiscreteScheduler(), transformer=tr)
    else:
        raise ValueError(kind)
    pipe.save_pretrained(str(root))
    return pipe
