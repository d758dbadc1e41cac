"""Make a toy Stable-Diffusion-1.5-shaped text-to-image pipeline on the sklearn digits, the way an SD user would
(diffusers' recipes, not diffdistill), and save it as a standard ``StableDiffusionPipeline`` folder.

Components, all built and trained here (nothing is downloaded):

* ``vae/``: a tiny ``AutoencoderKL`` (1 → 4 latent channels, factor 2: 8×8 digits ↔ 4×4×4 latents) trained on the
  1,500-image training split with the reconstruction MSE + a small KL term (β ``--vae-kl``); its
  ``scaling_factor`` = 1 / std of the training latents, as SD's 0.18215 was chosen.
* ``text_encoder/`` + ``tokenizer/``: a frozen random-weight ``CLIPTextModel`` (2 layers, width 32) and a
  ``CLIPTokenizer`` built offline from a written vocabulary: GPT-2's byte alphabet (every string tokenizes) plus
  BPE merges that make the caption words single tokens, as a real CLIP vocabulary has them (no PyPI package ships
  a CLIP text encoder's weights that loads offline here, so the encoder is random and frozen: it only has to tell
  the prompts apart).
* ``unet/``: a latent ``UNet2DConditionModel`` trained with the plain diffusers text-to-image recipe
  (examples/text_to_image/train_text_to_image.py scaled down): ``DDPMScheduler`` (1,000 steps, SD's scaled-linear
  betas 0.00085..0.012), ε-prediction MSE at uniform timesteps on ``vae.encode(x).latent_dist.sample() ·
  scaling_factor``, encoder hidden states = ``text_encoder(ids)[0]`` of the caption padded to the tokenizer's
  length, 10 % of the captions replaced by the empty prompt (``--proportion_empty_prompts``, so CFG works), AdamW
  with a constant rate after warm-up, gradient clip 1, and the saved weights are the ``EMAModel``'s.
* ``scheduler/``: that ``DDPMScheduler``.

Captions (``captions``): every digit in ``TRAIN_TEMPLATES`` phrasings ("a handwritten seven", "the digit 7", "a 7",
…); ``HELDOUT_TEMPLATES`` are phrasings never used in training ("an image of a 7", …), for evaluating whether the
teacher and its students follow unseen wordings of the same request.

Also written under ``--out``: ``data/`` (the training digits as PNGs + ``captions.jsonl``, for ``diffdistill
encode-data``), ``prompts_seen.jsonl`` and ``prompts_heldout.jsonl`` (``{"text", "label"}`` per row: for
``diffdistill encode-prompts``; ``label`` lets ``eval`` score conditional correctness) and ``toy_t2i.json`` (the
settings, the VAE's reconstruction error, the seconds).

    python scripts/make_toy_t2i_pipeline.py --out /work/runs/t2itoy        # pipeline in OUT/pipe
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffdistill.data.digits import digits_split

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# {w}: the digit's name, {n}: its numeral
TRAIN_TEMPLATES = ["a handwritten {w}", "the digit {n}", "a {n}", "the number {w}", "a drawing of a {w}", "{w}"]
HELDOUT_TEMPLATES = ["an image of a {n}", "handwritten digit {w}", "a picture of the number {n}"]
MAX_TOKENS = 16   # the tokenizer's model_max_length (SD1.5: 77)


def caption(label: int, template: str) -> str:
    return template.format(w=WORDS[label], n=str(label))


def captions(templates) -> list[tuple[str, int]]:
    """(text, label) for every template × digit, template-major."""
    return [(caption(c, t), c) for t in templates for c in range(10)]


# ------------------------------------------------------------------------------------------- text encoder
def _bytes_to_unicode() -> list:
    """GPT-2's byte → printable-character table (the alphabet of CLIP's byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def vocabulary_words() -> list[str]:
    """Every word of the training and held-out captions (a real CLIP vocabulary has them all)."""
    words = set()
    for t, _ in captions(TRAIN_TEMPLATES + HELDOUT_TEMPLATES):
        words.update(t.split())
    return sorted(words)


