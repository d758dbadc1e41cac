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

Official defaults (cantbebetter2/RDD; ``RDDOptions``): Q = 20 000, adds 128, M = 4096, τ_c = 0.1 (losses.py:82-83,97),
τ_kd = 1, weights 1.0 (IS) and 0.1 (M) (train_rdd.py:148,157), CFD τ 0.9 with DenseNet-201 (β = 0; train_rdd.sh:7),
Adam 5e-5 with a cosine LR, clip 1 on the student only (train_rdd.py:171,176,220), batch 128, a student without
dropout (config/CIFAR10_PD.txt:21), 20 000 updates for the 8 → 4 stage (train_rdd.sh:5); the projection head has its
own Adam (lr 5e-5, wd 0, no schedule, not clipped; train_rdd.py:173,223), SyncBN in the head (losses.py:91).

**The head's update.** Officially one backward of the total loss fills the gradients of the student and of the head
(train_rdd.py:219), then each optimizer steps. Here the head is a trainer phase (``rdd_head``, after ``student``), so
the trainer's NaN guard, gradient averaging and optimizer stepping cover it. The ``student`` phase computes the whole
official loss with the head's parameters held constant (the student's gradient flows *through* the head into its
map) and keeps the student's map, the teacher's map and the contrast set it used; the ``rdd_head`` phase evaluates
0.1·L_M on those same (detached) inputs with the head's parameters free. Only L_M depends on the head, and nothing
the head reads changes between the phases (the student step does not touch it), so the head's gradient is exactly
the official one; its BatchNorm running statistics are updated once per iteration (in the student phase) as
officially. One deviation: the trainer clips every phase at ``run.grad_clip`` (1 in the presets), so the head is
clipped at 1 too, where the official head is not; its gradient norm (logged as ``grad_norm_max/rdd_head``) stayed
below 1 in every step of the digits benchmark (max 0.82; benchmarks/notes/rdd.md), so the clip did not bind there. The head uses plain
BatchNorm; with several ranks the teacher maps are all-gathered for the queue and the head's gradients averaged by
the trainer. Each official stage is a separate run, so the queue, the head and its optimizer start afresh at every
halving here.

**Known bug of the official code (the enqueue reshape).** The official enqueue takes the B×C×H×W teacher map, whose
pixels it has L2-normalised (losses.py:160), and views it as C × (B·H·W) without moving the channels last
(losses.py:133), so each queued "pixel" mixes channels of different samples; it is right only at B = 1 (or C = 1).
This implementation queues true pixel vectors (channels last, then flatten); ``rdd_compat_view_bug=True`` reproduces
the official rows (normalise per pixel, view, pick, normalise again), for comparison with published numbers only.

