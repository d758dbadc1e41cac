"""LoRA students through peft (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): the trained
copies of the teacher (DMD/DMD2/Diff-Instruct/SiD's generator and fake score, CD's student and its EMA copies)
become low-rank adapters W + (α/r)·B·A on the teacher's frozen weights, with B = 0 at the start, so a fresh adapter
is exactly the teacher.

The ``lora`` config section (``LoRAOptions``) turns it on (``--set lora.rank=8``). With ``lora.shared_base`` (the
default) there is ONE frozen base module — the teacher itself — carrying one named peft adapter per role; each role
is a ``LoRARole``, a small module that runs the shared base with its adapter active (peft's ``set_adapter``), and
the teacher is the role that runs it with the adapters disabled. Without it, every trained role is its own frozen
copy of the teacher with its adapter (the teacher stays a plain network). Either way a role's ``parameters()`` and
``state_dict()`` are its adapter's only (the teacher role's: the base's weights, under their plain keys), so the
optimizers train only adapters, checkpoints hold only adapters, and EMA copies are further adapters on the same base.
The adapter's state-dict keys are peft's (``get_peft_model_state_dict``: ``<module path>.lora_A.weight``).

Everything here that needs peft imports it on use: runs without LoRA never load it.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .errors import UserError
from .nets.lora_layers import custom_layers, supports_lora
from .nets.low_precision import _device_type, _to_fp32, stored_in_bf16
from .options import Options, nearest, option

# Layers that get adapters by default, per architecture: the convolution and linear layers of the residual and
# attention blocks (diffusers: the list DMD2's and diffusers' SDXL LoRA recipes target), every linear layer of the
# MLP denoiser. Names are peft's: a module path or its last components.
DEFAULT_TARGETS = {
    "songunet": ["conv0", "conv1", "affine", "skip", "qkv", "proj"],
    "dhariwalunet": ["conv0", "conv1", "affine", "skip", "qkv", "proj"],
    "mlp": ["inp", "map_label", "map_layer0", "map_layer1", "fc0", "fc1", "affine", "out"],
    "diffusers_unet2d": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                         "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv",
                         "time_emb_proj"],
    # text-to-image UNets and transformers: the UNet layers above, plus the joint-attention and feed-forward
    # projections of SD3 / FLUX / SANA / DiT / Wan blocks (those diffusers' SD3 and FLUX LoRA scripts target)
    "diffusers_cond": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                       "proj_in", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
                       "proj_mlp", "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv",
                       "time_emb_proj"],
}


@dataclass
class LoRAOptions(Options):
    """The ``lora`` section: LoRA adapters instead of full trainable copies of the teacher."""

    section = "lora"
    rank: Optional[int] = option(None, "LoRA rank r of every trained copy of the teacher (generator, fake score; "
                                       "CD's student); null: full copies (no LoRA)", ge=1)
    alpha: Optional[float] = option(None, "LoRA α: the update is (α/r)·B·A; null: α = r (scale 1)", gt=0)
    target_modules: Optional[list[str]] = option(None, "layers that get adapters, as peft matches them (a module "
                                                       "path or its last components); null: the architecture's "
                                                       "conv/linear layers of its residual and attention blocks "
                                                       "(mlp: every linear layer)")
    dropout: float = option(0.0, "dropout on the adapters' input (peft lora_dropout)", ge=0, lt=1)
    shared_base: bool = option(True, "one frozen base shared by the teacher and every adapter (one copy of the "
                                     "weights; each role switches its adapter on); false: each trained role is its "
                                     "own frozen copy of the teacher with its adapter")

    def enabled(self) -> bool:
        return self.rank is not None

    def validate(self):
        if self.rank is None:
            given = [k for k, v in self.to_dict().items() if k != "rank" and v != LoRAOptions.__dataclass_fields__[
                k].default]
            if given:
                raise UserError(f"lora.{given[0]} is set but lora.rank is not: give lora.rank=R (e.g. 8) to train "
                                f"LoRA adapters, or remove lora.{given[0]}")
        if self.target_modules is not None and not self.target_modules:
            raise UserError("lora.target_modules is empty: name at least one layer, or null for the architecture's "
                            "default layers")

    def scale_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)


def lora_options(section: dict | None) -> LoRAOptions:
    return LoRAOptions.from_dict(section, owner="lora")


# ------------------------------------------------------------------------------------------------ targets
def _matches(path: str, name: str) -> bool:
    return path == name or path.endswith("." + name)


def resolve_targets(base: nn.Module, arch: str | None, names: list[str] | None) -> list[str]:
    """The module paths (in ``base``) that get adapters: every module whose path matches one of ``names`` (peft's
    rule: the path itself or its last components) and that peft can adapt; ``names`` None: the architecture's
    defaults, where layers without a kernel (pure resampling) are skipped. Explicit names that match nothing, or
    only layers LoRA cannot adapt, are refused."""
    explicit = names is not None
    if not explicit:
        if arch not in DEFAULT_TARGETS:
            raise UserError(f"lora: no default layers for architecture {arch!r}: name them with "
                            f"lora.target_modules=[...] (module paths or their last components)")
        names = DEFAULT_TARGETS[arch]
    modules = [(p, m) for p, m in base.named_modules() if p]
    found = []
    for name in names:
        hits = [(p, m) for p, m in modules if _matches(p, name)]
        good = [p for p, m in hits if supports_lora(m)]
        if explicit and not hits:
            leaves = sorted({p.rsplit(".", 1)[-1] for p, m in modules if supports_lora(m)})
            raise UserError(f"lora.target_modules: no layer matches {name!r}{nearest(name, leaves)}; layers LoRA "
                            f"can adapt here: {', '.join(leaves[:12])}{' …' if len(leaves) > 12 else ''}")
        if explicit and not good:
            kinds = sorted({type(m).__name__ for _, m in hits})
            raise UserError(f"lora.target_modules: {name!r} matches only {', '.join(kinds)} layers, which LoRA "
                            f"cannot adapt (no weight, or fused resampling): name linear or convolution layers")
        found += [p for p in good if p not in found]
    if not found:
        raise UserError(f"lora: none of the layers {names} exists in this {arch} network: set "
                        f"lora.target_modules=[...]")
    return found


def _onto_meta(module: nn.Module) -> None:
    """Every parameter of ``module`` on the meta device: peft makes the second adapter of a meta base (a
    --dry-run memory plan) on the CPU."""
    for m in module.modules():
        for k, p in list(m._parameters.items()):
            if p is not None and not p.is_meta:
                m._parameters[k] = nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad)


def weights_fingerprint(state_dict: dict) -> str:
    """A short sha256 of a state dict (keys, dtypes, shapes, bytes): ties a LoRA adapter to the base it was trained
    on."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        t = state_dict[k].detach()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        if not t.is_meta:   # a meta-device memory plan (--dry-run) has shapes, no values
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def peft_config(rank: int, alpha: float, dropout: float, targets: list[str]):
    """The ``peft.LoraConfig`` of an adapter (B zero-initialised: peft's default ``init_lora_weights=True``), with
    this package's own layer classes registered for peft's dynamic dispatch."""
    from peft import LoraConfig
    cfg = LoraConfig(r=int(rank), lora_alpha=float(alpha), lora_dropout=float(dropout), target_modules=list(targets),
                     init_lora_weights=True, bias="none")
    cfg._register_custom_module(custom_layers())
    return cfg


