"""peft LoRA layers for this package's own ``Linear`` and ``Conv2d`` (EDM's layer classes, which are not
``torch.nn.Linear`` / ``nn.Conv2d``), registered through peft's dynamic dispatch
(``LoraConfig._register_custom_module``); diffusers networks use peft's built-in layers.

- ``Linear`` (weight [out, in], ``in_features`` / ``out_features``) is served by peft's own ``lora.Linear`` as is.
- ``Conv2d`` gets ``Conv2dLoRA`` below: peft's conv layer builds its A/B factors with the base layer's own class and
  reads ``kernel_size``/``stride``/``padding``, which this ``Conv2d`` does not have. The factors follow peft's conv
  layout (A: ``nn.Conv2d(in, r, k, padding=k//2)``, B: ``nn.Conv2d(r, out, 1)``), so state-dict keys and shapes are
  those of a peft conv adapter, and ΔW = scale·B·A reshaped to [out, in, k, k] is what ``merge`` adds. An up/down
  sampling layer applies its FIR filter to x before its convolution; the adapter path reads that same resampled
  input, so ΔW merges exactly. Fused-resampling layers (NCSN++'s aux convs) are not supported.

peft is imported on first use (``custom_layers()``): runs without LoRA never load it.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn

from .songunet import Conv2d, Linear


def _conv2d_lora_class():
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import check_adapters_to_merge

    class Conv2dLoRA(nn.Module, LoraLayer):
        """LoRA on a ``songunet.Conv2d`` with a weight: y = conv(x) + scale·B(A(resample(dropout(x))))."""

        def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, lora_alpha: float = 1,
                     **kwargs) -> None:
            super().__init__()
            LoraLayer.__init__(self, base_layer)
            if not supports_lora(base_layer):
                raise ValueError("LoRA needs a Conv2d with a kernel and without fused resampling")
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

        def _get_in_out_features(self, module: nn.Module):
            return module.in_channels, module.out_channels

        def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config, **kwargs) -> None:
            if r <= 0:
                raise ValueError(f"LoRA rank must be positive, got {r}")
            k = self.get_base_layer().weight.shape[-1]
            self.r[adapter_name] = r
            self.lora_alpha[adapter_name] = lora_alpha
            self.lora_dropout[adapter_name] = (nn.Dropout(config.lora_dropout) if config.lora_dropout > 0
                                               else nn.Identity())
            self.lora_A[adapter_name] = nn.Conv2d(self.in_features, r, k, padding=k // 2, bias=False)
            self.lora_B[adapter_name] = nn.Conv2d(r, self.out_features, 1, bias=False)
            self.lora_bias[adapter_name] = False
            self.use_dora[adapter_name] = False
            self.use_rslora[adapter_name] = bool(config.use_rslora)
            self.scaling[adapter_name] = lora_alpha / (r ** 0.5 if config.use_rslora else r)
            if config.init_lora_weights:   # peft's: A as nn.Linear's default init, B = 0 (adds nothing yet)
                self.reset_lora_parameters(adapter_name, config.init_lora_weights)
            self._move_adapter_to_device_of_base_layer(adapter_name)
            self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

        def get_delta_weight(self, adapter: str) -> torch.Tensor:
            """scale·B·A as a [out, in, k, k] weight (what ``merge`` adds to the base layer's)."""
            A, B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
            w = self.get_base_layer().weight
            return (B.flatten(1) @ A.flatten(1)).reshape(w.shape) * self.scaling[adapter]

        def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
            for name in check_adapters_to_merge(self, adapter_names):
                if name not in self.lora_A:
                    continue
                w = self.get_base_layer().weight
                merged = w.data + self.get_delta_weight(name).to(w.dtype)
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs in the merged weights: adapter {name!r} is broken")
                w.data = merged
                self.merged_adapters.append(name)

        def unmerge(self) -> None:
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                if name in self.lora_A:
                    w = self.get_base_layer().weight
                    w.data -= self.get_delta_weight(name).to(w.dtype)

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            if self.disable_adapters:
                if self.merged:
                    self.unmerge()
                return self.base_layer(x, *args, **kwargs)
            result = self.base_layer(x, *args, **kwargs)
            if self.merged:
                return result
            base = self.get_base_layer()
            for name in self.active_adapters:
                if name not in self.lora_A:
                    continue
                A, B = self.lora_A[name], self.lora_B[name]
                h = base.resample_input(self._cast_input_dtype(self.lora_dropout[name](x), A.weight.dtype))
                result = result + (B(A(h)) * self.scaling[name]).to(result.dtype)
            return result

        def __repr__(self) -> str:
            return "lora." + super().__repr__()

    return Conv2dLoRA


@functools.cache
def custom_layers() -> dict:
    """What peft's dynamic dispatch wraps this package's layer classes with: ``Linear`` → peft's ``lora.Linear``,
    ``Conv2d`` → ``Conv2dLoRA``."""
    from peft.tuners import lora as peft_lora
    return {Linear: peft_lora.Linear, Conv2d: _conv2d_lora_class()}


def supports_lora(module: nn.Module) -> bool:
    """Whether peft (with ``custom_layers()``) can put an adapter on ``module``: nn.Linear / nn.Conv1d-3d /
    nn.Embedding, this package's Linear, and its Conv2d when it has a kernel and no fused resampling."""
    if isinstance(module, Conv2d):
        return module.weight is not None and not (module.fused_resample and module.resample_filter is not None)
    return isinstance(module, (Linear, nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding))