Nothing is copied from the official code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..options import option
from ..train import distributed as dist
from .cfd import CFD, CFDOptions
from .pd import restate
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
        ``compat_view_bug``); returns K. The map is L2-normalised per pixel first (as officially, losses.py:160:
        it matters only for the official view, whose rows mix pixels) and every written row again (:144/:147)."""
        rows = pixel_rows(F.normalize(fmap.detach(), dim=1), compat_view_bug)
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


# ------------------------------------------------------------------------------------------------ options
RDD_CODE = "cantbebetter2/RDD"


@dataclass
class RDDOptions(CFDOptions):
    iters_per_halving: int = restate(CFDOptions, "iters_per_halving", 20_000, f"updates for the 8 → 4 stage "
                                     f"({RDD_CODE} train_rdd.sh:5 --total_steps 20000)")
    is_weight: float = option(1.0, f"weight of the cross-sample pixel-to-pixel KL ({RDD_CODE} train_rdd.py:157)",
                              ge=0)
    is_tau: float = option(1.0, f"its temperature ({RDD_CODE} train_rdd.py:157)", gt=0)
    memory_weight: float = option(0.1, f"weight of the memory-bank KL ({RDD_CODE} train_rdd.py:148 factor)", ge=0)
    contrast_tau: float = option(0.1, f"memory logits temperature τ_c ({RDD_CODE} losses.py:83)", gt=0)
    kd_tau: float = option(1.0, f"memory KL temperature τ_kd ({RDD_CODE} train_rdd.py:148)", gt=0)
    queue_size: int = option(20_000, f"pixel queue length Q ({RDD_CODE} losses.py:82)", ge=1)
    queue_adds: int = option(128, f"pixels enqueued per step ({RDD_CODE} losses.py:97)", ge=1)
    contrast_size: int = option(4096, f"fixed contrast subset M of the queue ({RDD_CODE} losses.py:82,106)", ge=1)
    head_lr: Optional[float] = option(None, f"the projection head's Adam lr; null = lr ({RDD_CODE} "
                                      f"train_rdd.py:173)", gt=0)
    rdd_compat_view_bug: bool = option(False, "queue the official enqueue's mixed-channel rows (losses.py:133) "
                                       "instead of true pixel vectors; for comparisons with published numbers")

    def validate(self) -> None:
        super().validate()
        if self.queue_adds > self.queue_size or self.contrast_size > self.queue_size:
            raise UserError(f"method.queue_adds and method.contrast_size must be <= method.queue_size, got "
                            f"queue_size={self.queue_size}, queue_adds={self.queue_adds}, "
                            f"contrast_size={self.contrast_size}")


# ------------------------------------------------------------------------------------------------ method
@register
class RDD(CFD):
    name = "rdd"
    summary = "RDD: CFD + cross-sample pixel-to-pixel relations and a pixel memory bank (Feng et al. 2024)"
    Options = RDDOptions
    accumulation_refusal_reason = (
        "its relational losses compare every pair of samples (and pixels) of the batch, its memory bank enqueues "
        "each step's batch once and its projection head's BatchNorm normalises over the batch, so micro-batches "
        "cannot sum to the batch's loss")
    fsdp_refusal_reason = ("it builds a new projection head and optimizer at every halving and calls the head "
                           "functionally on detached copies of its parameters, which FSDP2's sharded parameters "
                           "do not allow")

    def __init__(self, ctx, opts=None, **overrides):
        super().__init__(ctx, opts, **overrides)
        o = self.opts
        self.head_opt_kwargs = dict(lr=o.lr if o.head_lr is None else o.head_lr, betas=o.betas, eps=o.eps)
        with torch.no_grad():
            probe = torch.zeros((2,) + self.shape, device=ctx.device)
            self.channels = classifier_outputs(self.classifier, probe)[0].shape[1]
        self._head_inputs = None
        self.fresh_memory()

    def fresh_memory(self) -> None:
        """A new queue (random unit vectors, pointer 0), projection head and head optimizer — at the start and at
        every halving, as each official stage is a separate run. Seeded by one draw of the method's generator
        (rank 0's, broadcast; the global RNG is left alone), so all ranks agree and resuming reproduces them."""
        o = self.opts
        seed = shared_randint(2 ** 62, self.ctx.generator)
        self.bank = PixelMemoryBank(o.queue_size, self.channels, o.queue_adds, o.contrast_size,
                                    generator=torch.Generator().manual_seed(seed), device=self.ctx.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.head = ProjectionHead(self.channels).to(self.ctx.device).train()
        self.nets["rdd_head"] = self.head
        # Its own Adam (official: no LR schedule), stepped by the trainer in the ``rdd_head`` phase.
        self.optimizers["rdd_head"] = torch.optim.Adam(self.head.parameters(), **self.head_opt_kwargs)

    def advance_stage(self):
        super().advance_stage()
        self.fresh_memory()

    def phases(self, step):
        """``student``, then ``rdd_head`` in the stages that use the classifier losses."""
        return ["student", "rdd_head"] if self.feature_stage() else ["student"]

    def relational_loss(self, map_student, map_teacher):
        o = self.opts
        self.bank.enqueue(gather_batch(map_teacher.detach()), self.ctx.generator, o.rdd_compat_view_bug)
        contrast = self.bank.contrast()
        l_is = intra_sample_p2p_loss(map_student, map_teacher, o.is_tau)
        # The head with its parameters held constant: the student's gradient flows through it; the head's own
        # gradient comes from the ``rdd_head`` phase, on these same inputs.
        frozen = {k: v.detach() for k, v in self.head.named_parameters()}
        proj = torch.func.functional_call(self.head, frozen, (map_student,))
        l_m = memory_p2p_loss(proj, map_teacher, contrast, o.contrast_tau, o.kd_tau)
        self._head_inputs = (map_student.detach(), map_teacher.detach(), contrast)
        logs = {"rdd/is_p2p": float(l_is.detach()), "rdd/memory_p2p": float(l_m.detach()),
                "rdd/queue_ptr": float(self.bank.ptr)}
        return o.is_weight * l_is + o.memory_weight * l_m, logs

    def head_loss(self):
        """The ``rdd_head`` phase's loss: memory_weight·L_M on the student phase's maps and contrast set, the head's
        parameters free (the only term of the official loss that depends on them). BatchNorm statistics were
        updated by the student phase's forward and are left alone here."""
        if self._head_inputs is None:
            raise RuntimeError("the rdd_head phase runs after the student phase of the same iteration")
        map_s, map_t, contrast = self._head_inputs
        self._head_inputs = None
        o = self.opts
        # copies of the BatchNorm buffers: the statistics update of this forward is discarded (and the module's own
        # buffers, which the student phase's graph saved, are not modified in place)
        buffers = {k: v.clone() for k, v in self.head.named_buffers()}
        proj = torch.func.functional_call(self.head, buffers, (map_s,))
        l_m = memory_p2p_loss(proj, map_t, contrast, o.contrast_tau, o.kd_tau)
        return o.memory_weight * l_m, {}

    def loss(self, phase, batch, step):
        if phase == "rdd_head":
            return self.head_loss()
        return super().loss(phase, batch, step)

    def extra_state(self):
        return {**super().extra_state(), "memory_bank": self.bank.state_dict()}

    def load_extra_state(self, state):
        super().load_extra_state(state)
        if "memory_bank" in state:
            self.bank.load_state_dict(state["memory_bank"])
