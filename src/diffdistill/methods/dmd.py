"""DMD (Yin et al., "One-step Diffusion with Distribution Matching Distillation", CVPR 2024).

A one-step generator G(z) = D_G(σ_max·z; σ_max), initialised from the teacher, is trained with

    L_G = L_DM + λ_reg·L_reg,   λ_reg = 0.25

where L_DM is the distribution-matching pseudo-loss (score_distill.dm_gradient / dm_pseudo_loss: fake minus real
denoiser at x_t = x + σ_t ε, t ~ U{20..980}, normalised per sample by mean|x − D_real|) and L_reg pulls G(z_ref)
toward y_ref, the teacher's deterministic ODE output from the same noise (precomputed pairs). A fake-score network,
also initialised from the teacher, is trained on the generator's detached samples with EDM's denoising loss. One
generator step then one fake-score step per iteration (1:1), on the same generated batch. Data-free.

Deviation: the paper's L_reg is LPIPS; LPIPS weights cannot be fetched offline, so L_reg here is the mean squared
error (an L2 distance). The pairs come from EDM's Heun sampler with 18 steps (35 NFE), the CIFAR-10 setting. There
is no official DMD code; the defaults (``DMDOptions``) follow the DMD2 repository's EDM code, the reference
implementation (tianweiy/DMD2 ``main/edm/train_edm.py``, ``edm_guidance.py``, ``edm_network.py``): AdamW lr 2e-6 for
both networks, β = (0.9, 0.999), wd 0.01, 500-iteration warm-up then constant, dropout 0 in every net, uniform random
generator labels, the DM gradient on grid indices 20..980 and the fake-score loss on 0..999 of the reversed
1000-point Karras grid; plus the paper's λ_reg = 0.25.

The pairs are stored under ``pairs_path`` (default ``<run dir>/dmd_pairs``) in chunks written atomically, so an
interrupted generation resumes where it stopped and a resumed run reuses them; chunk i's noise is a pure function
of (``pairs_seed``, i).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..diffusion import condition as cond
from ..diffusion.guidance import GuidedDenoiser, set_guidance
from ..diffusion.samplers import heun_sampler
from ..diffusion.schedules import karras_sigmas
from ..errors import UserError
from ..io.checkpoint import atomic_write
from ..options import option
from ..train import distributed as dist
from ..train.lr import warmup_lambda
from .registry import register
from .base import lr_factor
from .score_distill import DMDFamilyOptions, DistributionMatchingMethod, set_dropout


def regression_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """DMD's regression loss (the paper's regression term uses LPIPS; here the L2 stand-in): mean_BCHW (G(z_ref) − y_ref)².
    Zero when G(z_ref) = y_ref."""
    return (pred - target.detach()).square().mean()


def teacher_fingerprint(net: torch.nn.Module) -> str:
    """A short hash of a network's weights, to tie stored pairs to the teacher that made them."""
    return tensors_fingerprint(net.state_dict())