def build_tokenizer():
    """A CLIPTokenizer over the byte alphabet plus merges that make each caption word one token."""
    from transformers import CLIPTokenizer
    chars = _bytes_to_unicode()
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    merges, have = [], set(tokens)
    for w in vocabulary_words():
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        cur = parts[0]
        for p in parts[1:]:
            merges.append((cur, p))
            cur = cur + p
            if cur not in have:
                have.add(cur)
                tokens.append(cur)
    merges = list(dict.fromkeys(merges))
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, model_max_length=MAX_TOKENS)


def build_text_encoder(vocab_size: int, width: int = 32, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=MAX_TOKENS, projection_dim=width,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPTextModel(cfg).eval().requires_grad_(False)


@torch.no_grad()
def encode_texts(tokenizer, text_encoder, texts) -> torch.Tensor:
    """text_encoder(ids)[0] of the captions padded to model_max_length (what StableDiffusionPipeline feeds)."""
    ids = tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids)[0]


# ------------------------------------------------------------------------------------------- VAE
def build_vae(width: int = 16):
    from diffusers import AutoencoderKL
    return AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(width, 2 * width),
                         latent_channels=4, norm_num_groups=8, layers_per_block=1, sample_size=8)


def train_vae(x_train, x_held, iters: int, kl_weight: float, batch: int, log) -> tuple:
    vae = build_vae()
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters)
    t0 = time.time()
    for step in range(1, iters + 1):
        x = x_train[torch.randint(len(x_train), (batch,))]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.mse_loss(rec, x) + kl_weight * post.kl().mean() / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 500 == 0 or step == iters:
            log(f"vae step {step:5d}  loss {loss.item():.5f}  {time.time() - t0:5.0f} s")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        z_train = vae.encode(x_train).latent_dist.mean
        scale = float(1.0 / z_train.std())
        rec_held = vae.decode(vae.encode(x_held).latent_dist.mean).sample
        rec_train = vae.decode(z_train).sample
    vae.register_to_config(scaling_factor=scale)
    stats = {"vae_recon_mse_heldout": float(F.mse_loss(rec_held, x_held)),
             "vae_recon_mse_train": float(F.mse_loss(rec_train, x_train)),
             "vae_scaling_factor": scale, "vae_seconds": round(time.time() - t0, 1)}
    return vae, stats, rec_held


# ------------------------------------------------------------------------------------------- UNet
def build_unet(cross_dim: int, width: int):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(width, 2 * width),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=cross_dim, attention_head_dim=8, norm_num_groups=16)


