"""Setting a network's dropout rates after it is built (e.g. a student copied from a teacher trained with dropout)."""

from __future__ import annotations

from torch import nn


def _is_rate(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def set_dropout(net: nn.Module, p: float) -> nn.Module:
    """Set every dropout rate of ``net`` to ``p`` in place: ``nn.Dropout`` modules and the float ``dropout``
    attribute of this project's U-Net blocks (SongUNet / DhariwalUNet), plus class-label dropout when ``p`` is 0.
    Returns ``net``."""
    for m in net.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = float(p)
        elif _is_rate(getattr(m, "dropout", None)):
            m.dropout = float(p)
        if p == 0 and _is_rate(getattr(m, "label_dropout", None)):
            m.label_dropout = 0
    return net


def dropout_rates(net: nn.Module) -> list[float]:
    """Every dropout rate in ``net`` (modules and U-Net block attributes), in module order."""
    out = []
    for m in net.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            out.append(float(m.p))
        elif _is_rate(getattr(m, "dropout", None)):
            out.append(float(m.dropout))
    return out