# ------------------------------------------------------------------------------------------------ stack and roles
class LoRAStack:
    """One frozen base network (a Denoiser) with named peft adapters on its ``targets``, and the switch that runs it
    as one of them. Outside a role's forward the adapters are disabled, so calling the base directly runs the
    teacher."""

    def __init__(self, base: nn.Module, opts: LoRAOptions, targets: list[str], base_info: dict):
        self.base, self.opts, self.targets, self.base_info = base.requires_grad_(False), opts, list(targets), base_info
        self.adapters: list[str] = []
        self.layers: list[tuple[str, nn.Module]] = []
        self._adapter_params: list[nn.Parameter] = []
        self._state: Optional[str] = None      # the active adapter (None: disabled)
        self._mode: Optional[bool] = None      # the train/eval mode the stack last gave the base
        self._inside = 0                       # > 0 while a role runs the base
        self.base_role = LoRARole(self, None)
        base.register_forward_pre_hook(self._direct_call)

    # ---------------------------------------------------------------- adapters
    def add_adapter(self, name: str, copy_from: str | None = None) -> "LoRARole":
        """A new adapter ``name`` on every target layer (B = 0: the base's function; or ``copy_from``'s weights),
        trainable, and its role. Other adapters' ``requires_grad`` flags are kept (peft's injection resets them)."""
        from peft import inject_adapter_in_model
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} exists")
        flags = [(p, p.requires_grad) for p in self._adapter_params]
        o = self.opts
        with warnings.catch_warnings():   # peft warns that a second adapter joins the model: that is the design
            warnings.filterwarnings("ignore", message=".*peft_config.*multiple adapters")
            inject_adapter_in_model(peft_config(o.rank, o.scale_alpha(), o.dropout, self.targets), self.base,
                                    adapter_name=name)
        if any(p.is_meta for p in self.base.parameters()):
            _onto_meta(self.base)
        self.adapters.append(name)
        self._refresh()
        for _, layer in self.layers:   # the new adapter's layers join in the state the stack's are in
            layer.set_adapter(self._state or name)
            layer.enable_adapters(self._state is not None)
        for p, f in flags:
            p.requires_grad_(f)
        for _, p in self.adapter_parameters(name):
            p.requires_grad_(True)
        if copy_from is not None:
            with torch.no_grad():
                for (_, dst), (_, src) in zip(self.adapter_parameters(name), self.adapter_parameters(copy_from)):
                    dst.copy_(src)
        return LoRARole(self, name)

    def _refresh(self) -> None:
        from peft.tuners.lora import LoraLayer
        self.layers = [(p, m) for p, m in self.base.named_modules() if isinstance(m, LoraLayer)]
        self._adapter_params = [p for a in self.adapters for _, p in self.adapter_parameters(a)]

    def adapter_parameters(self, name: str) -> list[tuple[str, nn.Parameter]]:
        """[(peft key, parameter)] of adapter ``name``: ``<layer path>.lora_A.weight`` / ``.lora_B.weight``."""
        out = []
        for path, layer in self.layers:
            if name in layer.lora_A:
                out.append((f"{path}.lora_A.weight", layer.lora_A[name].weight))
                out.append((f"{path}.lora_B.weight", layer.lora_B[name].weight))
        return out

    def base_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """[(plain key, parameter)] of the frozen base: its own weights, under the keys they have without adapters."""
        skip = {id(p) for p in self._adapter_params}
        return [(_plain_key(k), p) for k, p in self.base.named_parameters() if id(p) not in skip]

    def base_state_dict(self) -> dict:
        """The base's state dict without adapters and under its plain keys (what the teacher's would be)."""
        ids = {id(p) for p in self._adapter_params}
        lora_keys = {k for k, p in self.base.named_parameters() if id(p) in ids}
        return OrderedDict((_plain_key(k), v) for k, v in self.base.state_dict().items() if k not in lora_keys)

    def base_in_bf16(self) -> bool:
        """Whether ``run.teacher_dtype=bf16`` stored the base in bf16 (through the teacher role); the adapter roles
        then run it under bf16 autocast too."""
        return stored_in_bf16(self.base_role)

    # ---------------------------------------------------------------- switching
    def _switch(self, adapter: Optional[str]) -> None:
        """peft's switch on every layer: ``set_adapter`` / ``enable_adapters``. It also makes the active adapter
        trainable and the others not, which must not override the methods' own flags: they are put back."""
        flags = [(p, p.requires_grad) for p in self._adapter_params]
        for _, layer in self.layers:
            if adapter is None:
                layer.enable_adapters(False)
            else:
                layer.set_adapter(adapter)
                if layer.disable_adapters:
                    layer.enable_adapters(True)
        for p, f in flags:
            p.requires_grad_(f)
        self._state = adapter

    def _set(self, adapter: Optional[str], training: Optional[bool]) -> None:
        # Only changes are applied (a switch walks every adapted layer): the base keeps the last role's adapter
        # and mode until another role, or a direct call, needs other ones.
        if adapter != self._state:
            self._switch(adapter)
        if training is not None and training != self._mode:
            self.base.train(training)
            self._mode = training

    def _direct_call(self, module, args) -> None:
        """A forward pre-hook on the base: called directly, not through a role, the base is the teacher (adapters
        disabled, in whatever mode it is)."""
        if not self._inside:
            self._set(None, None)

    @contextlib.contextmanager
    def use(self, adapter: Optional[str], training: bool):
        """Run the block with ``adapter`` active (None: adapters disabled, the teacher) and the base in train
        (``training``) or eval mode."""
        self._set(adapter, training)
        self._inside += 1
        try:
            yield
        finally:
            self._inside -= 1