def tensors_fingerprint(tensors: dict) -> str:
    h = hashlib.sha256()
    for k, v in sorted(tensors.items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _chunk_labels(start: int, n: int, label_dim: int, conditions=None):
    """Conditions of pairs start..start+n−1: (index mod label_dim) one-hot, or row (index mod N) of the
    prompt bank of an embedding-conditioned teacher."""
    if conditions is not None:
        return conditions.rows(torch.arange(start, start + n) % len(conditions))
    if not label_dim:
        return None
    return torch.nn.functional.one_hot(torch.arange(start, start + n) % label_dim, label_dim).float()


@torch.no_grad()
def teacher_pairs(teacher, num_pairs: int, path=None, seed: int = 0, chunk_size: int = 256, heun_steps: int = 18,
                  device="cpu", say=print, guidance: float = 1.0, conditions=None):
    """(z_ref, y_ref, labels): ``num_pairs`` noises and the teacher's Heun-ODE outputs from σ_max·z_ref
    (``heun_steps`` Karras steps, 2·heun_steps − 1 NFE; 18 → 35). Chunk i holds pairs [i·chunk, (i+1)·chunk);
    its noise comes from a generator seeded by (seed, i) and its labels are (index mod label_dim) one-hot.

    With ``path`` the chunks are read from / written to ``path/pairs-XXXXX.pt`` (atomic writes), so an interrupted
    generation resumes; a chunk made by another teacher or with other settings raises a UserError. ``guidance``:
    the teacher's CFG scale on the ODE (the guided teacher whose distribution the DM loss targets).
    ``conditions``: the prompt bank (a `Condition`) of a teacher conditioned on embeddings; pair i gets its row
    i mod N."""
    if num_pairs < 1:
        raise UserError(f"num_pairs must be positive, got {num_pairs}")
    shape = tuple(teacher.sample_shape)
    L = int(getattr(teacher, "label_dim", 0) or 0)
    sigmas = karras_sigmas(heun_steps, teacher.sigma_min, teacher.sigma_max)
    meta = {"teacher": teacher_fingerprint(teacher), "num_pairs": int(num_pairs), "chunk_size": int(chunk_size),
            "seed": int(seed), "heun_steps": int(heun_steps), "shape": list(shape), "label_dim": L}
    if conditions is not None:
        meta["conditions"] = tensors_fingerprint(conditions.state())
    if guidance != 1:   # (unguided chunks keep the meta they always had)
        meta["guidance"] = float(guidance)
        teacher = GuidedDenoiser(teacher, guidance)
    root = Path(path) if path else None
    zs, ys, made = [], [], 0
    n_chunks = -(-num_pairs // chunk_size)
    for i in range(n_chunks):
        start = i * chunk_size
        n = min(chunk_size, num_pairs - start)
        f = root / f"pairs-{i:05d}.pt" if root else None
        if f is not None and f.exists():
            chunk = torch.load(f, map_location="cpu", weights_only=True)
            if json.loads(chunk["meta"]) != meta:
                raise UserError(f"{f} was made by another teacher or with other pair settings: delete {root} or "
                                f"set method.pairs_path to a new folder")
            zs.append(chunk["z"])
            ys.append(chunk["y"])
            continue
        if made == 0:
            say(f"dmd: generating {num_pairs - start} teacher pairs (Heun, {2 * heun_steps - 1} NFE)"
                + (f" into {root}" if root else ""))
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + i)
        z = torch.randn((chunk_size,) + shape, generator=g)[:n]  # full-chunk draw: independent of num_pairs
        labels = _chunk_labels(start, n, L, conditions)
        y, _ = heun_sampler(teacher, z.to(device), sigmas, None if labels is None else labels.to(device))
        y = y.float().cpu()
        made += n
        if f is not None and dist.rank() == 0:
            atomic_write(f, lambda tmp: torch.save({"z": z, "y": y, "meta": json.dumps(meta)}, tmp))
        zs.append(z)
        ys.append(y)
    return torch.cat(zs), torch.cat(ys), _chunk_labels(0, num_pairs, L, conditions)


@dataclass
class DMDOptions(DMDFamilyOptions):
    reg_weight: float = option(0.25, "λ_reg, weight of the regression loss (DMD paper; 0: no pairs, pure DM)", ge=0)
    num_pairs: int = option(10_000, "number of precomputed (noise, teacher ODE output) pairs", ge=1)
    reg_batch_size: Optional[int] = option(None, "pairs per generator step; null: the batch size", ge=1)
    pairs_path: Optional[str] = option(None, "folder of the pair chunks; null: <run dir>/dmd_pairs (in memory "
                                             "without a run dir)")
    pairs_seed: int = option(0, "seed of the pairs' noise (chunk i uses (seed, i))")
    pairs_chunk: int = option(256, "pairs per stored chunk", ge=1)
    heun_steps: int = option(18, "Heun steps of the teacher ODE for the pairs (18: EDM's CIFAR-10 35 NFE)", ge=1)

    def validate(self):
        if self.student_steps != 1:
            raise UserError(f"dmd trains one-step generators only (got method.student_steps={self.student_steps}); "
                            f"use dmd2 for multi-step students")


@register
class DMD(DistributionMatchingMethod):
    name = "dmd"
    summary = "DMD: distribution matching + regression to teacher ODE pairs, 1 step, data-free (Yin et al. 2024)"
    needs_data = False
    Options = DMDOptions
    input_sigma_option = "student_sigma_max"

    def __init__(self, ctx, opts=None, **overrides):
        super().__init__(ctx, opts, **overrides)
        o = self.opts
        if o.dropout is not None:   # DMD2's edm_network.py: every net without dropout (the teacher runs in eval)
            set_dropout(self.G, o.dropout)
            set_dropout(self.fake, o.dropout)
        self.sigma_max = self.student_sigma_max   # the one-step input σ (regression pairs keep the teacher's)
        self.reg_batch_size = o.reg_batch_size or ctx.batch_size
        if o.reg_weight > 0:   # the regression minibatch splits into micro-batches like the batch
            ctx.draws.check_divisible(self.reg_batch_size, "method.reg_batch_size")
        pairs_path = o.pairs_path
        if pairs_path is None and ctx.run_dir is not None:
            pairs_path = str(Path(ctx.run_dir) / "dmd_pairs")
        self.pairs_path = pairs_path
        say = (lambda m: print(f"[diffdistill] {m}", flush=True)) if dist.rank() == 0 else (lambda m: None)
        if o.reg_weight > 0 and o.guidance_student is not None:
            raise UserError("dmd: method.guidance_student needs regression pairs at every w; set "
                            "method.reg_weight=0 (or distil a w-conditioned student with dmd2 / sid)")
        if o.reg_weight > 0:
            bank = ctx.conditions if self.conditioning == "embeddings" else None
            if bank is not None and o.guidance_embedded is not None:   # the pairs come from the teacher at that input
                bank = set_guidance(self.teacher, bank, o.guidance_embedded)
            z, y, lab = teacher_pairs(self.teacher, o.num_pairs, pairs_path, o.pairs_seed, o.pairs_chunk,
                                      o.heun_steps, ctx.device, say, guidance=o.guidance_real, conditions=bank)
            lab = self.with_student_guidance(lab)   # the student's own regression input
        else:
            z = y = lab = None
        self.z_ref = None if z is None else z.to(ctx.device)
        self.y_ref = None if y is None else y.to(ctx.device)
        self.labels_ref = None if lab is None else lab.to(ctx.device)
        adamw = dict(betas=o.betas, weight_decay=o.weight_decay)
        f = lr_factor(self.name, o, self.teacher, self.sigma_max)
        self.optimizers["generator"] = torch.optim.AdamW(self.G.parameters(), lr=o.lr * f, **adamw)
        self.optimizers["critic"] = torch.optim.AdamW(self.fake.parameters(), lr=o.critic_lr() * f, **adamw)
        for k in ("generator", "critic"):
            self.schedulers[k] = torch.optim.lr_scheduler.LambdaLR(self.optimizers[k], warmup_lambda(o.warmup_steps))
        self._cache = None   # (step, micro-batch) → (detached x, labels) of the generator phase, for the critic

    def phases(self, step):
        return ["generator", "critic"]

    def loss(self, phase, batch, step):
        if phase == "generator":
            return self._generator_loss(batch, step)
        if phase == "critic":
            return self._critic_loss(step)
        raise ValueError(f"unknown phase {phase!r}")

    def _generator_loss(self, batch, step):
        n = self.ctx.micro_batch_size
        labels = self.random_labels(n)   # uniform, as DMD2's train_edm.py draws the generator's labels
        z = self.randn(n)
        use_reg, labels_all = self.z_ref is not None, labels
        if use_reg:  # one forward for the DM batch and the regression minibatch
            draws, pairs = self.ctx.draws, len(self.z_ref)
            idx = draws.randint(pairs, draws.share(self.reg_batch_size, "method.reg_batch_size"))
            idx = idx.to(self.z_ref.device)
            z = torch.cat([z, self.z_ref[idx]])
            if labels is not None:
                labels_all = cond.cat([labels, cond.rows(self.labels_ref, idx)])
        out = self.G(z * self.sigma_max, torch.full((z.shape[0],), self.sigma_max, device=z.device), labels_all)
        x = out[:n]
        self._cache = {key: v for key, v in (self._cache or {}).items() if key[0] == step}
        self._cache[step, self.ctx.draws.part] = (x.detach(), labels)
        self.generated, self.generated_labels = x, labels
        l_dm, _, _ = self.distribution_matching_loss(x, labels)
        loss, logs = l_dm, {"dmd/dm": float(l_dm.detach())}
        if use_reg:
            l_reg = regression_loss(out[n:], self.y_ref[idx])
            loss = loss + self.opts.reg_weight * l_reg
            logs["dmd/reg"] = float(l_reg.detach())
        return loss, logs

    def _critic_loss(self, step):
        cached = (self._cache or {}).pop((step, self.ctx.draws.part), None)
        self._cache = self._cache or None   # None: nothing cached
        if cached is not None:
            x, labels = cached
        else:  # only when the generator phase was skipped (not in the 1:1 schedule)
            n = self.ctx.micro_batch_size
            labels = self.random_labels(n)
            with torch.no_grad():
                x = self.G(self.randn(n) * self.sigma_max, torch.full((n,), self.sigma_max, device=self.ctx.device),
                           labels)
        l_fake = self.critic_denoising_loss(x, labels, self.opts.critic_reduction)
        return l_fake, {"dmd/fake_score": float(l_fake.detach())}

    def sampling_net(self):
        return self.G

    def sampling_spec(self):
        return {"sampler": "multistep", "sigmas": [self.sigma_max]}
