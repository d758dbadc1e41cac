"""RDD — Relational Diffusion Distillation (Feng, Yang, An, Huang, Diao, Wang & Xu, "Relational Diffusion Distillation
for Efficient Image Generation", ACM MM 2024, arXiv 2410.07679; code cantbebetter2/RDD).

CFD (cfd.py; itself progressive distillation, pd.py) plus two relational terms on the frozen classifier's final
spatial map, computed on the PD target x̃ (teacher, no grad) and the student's x̂ in the same forward pass CFD's
pooled features come from:

    L = L_CFD(τ = 0.9) + 1.0·L_IS_P2P(τ = 1) + 0.1·L_M_P2P(τ_c = 0.1, τ_kd = 1)            (no PD MSE by default)

* IS_P2P (cross-sample pixel-to-pixel): every pixel's channel vector is L2-normalised; for every ordered pair of
  samples (b, d) (b = d included) and every pixel i of b, the row r_{b,d,i}(j) = ⟨ŝ_{b,i}, ŝ_{d,j}⟩ over the pixels j
  of d; L_IS = (1/(B²·HW)) Σ_{b,d,i} KL(softmax(r^T/τ) ‖ softmax(r^S/τ)). Identically 0 when HW = 1.
* M_P2P (pixel memory): a FIFO queue of Q teacher pixel embeddings (unit vectors, random at the start). Each step,
  before the loss, K = min(#pixels, adds) random teacher pixels of the (all-gathered) batch are written at the ring
  pointer (when p + K ≥ Q: into the last K slots and p ← 0). A fixed contrast set of the slots
  round(linspace(0, Q−1, M)) gives per-pixel logits ℓ = Q_sub·v/τ_c, with v the teacher pixel (normalised) or the
  student pixel through a projection head (Conv1×1 → BN → ReLU → Conv1×1, no biases, then normalised);
  L_M = τ_kd²·(1/(B·HW)) Σ_{b,i} KL(softmax(ℓ^T/τ_kd) ‖ softmax(ℓ^S/τ_kd)).

Official defaults [code]: Q = 20 000, adds 128, M = 4096, τ_c = 0.1, τ_kd = 1, weights 1.0 (IS) and 0.1 (M), CFD τ
0.9 with DenseNet-201 (β = 0), Adam 5e-5 with a cosine LR, clip 1 (student only), batch 128, 20 000 updates for the
8 → 4 stage; the head has its own Adam (lr 5e-5, wd 0, no schedule, no clip), SyncBN in the head. Here the head is
stepped by this method after the trainer's student step (``after_step``), from the gradients of the same backward
pass, unclipped (as officially); with several ranks its gradients are averaged; the head uses plain BatchNorm.
Each official stage is a separate run, so the queue, the head and its optimizer start afresh at every halving here.

**Known bug of the official code (the enqueue reshape).** The official enqueue takes the B×C×H×W teacher map and
views it as C × (B·H·W) without moving the channels last, so each queued "pixel" mixes channels of different samples;
it is right only at B = 1 (or C = 1). This implementation queues true pixel vectors (channels last, then flatten);
``rdd_compat_view_bug=True`` reproduces the official behaviour, for comparison with published numbers only.

Nothing is copied from the official code; the formulas follow the project's formula sheet
(shared/design/pd_rdd_cfd.md §3).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..train import distributed as dist
from .cfd import CFD
from .feature_classifiers import classifier_outputs
from .registry import register
from .score_distill import shared_randint


# ------------------------------------------------------------------------------------------------ pixels
def pixel_rows(fmap: torch.Tensor, compat_view_bug: bool = False) -> torch.Tensor:
    """The pixel embeddings of a [B, C, H, W] map as rows [B·H·W, C]: row b·HW + p is pixel p of sample b
    (channels last, then flatten). ``compat_view_bug=True`` gives the official enqueue's rows instead: the
    contiguous tensor viewed as [C, B·H·W] and transposed, whose row j is the flat elements j, BHW + j, …, which
    mixes channels of different samples unless B = 1 or C = 1."""
    B, C = fmap.shape[:2]
    if compat_view_bug:
        return fmap.contiguous().view(C, -1).t()
    return fmap.permute(0, *range(2, fmap.ndim), 1).reshape(-1, C)


def gather_batch(t: torch.Tensor) -> torch.Tensor:
    """All ranks' tensors concatenated along the batch axis (no grad); the tensor itself with one process."""
    if not dist.is_distributed():
        return t
    import torch.distributed as tdist
    parts = [torch.empty_like(t) for _ in range(dist.world_size())]
    tdist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def shared_randperm(n: int, generator: torch.Generator, device="cpu") -> torch.Tensor:
    """A random permutation of range(n) from ``generator``; with several ranks rank 0's is broadcast, so every rank
    queues the same pixels of the all-gathered map and the queues stay identical."""
    perm = torch.randperm(n, generator=generator).to(device)
    if dist.is_distributed():
        import torch.distributed as tdist
        tdist.broadcast(perm, src=0)
    return perm