def _plain_key(key: str) -> str:
    return key.replace(".base_layer.", ".")


class LoRARole(nn.Module):
    """One role on a ``LoRAStack``: the base run with adapter ``adapter`` active (None: the teacher, adapters
    disabled). A Denoiser: it answers the base's attributes (``sigma_min``, ``sample_shape``, ``output_gain`` …).

    ``parameters()`` / ``state_dict()`` / ``load_state_dict()`` cover the adapter only (the teacher role: the base's
    own weights); ``train()``/``eval()`` set the mode the base runs in for this role; ``copy.deepcopy`` makes a
    new adapter on the same base with this one's weights (so an EMA copy is one more adapter, not a copy of the
    base)."""

    def __init__(self, stack: LoRAStack, adapter: Optional[str]):
        super().__init__()
        self.net = stack.base
        self.stack = stack          # a plain attribute: the stack is no module
        self.adapter = adapter

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            net = self.__dict__.get("_modules", {}).get("net")
            if net is None or name.startswith("_"):
                raise
            return getattr(net, name)

    def forward(self, *args, **kwargs):
        with self.stack.use(self.adapter, self.training):
            if self.adapter is not None and self.stack.base_in_bf16():
                with torch.autocast(device_type=_device_type(self.net, args), dtype=torch.bfloat16):
                    return _to_fp32(self.net(*args, **kwargs))
            return self.net(*args, **kwargs)

    # ---------------------------------------------------------------- what the role owns
    def _own(self) -> list[tuple[str, nn.Parameter]]:
        if self.adapter is None:
            return self.stack.base_parameters()
        return self.stack.adapter_parameters(self.adapter)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        for k, p in self._own():
            yield (f"{prefix}.{k}" if prefix else k), p

    def named_buffers(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        if self.adapter is None:
            for k, b in self.net.named_buffers():
                yield (f"{prefix}.{_plain_key(k)}" if prefix else _plain_key(k)), b

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        out = OrderedDict() if destination is None else destination
        items = self.stack.base_state_dict().items() if self.adapter is None else self._own()
        for k, v in items:
            out[prefix + k] = v if keep_vars else v.detach()
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if self.adapter is None:
            raise RuntimeError("the teacher role's weights are the frozen base's: load them into the base network")
        own = dict(self._own())
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if strict and (missing or unexpected):
            raise RuntimeError(f"LoRA adapter {self.adapter!r}: missing keys {missing[:4]}, unexpected keys "
                               f"{unexpected[:4]} (an adapter of another rank or other layers?)")
        with torch.no_grad():
            for k, p in own.items():
                if k in state_dict:
                    if tuple(state_dict[k].shape) != tuple(p.shape):
                        raise RuntimeError(f"LoRA adapter {self.adapter!r}: {k} has shape {tuple(state_dict[k].shape)},"
                                           f" the adapter {tuple(p.shape)} (another lora.rank?)")
                    p.copy_(state_dict[k])
        return nn.modules.module._IncompatibleKeys(missing, unexpected)

    def train(self, mode: bool = True):
        self.training = bool(mode)   # the base takes this mode during this role's forward only
        return self

    def __deepcopy__(self, memo):
        if self.adapter is None:
            raise TypeError("the teacher role of a LoRA stack is not copied: make a new adapter with add_adapter")
        n = sum(a.startswith(f"{self.adapter}_copy") for a in self.stack.adapters)
        new = self.stack.add_adapter(f"{self.adapter}_copy{n}", copy_from=self.adapter)
        for (_, q), p in zip(new._own(), self.parameters()):
            q.requires_grad_(p.requires_grad)
        new.training = self.training
        memo[id(self)] = new
        return new

    # ---------------------------------------------------------------- records
    def lora_record(self) -> dict:
        """What a checkpoint stores beside this role's adapter so ``sample``/``export`` can rebuild the student:
        the LoRA settings, the adapted layers and the base teacher (path and weights fingerprint)."""
        o = self.stack.opts
        return {"format": "peft", "rank": o.rank, "alpha": o.scale_alpha(), "dropout": o.dropout,
                "target_modules": list(self.stack.targets), "shared_base": o.shared_base,
                "adapter": self.adapter, "base": dict(self.stack.base_info)}

    def extra_repr(self) -> str:
        return f"adapter={self.adapter!r}"


def is_lora_role(net) -> bool:
    return isinstance(net, LoRARole)


def lora_copies(teacher: nn.Module, names, opts: LoRAOptions, arch: str | None, teacher_path: str | None,
                device) -> tuple[nn.Module, list[LoRARole]]:
    """(teacher, [role per name]): trainable LoRA copies of the frozen ``teacher``. Shared base: the teacher becomes
    the base of every adapter and the returned teacher is the stack's teacher role; otherwise each role gets its
    own frozen copy of the teacher and the teacher is returned unchanged. Roles start in train mode (as
    ``trainable_copy``)."""
    teacher = teacher.eval().requires_grad_(False)
    targets = resolve_targets(teacher, arch, opts.target_modules)
    info = {"path": str(Path(teacher_path).resolve()) if teacher_path else None,
            "fingerprint": weights_fingerprint(teacher.state_dict())}
    roles = []
    if opts.shared_base:
        stack = LoRAStack(teacher, opts, targets, info)
        roles = [stack.add_adapter(n) for n in names]
        teacher = stack.base_role.eval()
    else:
        for n in names:
            stack = LoRAStack(copy.deepcopy(teacher).to(device), opts, targets, info)
            roles.append(stack.add_adapter(n))
    return teacher, [r.to(device).train() for r in roles]


def lora_summary(nets: dict) -> list[str]:
    """Lines for ``--dry-run`` from its table of networks (name → module): each LoRA stack's frozen base, held
    once, and the adapters on it with their parameter counts."""
    stacks: dict[int, tuple[LoRAStack, list[str], str]] = {}
    for name, net in nets.items():
        if isinstance(net, LoRARole):
            entry = stacks.setdefault(id(net.stack), (net.stack, [], ""))
            if net.adapter is None:
                stacks[id(net.stack)] = (entry[0], entry[1], name)
            else:
                entry[1].append(name)
    if not stacks:
        return []
    first = next(iter(stacks.values()))[0]
    o = first.opts
    lines = ["", f"LoRA: rank {o.rank}, α {o.scale_alpha():g}, dropout {o.dropout:g}, on {len(first.targets)} "
                 f"layers; " + ("one frozen base shared by the teacher and every adapter" if o.shared_base
                                else f"{len(stacks)} frozen copies of the teacher, one per trained role "
                                     f"(lora.shared_base=false), beside the teacher")]
    for stack, roles, base_name in stacks.values():
        base = sum(p.numel() for _, p in stack.base_parameters())
        adapters = ", ".join(f"{n} {sum(p.numel() for p in nets[n].parameters()):,d}" for n in roles)
        held = "held once for every role" if o.shared_base else "a copy of the teacher's"
        lines.append(f"  base{f' ({base_name})' if base_name else ''}: {base:,d} parameters, frozen, {held}; "
                     f"adapters (each role's trainable parameters): {adapters}")
    return lines


# ------------------------------------------------------------------------------------------------ files
def merged_network(net: nn.Module, rec: dict, adapter_state: dict) -> nn.Module:
    """``net`` (the base, plain) with the adapter ``adapter_state`` (peft keys) of a LoRA record ``rec``
    (``LoRARole.lora_record``) merged into its weights by peft's ``merge_and_unload``: a plain network computing the
    adapter's function."""
    from peft.tuners.lora import LoraLayer, LoraModel
    lm = LoraModel(net, peft_config(rec["rank"], rec["alpha"], rec["dropout"], rec["target_modules"]), "default")
    params = {}
    for path, layer in lm.model.named_modules():
        if isinstance(layer, LoraLayer):
            params[f"{path}.lora_A.weight"] = layer.lora_A["default"].weight
            params[f"{path}.lora_B.weight"] = layer.lora_B["default"].weight
    if set(params) != set(adapter_state):
        raise UserError("the LoRA adapter does not fit its base network (other layers or another architecture): "
                        "use the teacher it was trained on")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(adapter_state[k])
    return lm.merge_and_unload()


def load_adapter(net: nn.Module, folder, adapter_name: str = "default") -> nn.Module:
    """Put an adapter written by ``diffdistill export --format peft`` onto a plain ``net`` of the same architecture
    (peft's ``inject_adapter_in_model`` + ``set_peft_model_state_dict``, this package's layers registered); returns
    ``net`` with the adapter active."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    cfg = LoraConfig.from_pretrained(str(folder))
    cfg._register_custom_module(custom_layers())
    inject_adapter_in_model(cfg, net, adapter_name=adapter_name)
    result = set_peft_model_state_dict(net, load_file(str(Path(folder) / "adapter_model.safetensors")),
                                       adapter_name=adapter_name)
    if getattr(result, "unexpected_keys", None):
        raise UserError(f"{folder}: the adapter does not fit this network ({result.unexpected_keys[:3]} …)")
    return net
