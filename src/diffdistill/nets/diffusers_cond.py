"""diffusers text-to-image / latent DiT / video networks as σ-space Denoisers (the folders are read by
``io/diffusers.py``; the preconditioning is `DiffusersPrecond`, chosen from the folder's scheduler config).

Each adapter calls one diffusers class as the raw network F(c_in·x, c_noise, condition) of `DiffusersPrecond`,
with the inputs its own diffusers pipeline passes (diffusers 0.42 sources; the lines read are named):

======================== ================================================= =========================================
class                    timestep the pipeline passes (= our c_noise)      condition
======================== ================================================= =========================================
UNet2DConditionModel     the scheduler's DDPM timestep t (fractional here: ``encoder_hidden_states`` = embeds; SDXL
                         t(σ) by ln σ interpolation), input               (``addition_embed_type: text_time``):
                         ``scale_model_input`` = x/√(1+σ²)                 ``added_cond_kwargs`` text_embeds =
                         (pipeline_stable_diffusion.py:1039-1044,          pooled, time_ids = extra['time_ids']
                         pipeline_stable_diffusion_xl.py:1205-1214)        ([B, 6]; 5 for the refiner)
SD3Transformer2DModel    ``t.expand(B)`` of FlowMatchEuler's timesteps =   ``encoder_hidden_states`` = embeds,
                         1000·t (pipeline_stable_diffusion_3.py:1069-1077; ``pooled_projections`` = pooled
                         scheduling_flow_match_euler_discrete.py:376)
FluxTransformer2DModel   ``timestep / 1000`` = t (pipeline_flux.py:898,    embeds, pooled, ``guidance`` =
                         903); the model multiplies t and guidance by      extra['guidance'] [B] when the config
                         1000 itself (transformer_flux.py:725-727)         has guidance_embeds (pipeline_flux.py:
                                                                           847-849); 2×2-packed latents and
                                                                           img_ids/txt_ids as the pipeline builds
                                                                           them (pipeline_flux.py:387, 508-527)
SanaTransformer2DModel   ``t.expand(B) · config.timestep_scale``, t from   embeds, ``encoder_attention_mask`` =
                         the scheduler's 1000·t grid (pipeline_sana.py:    mask (required: the pipeline always
                         913-921; scheduling_dpmsolver_multistep.py:469)   passes it)
DiTTransformer2DModel,   the DDPM timestep (pipeline_dit.py:202-204)       one-hot labels → class index; the
Transformer2DModel (DiT)                                                   all-zero row → the null class
                                                                           ``num_embeds_ada_norm``, the row
                                                                           LabelEmbedding.token_drop uses;
                                                                           pipeline_dit.py:175 hardcodes it as
                                                                           ImageNet's 1000
WanTransformer3DModel    ``t.expand(B)`` = 1000·t (pipeline_wan.py:613)    embeds (umT5, padded by the pipeline)
======================== ================================================= =========================================

So for flow schedulers the network time is c_noise = ``time_scale``·t with t = σ/(1+σ) and time_scale =
num_train_timesteps (SD3, Wan), num_train_timesteps/1000 (FLUX: 1), num_train_timesteps·timestep_scale (SANA).
Learned-variance outputs (2C channels: DiT, PixArt-style SANA) keep their first C channels, as the pipelines do.
A diffusers flow grid's shift (static σ′ = s·σ, FLUX/SD3.5's dynamic shift σ′ = e^μ·σ) changes where a sampler
puts its steps, not the network: it is recorded in the schedule and the loader's ``source``, never applied here.

The bottleneck (``return_bottleneck`` / ``bottleneck_only``, DMD2's GAN head, SiDA's logits): for the UNet the
mid-block output [B, C′, h, w]; for transformers the image-token hidden states after block ``bottleneck_block``
(default the middle one of all blocks; FLUX counts its double-stream then its single-stream blocks) in layout
``bottleneck_layout``: ``grid`` (default) = [B, D, h, w] on the patch grid ([B, D, f, h, w] for Wan video), so
the image GAN head and SiDA's channel mean apply unchanged; ``tokens`` = [B, N, D]; ``pooled`` = [B, D] (token
mean). ``bottleneck_only`` stops the forward pass at that block.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..diffusion.condition import Condition, signature_fits
from ..errors import UserError
from .diffusers_unet import DiffusersPrecond, _require_diffusers

LAYOUTS = ("grid", "tokens", "pooled")


class _Stop(Exception):
    """Raised by the bottleneck hook to end a ``bottleneck_only`` forward pass at the hooked block."""


def _kwargs(config) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items() if not k.startswith("_")}


def _fmt(sig: dict) -> str:
    return "{" + ", ".join(f"{k}: [{', '.join('L' if d is None else str(d) for d in v)}]"
                           for k, v in sig.items()) + "}"


class CondAdapter(nn.Module):
    """Calls one diffusers network as F(x_in, c_noise, condition) (module docstring). Subclasses set the class
    names they take, the attribute that holds the network (``unet`` / ``transformer``: the state-dict prefix
    diffusers' own LoRA files use) and the few methods below."""

    classes: tuple = ()
    component = "transformer"

    def __init__(self, model: nn.Module, options: dict | None = None):
        super().__init__()
        setattr(self, self.component, model)
        self.cfg = _kwargs(model.config)
        opts = dict(options or {})
        unknown = sorted(set(opts) - set(self.option_names()))
        if unknown:
            raise UserError(f"net.adapter: unknown option(s) {', '.join(unknown)} for {type(model).__name__}; "
                            f"known: {', '.join(self.option_names())}")
        n = len(self.blocks())
        k = opts.get("bottleneck_block")
        k = n // 2 if k is None else k
        if not isinstance(k, int) or isinstance(k, bool) or not -n <= k < n:
            raise UserError(f"net.adapter.bottleneck_block must be a block index in [{-n}, {n - 1}] "
                            f"({type(model).__name__} has {n} blocks), got {opts.get('bottleneck_block')!r}")
        layout = opts.get("bottleneck_layout", "grid")
        if layout not in LAYOUTS:
            raise UserError(f"net.adapter.bottleneck_layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        self.bottleneck_block, self.bottleneck_layout = k % n, layout
        self.channels = self.latent_channels(self.cfg)

    @property
    def net(self) -> nn.Module:
        return getattr(self, self.component)

    # ---- what a subclass states -------------------------------------------------------------------------------
    @classmethod
    def check_config(cls, kw: dict, where) -> None:
        """Refuse config variants this adapter does not reproduce (before any weights are read)."""

    @classmethod
    def latent_channels(cls, kw: dict) -> int:
        return int(kw["in_channels"])

    @classmethod
    def out_ok(cls, kw: dict) -> bool:
        C, out = cls.latent_channels(kw), int(kw.get("out_channels") or kw["in_channels"])
        return out in (C, 2 * C)

    @classmethod
    def default_sample_shape(cls, kw: dict) -> tuple:
        size = kw.get("sample_size")
        if isinstance(size, (list, tuple)):
            h, w = (int(size[0]), int(size[-1]))
        elif size:
            h = w = int(size)
        else:
            raise UserError(f"the {cls.classes[0]} config has no sample_size: give the latent shape (sample_shape)")
        return (cls.latent_channels(kw), h, w)

    def option_names(self) -> tuple:
        return ("bottleneck_block", "bottleneck_layout")

    def options(self) -> dict:
        """The adapter options that rebuild it (``net_config['adapter']``)."""
        return {"bottleneck_block": self.bottleneck_block, "bottleneck_layout": self.bottleneck_layout}

    def signature(self) -> dict | None:
        """Per-sample field shapes of the Condition it takes (None: class-conditional / unconditional)."""
        return None

    @property
    def label_dim(self) -> int:
        return 0

    def flow_time_scale(self, num_train_timesteps: int) -> float:
        """c_noise = this · t for flow schedulers: what the pipeline passes as ``timestep`` over t."""
        return float(num_train_timesteps)

    def blocks(self) -> list:
        return list(self.net.transformer_blocks)

    def patch(self) -> tuple:
        p = int(self.cfg.get("patch_size") or 1)
        return (p, p)

    def check_sample_shape(self, shape: tuple, where) -> tuple:
        shape = tuple(int(s) for s in shape)
        want = len(self.patch()) + 1
        if len(shape) != want or shape[0] != self.channels or any(s <= 0 for s in shape):
            raise UserError(f"{where}: a {type(self.net).__name__} sample is ({self.channels}, "
                            f"{', '.join(['F', 'H', 'W'][-len(self.patch()):])}), got sample_shape {list(shape)}")
        bad = [s for s, p in zip(shape[1:], self.patch()) if s % p]
        if bad:
            raise UserError(f"{where}: sample_shape {list(shape)} must be divisible by the patch size "
                            f"{list(self.patch())}")
        return shape

    def call(self, x, t, cond) -> torch.Tensor:
        raise NotImplementedError

    # ---- the call ---------------------------------------------------------------------------------------------
    def check_condition(self, cond, batch: int) -> None:
        want = self.signature()
        if want is None:
            return
        if not isinstance(cond, Condition):
            raise UserError(f"this {type(self.net).__name__} is conditioned on text embeddings: pass a Condition "
                            f"with fields {_fmt(want)}")
        got = cond.signature
        if not signature_fits(want, got):
            raise UserError(f"the condition's fields {_fmt(got)} do not fit this {type(self.net).__name__}, whose "
                            f"config takes {_fmt(want)} (L: any prompt length): encode the prompts with the "
                            f"pipeline's own text encoder(s)")
        if len(cond) != batch:
            raise UserError(f"{len(cond)} conditions for a batch of {batch} samples")

    def features(self, o, x: torch.Tensor) -> torch.Tensor:
        """The hooked block's image tokens in ``bottleneck_layout``."""
        tokens = o[-1] if isinstance(o, tuple) else o
        grid = tuple(s // p for s, p in zip(x.shape[2:], self.patch()))
        if tokens.ndim != 3 or tokens.shape[1] != math.prod(grid):
            raise RuntimeError(f"unexpected bottleneck hidden states {tuple(tokens.shape)} for grid {grid}")
        if self.bottleneck_layout == "tokens":
            return tokens
        if self.bottleneck_layout == "pooled":
            return tokens.mean(1)
        return tokens.transpose(1, 2).reshape((tokens.shape[0], tokens.shape[2]) + grid)

    def bottleneck_module(self) -> nn.Module:
        return self.blocks()[self.bottleneck_block]

    def forward(self, x, c_noise, cond=None, return_bottleneck: bool = False, bottleneck_only: bool = False):
        self.check_condition(cond, x.shape[0])
        t = c_noise.to(x.dtype)
        if not (return_bottleneck or bottleneck_only):
            return self.call(x, t, cond)[:, :self.channels]
        box = []

        def hook(module, inputs, output):
            if not box:   # the first pass only (not a recomputation)
                box.append(output)
                if bottleneck_only:
                    raise _Stop
        handle = self.bottleneck_module().register_forward_hook(hook)
        try:
            out = self.call(x, t, cond)[:, :self.channels]
        except _Stop:
            out = None
        finally:
            handle.remove()
        feats = self.features(box[0], x)
        return feats if bottleneck_only else (out, feats)


# ------------------------------------------------------------------------------------------------ the classes
class UNetCondAdapter(CondAdapter):
    """``UNet2DConditionModel``: SD1.x/2.x (cross-attention on embeds) and SDXL (``addition_embed_type:
    text_time``: pooled text embeds + ``time_ids``, ``time_ids`` numbers per sample: 6 = original size, crop,
    target size; 5 for the refiner's aesthetic-score ids)."""

    classes = ("UNet2DConditionModel",)
    component = "unet"

    def __init__(self, model, options=None):
        opts = dict(options or {})
        time_ids = opts.pop("time_ids", 6)
        super().__init__(model, opts)
        if not isinstance(time_ids, int) or isinstance(time_ids, bool) or time_ids <= 0:
            raise UserError(f"net.adapter.time_ids must be a positive count (SDXL: 6, its refiner: 5), got "
                            f"{time_ids!r}")
        self.time_ids = time_ids
        self.sdxl = self.cfg.get("addition_embed_type") == "text_time"
        cad = self.cfg.get("cross_attention_dim")
        self.embed_dim = int(cad[0] if isinstance(cad, (list, tuple)) else cad)
        if self.sdxl:
            self.pooled_dim = int(self.cfg["projection_class_embeddings_input_dim"]) - \
                self.time_ids * int(self.cfg["addition_time_embed_dim"])
            if self.pooled_dim <= 0:
                raise UserError(f"UNet2DConditionModel: projection_class_embeddings_input_dim "
                                f"{self.cfg['projection_class_embeddings_input_dim']} leaves no pooled text embedding "
                                f"beside {self.time_ids} time ids of width {self.cfg['addition_time_embed_dim']}")

    @classmethod
    def check_config(cls, kw, where):
        refuse = {"time_cond_proj_dim": "an LCM-style guidance-embedding UNet (timestep_cond)",
                  "class_embed_type": "class embeddings (class_embed_type)",
                  "num_class_embeds": "class embeddings (num_class_embeds, e.g. the x4 upscaler's noise level)",
                  "encoder_hid_dim": "a projected text/image encoder input (encoder_hid_dim, Kandinsky / IF)"}
        for k, why in refuse.items():
            if kw.get(k) is not None:
                raise UserError(f"{where}: {why} is not supported (only SD1.x/2.x and SDXL text-to-image UNets)")
        if kw.get("addition_embed_type") not in (None, "text_time"):
            raise UserError(f"{where}: addition_embed_type {kw['addition_embed_type']!r} is not supported (SDXL's "
                            f"'text_time' only)")
        cad = kw.get("cross_attention_dim")
        if isinstance(cad, (list, tuple)) and len(set(cad)) != 1:
            raise UserError(f"{where}: per-block cross_attention_dim {cad} is not supported")
        if int(kw.get("in_channels", 4)) != int(kw.get("out_channels", 4)):
            raise UserError(f"{where}: in_channels {kw.get('in_channels')} ≠ out_channels {kw.get('out_channels')}: "
                            f"an inpainting / image-conditioned UNet (extra input channels) is not a text-to-image "
                            f"teacher")

    def option_names(self):
        return super().option_names() + ("time_ids",)

    def options(self):
        return {**super().options(), **({"time_ids": self.time_ids} if self.sdxl else {})}

    def signature(self):
        sig = {"embeds": (None, self.embed_dim)}
        if self.sdxl:
            sig.update({"pooled": (self.pooled_dim,), "extra.time_ids": (self.time_ids,)})
        return sig

    def blocks(self):
        return [self.unet.mid_block if self.unet.mid_block is not None else self.unet.down_blocks[-1]]

    def patch(self):
        return (1, 1)   # diffusers' UNet pads its up-sampling to any latent size

    def features(self, o, x):
        g = o[0] if isinstance(o, tuple) else o      # [B, C′, h, w]
        if self.bottleneck_layout == "tokens":
            return g.flatten(2).transpose(1, 2)
        return g.mean((2, 3)) if self.bottleneck_layout == "pooled" else g

    def call(self, x, t, cond):
        kw = {}
        if self.sdxl:
            kw["added_cond_kwargs"] = {"text_embeds": cond.pooled, "time_ids": cond.extra["time_ids"]}
        return self.unet(x, t, encoder_hidden_states=cond.embeds, **kw).sample


class SD3Adapter(CondAdapter):
    """``SD3Transformer2DModel`` (SD3 / SD3.5): joint attention on embeds, pooled projections."""

    classes = ("SD3Transformer2DModel",)

    def signature(self):
        return {"embeds": (None, int(self.cfg["joint_attention_dim"])),
                "pooled": (int(self.cfg["pooled_projection_dim"]),)}

    def check_sample_shape(self, shape, where):
        shape = super().check_sample_shape(shape, where)
        m, p = self.cfg.get("pos_embed_max_size"), self.patch()[0]
        if m and max(shape[1:]) // p > int(m):
            raise UserError(f"{where}: sample_shape {list(shape)} exceeds the SD3 position-embedding grid "
                            f"(pos_embed_max_size {m} patches of {p})")
        return shape

    def call(self, x, t, cond):
        return self.transformer(hidden_states=x, timestep=t, encoder_hidden_states=cond.embeds,
                                pooled_projections=cond.pooled).sample


class FluxAdapter(CondAdapter):
    """``FluxTransformer2DModel``: our sample is the unpacked latent (C, H, W) with C = in_channels/4; the call
    packs 2×2 patches into tokens of 4C and builds img_ids (0, row, col) / txt_ids (zeros) as FluxPipeline does."""

    classes = ("FluxTransformer2DModel",)

    @classmethod
    def check_config(cls, kw, where):
        if int(kw.get("in_channels", 64)) % 4 or int(kw.get("patch_size", 1)) != 1:
            raise UserError(f"{where}: a FLUX transformer takes 2×2-packed latents (in_channels divisible by 4, "
                            f"patch_size 1), got in_channels {kw.get('in_channels')}, patch_size "
                            f"{kw.get('patch_size')}")

    @classmethod
    def latent_channels(cls, kw):
        return int(kw.get("in_channels", 64)) // 4

    @classmethod
    def out_ok(cls, kw):
        return int(kw.get("out_channels") or kw.get("in_channels", 64)) == int(kw.get("in_channels", 64))

    @classmethod
    def default_sample_shape(cls, kw):
        return (cls.latent_channels(kw), 128, 128)   # FluxPipeline.default_sample_size: 1024 px / VAE 8

    def signature(self):
        sig = {"embeds": (None, int(self.cfg["joint_attention_dim"])),
               "pooled": (int(self.cfg["pooled_projection_dim"]),)}
        if self.cfg.get("guidance_embeds"):
            sig["extra.guidance"] = ()
        return sig

    def flow_time_scale(self, num_train_timesteps):
        return num_train_timesteps / 1000.0   # the pipeline passes scheduler timestep / 1000

    def blocks(self):
        return list(self.transformer.transformer_blocks) + list(self.transformer.single_transformer_blocks)

    def patch(self):
        return (2, 2)

    def call(self, x, t, cond):
        B, C, H, W = x.shape
        packed = x.reshape(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, H * W // 4, 4 * C)
        img_ids = torch.zeros(H // 2, W // 2, 3, device=x.device)
        img_ids[..., 1] += torch.arange(H // 2, device=x.device)[:, None]
        img_ids[..., 2] += torch.arange(W // 2, device=x.device)[None, :]
        txt_ids = torch.zeros(cond.embeds.shape[1], 3, device=x.device, dtype=x.dtype)
        out = self.transformer(hidden_states=packed, timestep=t, guidance=cond.extra.get("guidance"),
                               pooled_projections=cond.pooled, encoder_hidden_states=cond.embeds, txt_ids=txt_ids,
                               img_ids=img_ids.reshape(-1, 3).to(x.dtype)).sample
        return out.reshape(B, H // 2, W // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)


class SanaAdapter(CondAdapter):
    """``SanaTransformer2DModel``: cross-attention on embeds with the prompt's attention mask."""

    classes = ("SanaTransformer2DModel",)

    @classmethod
    def check_config(cls, kw, where):
        if kw.get("guidance_embeds"):
            raise UserError(f"{where}: a guidance-embedding SANA (SANA-Sprint, trained for the TrigFlow SCM "
                            f"scheduler) is not supported")

    def signature(self):
        return {"embeds": (None, int(self.cfg["caption_channels"])), "mask": (None,)}

    def flow_time_scale(self, num_train_timesteps):
        return float(num_train_timesteps) * float(self.cfg.get("timestep_scale", 1.0))

    def call(self, x, t, cond):
        return self.transformer(x, encoder_hidden_states=cond.embeds, encoder_attention_mask=cond.mask,
                                timestep=t).sample


class DiTAdapter(CondAdapter):
    """Class-conditional latent DiT (``DiTTransformer2DModel``, or ``Transformer2DModel`` in DiT's layout:
    patches + ``ada_norm_zero`` + ``num_embeds_ada_norm``): one-hot labels → class index; the all-zero row (our
    null class) → index ``num_embeds_ada_norm``, the extra row diffusers' LabelEmbedding holds for CFG."""

    classes = ("DiTTransformer2DModel", "Transformer2DModel")

    def __init__(self, model, options=None):
        super().__init__(model, options)
        self.num_classes = int(self.cfg["num_embeds_ada_norm"])
        tables = [m for m in model.modules() if type(m).__name__ == "LabelEmbedding"]
        self.has_null = all(m.embedding_table.num_embeddings > self.num_classes for m in tables)
        for m in tables:   # its train-mode label dropout would replace labels at random: distillation draws its own
            m.dropout_prob = 0.0

    @classmethod
    def check_config(cls, kw, where):
        if kw.get("norm_type", "ada_norm_zero") != "ada_norm_zero" or not kw.get("num_embeds_ada_norm") \
                or not kw.get("patch_size") or kw.get("cross_attention_dim") or kw.get("caption_channels"):
            raise UserError(f"{where}: only the class-conditional DiT layout of Transformer2DModel is supported "
                            f"(patch_size, norm_type ada_norm_zero, num_embeds_ada_norm; no cross-attention: "
                            f"PixArt is not supported yet)")

    @property
    def label_dim(self) -> int:
        return self.num_classes

    def call(self, x, t, labels):
        if labels is None:
            raise UserError("a DiT teacher is class-conditional: pass one-hot labels")
        idx = labels.argmax(dim=1)
        null = labels.abs().sum(dim=1) == 0
        if bool(null.any()) and not self.has_null:
            raise UserError("this DiT has no null-class embedding (it was built without class dropout): it cannot "
                            "be sampled with guidance or the all-zero null label")
        idx = torch.where(null, torch.full_like(idx, self.num_classes), idx)
        return self.transformer(x, timestep=t, class_labels=idx).sample


class WanAdapter(CondAdapter):
    """``WanTransformer3DModel`` (Wan 2.1 / 2.2 text-to-video): latents [B, C, F, H, W]; the σ-space code sees a
    sample shape (C, F, H, W) and nothing else changes."""

    classes = ("WanTransformer3DModel",)

    @classmethod
    def check_config(cls, kw, where):
        if kw.get("image_dim") or kw.get("added_kv_proj_dim"):
            raise UserError(f"{where}: an image-to-video Wan transformer (image_dim / added_kv_proj_dim) is not "
                            f"supported (text-to-video only)")

    @classmethod
    def default_sample_shape(cls, kw, temporal: int = 4, spatial: int = 8):
        # WanPipeline's defaults: 81 frames of 480×832 (pipeline_wan.py:341-347)
        return (cls.latent_channels(kw), (81 - 1) // temporal + 1, 480 // spatial, 832 // spatial)

    def signature(self):
        return {"embeds": (None, int(self.cfg["text_dim"]))}

    def blocks(self):
        return list(self.transformer.blocks)

    def patch(self):
        return tuple(int(p) for p in self.cfg.get("patch_size", (1, 2, 2)))

    def call(self, x, t, cond):
        return self.transformer(hidden_states=x, timestep=t, encoder_hidden_states=cond.embeds).sample


ADAPTERS = {name: a for a in (UNetCondAdapter, SD3Adapter, FluxAdapter, SanaAdapter, DiTAdapter, WanAdapter)
            for name in a.classes}
COND_CLASSES = tuple(ADAPTERS)


# ------------------------------------------------------------------------------------------------ building
def adapter_class(name: str, where=None):
    if name not in ADAPTERS:
        raise UserError(f"{where or 'net_config'}: {name or '?'} is not a supported diffusers network; supported: "
                        f"UNet2DModel, {', '.join(COND_CLASSES)}")
    return ADAPTERS[name]


def model_class(name: str):
    """The diffusers class (a clear error where the installed diffusers predates it)."""
    _require_diffusers()
    import diffusers
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise UserError(f"this diffusers ({diffusers.__version__}) has no {name}: pip install -U diffusers")
    return cls


def check_config(name: str, kw: dict, where) -> None:
    """Refuse an unsupported class or config variant (before the weights are read)."""
    a = adapter_class(name, where)
    a.check_config(kw, where)
    if not a.out_ok(kw):
        raise UserError(f"{where}: out_channels {kw.get('out_channels')} must equal the latent channels "
                        f"{a.latent_channels(kw)} (or twice them: learned variance)")


def wrap(model: nn.Module, name: str, schedule: dict, prediction_type: str, adapter: dict | None = None,
         sample_shape=None, sigma_data: float = 0.5, sigma_min=None, sigma_max=None,
         where="net_config") -> DiffusersPrecond:
    """The Denoiser around a diffusers network: adapter, preconditioning from the schedule, the Condition
    signature and the sample shape (default: from the config, see each adapter)."""
    a = adapter_class(name, where)(model, adapter)
    shape = a.check_sample_shape(sample_shape if sample_shape is not None else a.default_sample_shape(a.cfg), where)
    time_scale = a.flow_time_scale(int(schedule.get("num_train_timesteps", 1000))) \
        if schedule.get("family") == "flow" else None
    net = DiffusersPrecond(a, a.channels, shape[-2], a.label_dim, schedule=schedule, prediction_type=prediction_type,
                           sigma_data=sigma_data, sigma_min=sigma_min, sigma_max=sigma_max, time_scale=time_scale)
    net.embedding_signature = a.signature()
    if shape != (a.channels, shape[-2], shape[-2]):   # video, or a non-square latent
        net.fixed_sample_shape = shape
    return net


def net_config(net: DiffusersPrecond, name: str) -> dict:
    """``net_config`` (arch ``diffusers_cond``) that `build_cond_denoiser` rebuilds ``net`` from."""
    a = net.model
    return {"arch": "diffusers_cond", "class_name": name, "img_channels": a.channels,
            "img_resolution": net.img_resolution, "label_dim": net.label_dim, "sample_shape": list(net.sample_shape),
            # σ_d: EDM-family schedulers state it; the others do not, so a run measures it (None here)
            "sigma_data": net.sigma_data if net.schedule["family"] == "edm" else None,
            "sigma_min": net.sigma_min, "sigma_max": net.sigma_max, "kwargs": dict(a.cfg), "adapter": a.options(),
            "precond": "diffusers", "precond_kwargs": net.precond_config()}


def build_cond_denoiser(cfg: dict) -> DiffusersPrecond:
    """Rebuild from a ``net_config`` with ``arch: diffusers_cond`` (fresh weights; load the state dict after)."""
    name = cfg.get("class_name")
    kw = dict(cfg.get("kwargs") or {})
    check_config(name, kw, "net_config")
    try:
        model = model_class(name).from_config(kw)
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise UserError(f"cannot build the {name} from net_config kwargs: {type(e).__name__}: "
                        f"{str(e).splitlines()[0][:160] if str(e) else ''}") from None
    pk = dict(cfg.get("precond_kwargs") or {})
    return wrap(model, name, pk["schedule"], pk.get("prediction_type", "epsilon"), cfg.get("adapter"),
                cfg.get("sample_shape"), sigma_data=cfg.get("sigma_data") or 0.5, sigma_min=cfg.get("sigma_min"),
                sigma_max=cfg.get("sigma_max"))


def example_condition(net, batch: int, generator: torch.Generator | None = None, length: int = 4):
    """A random Condition (or one-hot labels, or None) that fits ``net``: for checks such as convert-teacher's
    reload comparison. Sequence axes of any length get ``length`` tokens; masks are all ones."""
    sig = getattr(net, "embedding_signature", None)
    if sig is None:
        return torch.eye(net.label_dim)[torch.arange(batch) % net.label_dim] if net.label_dim else None

    def draw(shape):
        return torch.randn((batch,) + tuple(length if d is None else d for d in shape), generator=generator)
    fields = {k: draw(v) for k, v in sig.items()}
    mask = torch.ones(batch, length) if "mask" in fields else None
    extra = {k[6:]: v for k, v in fields.items() if k.startswith("extra.")}
    return Condition(fields["embeds"], mask, fields.get("pooled"), extra)