class PixelMemoryBank:
    """RDD's FIFO queue of teacher pixel embeddings (Feng et al. 2024, the memory-bank P2P term; official defaults
    size 20 000, 128 additions per step, a fixed contrast subset of 4096 slots at round(linspace(0, size−1, 4096))).

    ``queue`` [size, C] starts as random unit vectors; ``enqueue`` writes K = min(#pixels, adds) randomly chosen,
    L2-normalised pixels of a teacher map at the pointer p: if p + K ≥ size they go to the last K slots and p ← 0,
    otherwise to [p, p + K) and p ← p + K."""

    def __init__(self, size: int, dim: int, adds_per_step: int, contrast_size: int, generator: torch.Generator,
                 device="cpu"):
        size, adds_per_step, contrast_size = int(size), int(adds_per_step), int(contrast_size)
        if not 1 <= adds_per_step <= size or not 1 <= contrast_size <= size:
            raise UserError(f"memory bank: need 1 <= queue_adds <= queue_size and 1 <= contrast_size <= queue_size, "
                            f"got queue_size={size}, queue_adds={adds_per_step}, contrast_size={contrast_size}")
        self.size, self.adds = size, adds_per_step
        self.queue = F.normalize(torch.randn(size, dim, generator=generator), dim=1).to(device)
        self.ptr = 0
        self.contrast_index = torch.linspace(0, size - 1, contrast_size).round().long().to(device)

    @torch.no_grad()
    def enqueue(self, fmap: torch.Tensor, generator: torch.Generator, compat_view_bug: bool = False) -> int:
        """Write K random pixels of ``fmap`` [B, C, H, W] (channels-last rows, or the official view with
        ``compat_view_bug``); returns K."""
        rows = pixel_rows(fmap.detach(), compat_view_bug)
        K = min(rows.shape[0], self.adds)
        pick = shared_randperm(rows.shape[0], generator, rows.device)[:K]
        feats = F.normalize(rows[pick], dim=1).to(self.queue.dtype)
        if self.ptr + K >= self.size:
            self.queue[self.size - K:] = feats
            self.ptr = 0
        else:
            self.queue[self.ptr:self.ptr + K] = feats
            self.ptr += K
        return K

    def contrast(self) -> torch.Tensor:
        """The fixed contrast subset of the queue, [contrast_size, C]."""
        return self.queue[self.contrast_index]

    def state_dict(self) -> dict:
        return {"queue": self.queue.clone(), "ptr": int(self.ptr)}

    def load_state_dict(self, state: dict) -> None:
        self.queue.copy_(state["queue"])
        self.ptr = int(state["ptr"])


# ------------------------------------------------------------------------------------------------ losses
def _row_kl(logits_t: torch.Tensor, logits_s: torch.Tensor) -> torch.Tensor:
    """KL(softmax(logits_t) ‖ softmax(logits_s)) over the last axis, one value per row."""
    log_p_t = F.log_softmax(logits_t, dim=-1)
    return (log_p_t.exp() * (log_p_t - F.log_softmax(logits_s, dim=-1))).sum(-1)


