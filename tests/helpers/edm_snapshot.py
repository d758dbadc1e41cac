"""Write NVlabs/edm-layout network snapshots from this package's modules, without EDM's code.

An EDM snapshot is ``pickle.dump(dict(ema=net, loss_fn=…, augment_pipe=…, dataset_kwargs=…))`` where every network
class is a ``torch_utils.persistence`` persistent class: an instance pickles as
``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with ``meta = dict(type='class', version=6,
module_src=<source>, class_name=<name>, state=<the module's __dict__ incl. _init_args/_init_kwargs>)``; torch
containers (ModuleDict) and tensors pickle the ordinary way. `write_edm_snapshot` reproduces that byte layout with a
stub ``torch_utils.persistence`` module registered only while pickling; the stub raises if it is ever called, and
``module_src`` is a snippet that would write a file if anyone executed it.
"""

from __future__ import annotations

import io
import pickle
import sys
import types
from contextlib import contextmanager

from torch import nn

from diffdistill.diffusion.precond import EDMPrecond, VEPrecond, VPPrecond
from diffdistill.nets.dhariwalunet import DhariwalUNet
from diffdistill.nets import songunet as S

# our class -> EDM persistent class name
EDM_CLASS_NAMES = {EDMPrecond: "EDMPrecond", VPPrecond: "VPPrecond", VEPrecond: "VEPrecond",
                   S.SongUNet: "SongUNet", DhariwalUNet: "DhariwalUNet", S.UNetBlock: "UNetBlock", S.Conv2d: "Conv2d",
                   S.Linear: "Linear", S.GroupNorm: "GroupNorm", S.PositionalEmbedding: "PositionalEmbedding",
                   S.FourierEmbedding: "FourierEmbedding"}


def _stub_reconstruct(meta):  # pragma: no cover - must never run
    raise AssertionError("the stub torch_utils.persistence._reconstruct_persistent_obj was called")


_stub_reconstruct.__module__ = "torch_utils.persistence"
_stub_reconstruct.__name__ = _stub_reconstruct.__qualname__ = "_reconstruct_persistent_obj"


@contextmanager
def stub_persistence_module():
    """Register ``torch_utils`` / ``torch_utils.persistence`` (stubs) in sys.modules while pickling."""
    pkg, mod = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")
    mod._reconstruct_persistent_obj = _stub_reconstruct
    pkg.persistence = mod
    saved = {k: sys.modules.get(k) for k in ("torch_utils", "torch_utils.persistence")}
    sys.modules.update({"torch_utils": pkg, "torch_utils.persistence": mod})
    try:
        yield mod
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


class _EDMPickler(pickle.Pickler):
    def __init__(self, f, module_src: str, init_kwargs: dict, top: nn.Module, protocol: int):
        super().__init__(f, protocol=protocol)
        self.module_src, self.init_kwargs, self.top = module_src, init_kwargs, top

    def reducer_override(self, obj):
        name = EDM_CLASS_NAMES.get(type(obj))
        if name is None:
            return NotImplemented
        state = dict(obj.__dict__)
        state["_init_args"] = ()
        state["_init_kwargs"] = dict(self.init_kwargs) if obj is self.top else {}
        meta = dict(type="class", version=6, module_src=self.module_src, class_name=name, state=state)
        return _stub_reconstruct, (meta,), None


def edm_snapshot_bytes(net: nn.Module, init_kwargs: dict, extra: dict | None = None, protocol: int = 4,
                       module_src: str = "raise SystemExit('EDM source must never be executed')\n") -> bytes:
    """Bytes of ``pickle.dump(dict(ema=net, loss_fn=None, augment_pipe=None, dataset_kwargs={...}, **extra))``
    in EDM's persistent-record layout; ``init_kwargs`` is what EDM records for the preconditioner's constructor."""
    data = dict(ema=net, loss_fn=None, augment_pipe=None,
                dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path="x.zip"))
    data.update(extra or {})
    buf = io.BytesIO()
    with stub_persistence_module():
        _EDMPickler(buf, module_src, init_kwargs, net, protocol).dump(data)
    return buf.getvalue()
