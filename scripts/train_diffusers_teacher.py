"""Train a plain diffusers teacher on the sklearn digits — the way a user of diffusers would, not with diffdistill.

The recipe is diffusers' ``examples/unconditional_image_generation/train_unconditional.py`` scaled to 8×8 images:
a ``UNet2DModel``, a ``DDPMScheduler`` (1,000 steps), ``scheduler.add_noise`` at uniform random timesteps, AdamW
(lr 1e-4, β = (0.95, 0.999), weight decay 1e-6, ε = 1e-8), a cosine schedule with 500 warm-up steps, and an
``EMAModel`` (inv_gamma 1, power 3/4, max decay 0.9999) whose weights are saved. The loss follows the prediction
type as in diffusers' scripts: ε-MSE (``epsilon``), MSE to ``scheduler.get_velocity`` (``v_prediction``, as
train_text_to_image.py), or the SNR-weighted x₀-MSE of train_unconditional.py (``sample``).

The result is a pipeline folder (``unet/`` + ``scheduler/``, i.e. ``DDPMPipeline.save_pretrained``) that
``diffdistill distill --teacher FOLDER`` reads. Data: the digits mapped to [-1, 1] (x/8 − 1; the 1,500-image
training split diffdistill also uses, so held-out metrics stay held out).

    python scripts/train_diffusers_teacher.py --out runs/ddpm-eps                       # ε, linear betas
    python scripts/train_diffusers_teacher.py --out runs/ddpm-v --prediction-type v_prediction
    python scripts/train_diffusers_teacher.py --out runs/ddpm-x0 --prediction-type sample
    python scripts/train_diffusers_teacher.py --out runs/ddpm-sl --beta-schedule scaled_linear --beta-end 0.012
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel

from diffdistill.data.digits import digits_split


def build_unet(width: int) -> UNet2DModel:
    """A small UNet2DModel for 1×8×8 images (8 → 4 → 2, attention at the two coarser levels)."""
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=2,
                       block_out_channels=(width, 2 * width, 2 * width), norm_num_groups=min(32, width // 2),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="pipeline folder to write")
    p.add_argument("--prediction-type", default="epsilon", choices=("epsilon", "v_prediction", "sample"))
    p.add_argument("--beta-schedule", default="linear", choices=("linear", "scaled_linear", "squaredcos_cap_v2"))
    p.add_argument("--beta-start", type=float, default=1e-4)
    p.add_argument("--beta-end", type=float, default=0.02)
    p.add_argument("--iters", type=int, default=6000, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--width", type=int, default=16, help="channels of the first UNet level")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)

    data = digits_split()[0].x                      # [1500, 1, 8, 8] in [-1, 1]
    unet = build_unet(a.width)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule=a.beta_schedule, beta_start=a.beta_start,
                          beta_end=a.beta_end, prediction_type=a.prediction_type)
    opt = torch.optim.AdamW(unet.parameters(), lr=a.lr, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    lr_sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=500, num_training_steps=a.iters)
    ema = EMAModel(unet.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    alphas_cumprod = sched.alphas_cumprod
    print(f"UNet2DModel: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M parameters; "
          f"{a.prediction_type}, {a.beta_schedule} betas {a.beta_start}..{a.beta_end}")
    t0 = time.time()
    for step in range(1, a.iters + 1):
        x0 = data[torch.randint(len(data), (a.batch_size,))]
        noise = torch.randn_like(x0)
        t = torch.randint(0, sched.config.num_train_timesteps, (a.batch_size,))
        out = unet(sched.add_noise(x0, noise, t), t).sample
        if a.prediction_type == "epsilon":
            loss = F.mse_loss(out, noise)
        elif a.prediction_type == "v_prediction":
            loss = F.mse_loss(out, sched.get_velocity(x0, noise, t))
        else:  # train_unconditional.py's "sample" branch: SNR weights ᾱ/(1 − ᾱ) on the x₀ error
            ac = alphas_cumprod[t].reshape(-1, 1, 1, 1)
            loss = (ac / (1 - ac) * (out - x0).square()).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        ema.step(unet.parameters())
        if step % 500 == 0 or step == a.iters:
            print(f"step {step:6d}  loss {loss.item():.4f}  ema decay {ema.cur_decay_value:.4f}  "
                  f"{time.time() - t0:6.0f} s", flush=True)
    final = copy.deepcopy(unet)
    ema.copy_to(final.parameters())
    out = Path(a.out)
    DDPMPipeline(unet=final, scheduler=sched).save_pretrained(str(out))
    (out / "training.json").write_text(json.dumps({**vars(a), "seconds": round(time.time() - t0, 1),
                                                    "recipe": "diffusers train_unconditional.py, scaled to 8x8"},
                                                   indent=2) + "\n")
    print(f"wrote {out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