def intra_sample_p2p_loss(map_student: torch.Tensor, map_teacher: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """RDD's IS_P2P relational loss (Feng et al. 2024, the intra-/cross-sample pixel-to-pixel term; official τ = 1,
    weight 1.0): with ŝ the per-pixel L2-normalised channel vectors (channels last),

        r_{b,d,i}(j) = ⟨ŝ_{b,i}, ŝ_{d,j}⟩,   L_IS = (1/(B²·HW)) Σ_{b,d,i} KL(softmax(r^T_{b,d,i}/τ) ‖ softmax(r^S_{b,d,i}/τ))

    over all ordered sample pairs (b, d), b = d included. The teacher map carries no grad. 0 when HW = 1, and
    invariant to positive per-pixel scaling of either map."""
    B, C = map_student.shape[:2]
    s = F.normalize(map_student, dim=1).flatten(2).transpose(1, 2)             # [B, HW, C]
    t = F.normalize(map_teacher.detach(), dim=1).flatten(2).transpose(1, 2)
    r_s = torch.einsum("bic,djc->bdij", s, s)                                  # [B, B, HW, HW]
    r_t = torch.einsum("bic,djc->bdij", t, t)
    return _row_kl(r_t / tau, r_s / tau).mean()


def memory_p2p_loss(proj_student: torch.Tensor, map_teacher: torch.Tensor, contrast: torch.Tensor,
                    contrast_tau: float = 0.1, kd_tau: float = 1.0) -> torch.Tensor:
    """RDD's M_P2P loss against the pixel memory (Feng et al. 2024, the memory-bank term; official τ_c = 0.1,
    τ_kd = 1, weight 0.1): with v^S the student's *projected* pixels and v^T the teacher's pixels, each L2-normalised
    here, and the contrast set Q_sub [M, C],

        ℓ = Q_sub·v/τ_c,   L_M = τ_kd²·(1/(B·HW)) Σ_{b,i} KL(softmax(ℓ^T/τ_kd) ‖ softmax(ℓ^S/τ_kd)).

    The teacher map and the queue carry no grad."""
    s = F.normalize(proj_student, dim=1).flatten(2).transpose(1, 2)            # [B, HW, C]
    t = F.normalize(map_teacher.detach(), dim=1).flatten(2).transpose(1, 2)
    q = contrast.detach()
    l_s, l_t = s @ q.t() / contrast_tau, t @ q.t() / contrast_tau              # [B, HW, M]
    return kd_tau ** 2 * _row_kl(l_t / kd_tau, l_s / kd_tau).mean()


class ProjectionHead(nn.Module):
    """RDD's student projection head on the classifier map: Conv1×1(C→C) → BatchNorm → ReLU → Conv1×1(C→C), no
    biases (official; SyncBN there, plain BatchNorm here)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 1, bias=False)

    def forward(self, x):
        return self.conv2(F.relu(self.bn(self.conv1(x))))


# ------------------------------------------------------------------------------------------------ method
@register
class RDD(CFD):
    name = "rdd"
    summary = "RDD: CFD + cross-sample pixel-to-pixel relations and a pixel memory bank (Feng et al. 2024)"

    presets: ClassVar[dict] = {
        # 8×8 digits: 8 → 1 with the digits feature CNN (final map 64×4×4); memory scaled to 2048 / 32 / 512
        # (formula sheet §4); lr 2e-4, batch 128, 500 updates per halving; β = 0 (RDD's DenseNet-201 profile).
        "images": {
            "run": {"steps": 1500, "batch_size": 128, "grad_clip": 1.0, "log_every": 50, "ckpt_every": 500,
                    "sample_every": 500},
            "method": {"start_steps": 8, "iters_per_halving": 500, "lr": 2e-4, "queue_size": 2048,
                       "queue_adds": 32, "contrast_size": 512},
        },
        # ring8 with the component MLP (HW = 1, so IS_P2P is 0 and the memory term relates samples).
        "points": {
            "run": {"steps": 900, "batch_size": 512, "grad_clip": 1.0, "log_every": 100, "ckpt_every": 300,
                    "sample_every": 0},
            "method": {"start_steps": 8, "iters_per_halving": 300, "lr": 1e-3, "queue_size": 1024,
                       "queue_adds": 32, "contrast_size": 256},
        },
        # CIFAR-10 (cantbebetter2/RDD): 20k updates per stage, Adam 5e-5 cosine, batch 128 (4 × 32), clip 1;
        # memory 20 000 / 128 / 4096, τ_c 0.1, τ_kd 1, weights 1 and 0.1. (Needs a CIFAR DenseNet-201:
        # method.classifier=package.module:factory.)
        "official": {
            "run": {"batch_size": 128, "grad_clip": 1.0},
            "method": {"start_steps": 8, "iters_per_halving": 20_000, "lr": 5e-5, "lr_schedule": "cosine",
                       "tau": 0.9, "beta": 0.0, "is_weight": 1.0, "memory_weight": 0.1, "queue_size": 20_000,
                       "queue_adds": 128, "contrast_size": 4096, "contrast_tau": 0.1, "kd_tau": 1.0},
        },
    }

    def __init__(self, ctx, start_steps: int = 8, iters_per_halving: int = 20_000, student_steps: int = 1,
                 lr: float = 5e-5, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 lr_schedule: str = "cosine", weighting: str = "truncated_snr", grid: str = "karras",
                 rho: float = 7.0, final_stage_iters: int | None = None, tau: float = 0.9, beta: float = 0.0, gamma: float = 0.75,
                 feature_from_steps: int = 8, pd_weight: float = 0.0, classifier: str = "auto",
                 data_name: str | None = None, is_weight: float = 1.0, is_tau: float = 1.0,
                 memory_weight: float = 0.1, contrast_tau: float = 0.1, kd_tau: float = 1.0,
                 queue_size: int = 20_000, queue_adds: int = 128, contrast_size: int = 4096,
                 head_lr: float | None = None, rdd_compat_view_bug: bool = False):
        super().__init__(ctx, start_steps=start_steps, iters_per_halving=iters_per_halving,
                         student_steps=student_steps, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         lr_schedule=lr_schedule, weighting=weighting, grid=grid, rho=rho,
                         final_stage_iters=final_stage_iters, tau=tau, beta=beta,
                         gamma=gamma, feature_from_steps=feature_from_steps, pd_weight=pd_weight,
                         classifier=classifier, data_name=data_name)
        self.is_weight, self.is_tau = float(is_weight), float(is_tau)
        self.memory_weight, self.contrast_tau, self.kd_tau = float(memory_weight), float(contrast_tau), float(kd_tau)
        self.compat_view_bug = bool(rdd_compat_view_bug)
        self.queue_args = (int(queue_size), int(queue_adds), int(contrast_size))
        self.head_opt_kwargs = dict(lr=float(lr if head_lr is None else head_lr), betas=tuple(float(b) for b in betas),
                                    eps=float(eps))
        with torch.no_grad():
            probe = torch.zeros((2,) + self.shape, device=ctx.device)
            self.channels = classifier_outputs(self.classifier, probe)[0].shape[1]
        self.fresh_memory()

    def fresh_memory(self) -> None:
        """A new queue (random unit vectors, pointer 0), projection head and head optimizer — at the start and at
        every halving, as each official stage is a separate run. Seeded by one draw of the method's generator
        (rank 0's, broadcast; the global RNG is left alone), so all ranks agree and resuming reproduces them."""
        seed = shared_randint(2 ** 62, self.ctx.generator)
        self.bank = PixelMemoryBank(*self.queue_args[:1], self.channels, *self.queue_args[1:],
                                    generator=torch.Generator().manual_seed(seed), device=self.ctx.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.head = ProjectionHead(self.channels).to(self.ctx.device).train()
        self.nets["rdd_head"] = self.head
        # Its own Adam, stepped in after_step (not a trainer phase): no LR schedule, no clipping (official).
        self.optimizers["rdd_head"] = torch.optim.Adam(self.head.parameters(), **self.head_opt_kwargs)

    def advance_stage(self):
        super().advance_stage()
        self.fresh_memory()

    def relational_loss(self, map_student, map_teacher):
        self.head.zero_grad(set_to_none=True)
        self.bank.enqueue(gather_batch(map_teacher.detach()), self.ctx.generator, self.compat_view_bug)
        l_is = intra_sample_p2p_loss(map_student, map_teacher, self.is_tau)
        l_m = memory_p2p_loss(self.head(map_student), map_teacher, self.bank.contrast(), self.contrast_tau,
                              self.kd_tau)
        logs = {"rdd/is_p2p": float(l_is.detach()), "rdd/memory_p2p": float(l_m.detach()),
                "rdd/queue_ptr": float(self.bank.ptr)}
        return self.is_weight * l_is + self.memory_weight * l_m, logs

    def after_step(self, step, nimg):
        """Step the projection head from the gradients the trainer's backward pass left on it (unclipped)."""
        params = [p for p in self.head.parameters() if p.grad is not None]
        if not params:          # a plain-PD stage: the head was not used
            return
        dist.average_gradients(params)
        if all(bool(torch.isfinite(p.grad).all()) for p in params):
            self.optimizers["rdd_head"].step()
        else:
            print(f"[diffdistill] WARNING: non-finite gradient in the RDD projection head at step {step}; "
                  f"head step skipped", flush=True)
        self.head.zero_grad(set_to_none=True)

    def extra_state(self):
        return {**super().extra_state(), "memory_bank": self.bank.state_dict()}

    def load_extra_state(self, state):
        super().load_extra_state(state)
        if "memory_bank" in state:
            self.bank.load_state_dict(state["memory_bank"])