def train_unet(latents_of, emb_table, labels_train, n_templates, null_emb, iters, batch, width, lr, drop, log):
    """The diffusers text-to-image loop: ε-MSE at uniform timesteps, caption dropout to the empty prompt."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                          beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False,
                          steps_offset=1)   # as SD1.5's scheduler_config.json
    unet = build_unet(emb_table.shape[-1], width)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    warm = 200
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    ema = EMAModel(unet.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    log(f"UNet2DConditionModel: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M parameters")
    t0 = time.time()
    for step in range(1, iters + 1):
        idx = torch.randint(len(labels_train), (batch,))
        z0 = latents_of(idx)
        # each image gets one of its digit's training captions at random; 10 % the empty prompt
        tmpl = torch.randint(n_templates, (batch,))
        emb = emb_table[tmpl * 10 + labels_train[idx]]
        emb = torch.where((torch.rand(batch) < drop)[:, None, None], null_emb.expand_as(emb), emb)
        noise = torch.randn_like(z0)
        t = torch.randint(0, 1000, (batch,))
        pred = unet(sched.add_noise(z0, noise, t), t, encoder_hidden_states=emb).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        ema.step(unet.parameters())
        if step % 500 == 0 or step == iters:
            log(f"unet step {step:6d}  loss {loss.item():.4f}  {time.time() - t0:6.0f} s")
    final = copy.deepcopy(unet)
    ema.copy_to(final.parameters())
    return final.eval(), sched, round(time.time() - t0, 1)


# ------------------------------------------------------------------------------------------- files
def write_digit_folder(root: Path, x, labels, templates, seed: int = 0) -> None:
    """The digits as 8-bit greyscale PNGs (x ∈ [-1, 1] → round(127.5·(x + 1))) with captions.jsonl, one training
    phrasing per image drawn at random."""
    from PIL import Image
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(len(x)):
        px = np.round((x[i, 0].numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)
        Image.fromarray(px, mode="L").save(root / f"d{i:04d}.png")
        text = caption(int(labels[i]), templates[int(rng.integers(len(templates)))])
        lines.append(json.dumps({"file_name": f"d{i:04d}.png", "text": text}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")


def write_prompts(path: Path, templates) -> None:
    path.write_text("".join(json.dumps({"text": t, "label": c}) + "\n" for t, c in captions(templates)))


def make(out: Path, vae_iters=1500, unet_iters=3000, batch=64, width=32, lr=5e-4, drop=0.1, vae_kl=1e-3,
         seed=0, log=print) -> dict:
    from diffusers import StableDiffusionPipeline
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    train, held = digits_split()
    t0 = time.time()
    vae, vstats, _ = train_vae(train.x, held.x, vae_iters, vae_kl, batch, log)
    log(f"VAE: reconstruction MSE {vstats['vae_recon_mse_heldout']:.5f} on the held-out digits "
        f"(pixels in [-1, 1]), scaling_factor {vstats['vae_scaling_factor']:.4f}")
    tok = build_tokenizer()
    te = build_text_encoder(len(tok.get_vocab()))
    emb_table = encode_texts(tok, te, [t for t, _ in captions(TRAIN_TEMPLATES)])
    null_emb = encode_texts(tok, te, [""])
    with torch.no_grad():
        post = vae.encode(train.x).latent_dist
    mean, std, s = post.mean, post.std, vae.config.scaling_factor

    def latents_of(idx):   # latent_dist.sample() · scaling_factor, as train_text_to_image.py
        return (mean[idx] + std[idx] * torch.randn_like(mean[idx])) * s

    unet, sched, unet_secs = train_unet(latents_of, emb_table, train.labels, len(TRAIN_TEMPLATES), null_emb,
                                        unet_iters, batch, width, lr, drop, log)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(out / "pipe"))
    write_digit_folder(out / "data", train.x, train.labels, TRAIN_TEMPLATES, seed)
    write_prompts(out / "prompts_seen.jsonl", TRAIN_TEMPLATES)
    write_prompts(out / "prompts_heldout.jsonl", HELDOUT_TEMPLATES)
    info = {"vae_iters": vae_iters, "unet_iters": unet_iters, "batch_size": batch, "unet_width": width, "lr": lr,
            "caption_dropout": drop, "vae_kl": vae_kl, "seed": seed, **vstats, "unet_seconds": unet_secs,
            "unet_parameters": sum(p.numel() for p in unet.parameters()),
            "train_templates": TRAIN_TEMPLATES, "heldout_templates": HELDOUT_TEMPLATES,
            "seconds": round(time.time() - t0, 1)}
    (out / "toy_t2i.json").write_text(json.dumps(info, indent=2) + "\n")
    log(f"wrote {out / 'pipe'} ({info['seconds']:.0f} s)")
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder: OUT/pipe (the pipeline), OUT/data, OUT/prompts_*.jsonl")
    p.add_argument("--vae-iters", type=int, default=1500)
    p.add_argument("--unet-iters", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--width", type=int, default=32, help="channels of the UNet's first level")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--vae-kl", type=float, default=1e-3, help="KL weight per latent element / pixel")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    make(Path(a.out), a.vae_iters, a.unet_iters, a.batch_size, a.width, a.lr, a.caption_dropout, a.vae_kl, a.seed,
         log=lambda m: print(m, flush=True))


if __name__ == "__main__":
    main()
