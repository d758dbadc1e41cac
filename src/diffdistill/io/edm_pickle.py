"""Read NVlabs/edm network snapshots (``network-snapshot-*.pkl``, ``edm-cifar10-32x32-cond-vp.pkl`` …) without EDM's
code and without running anything stored in the pickle.

How an EDM snapshot is laid out (facts from EDM's ``torch_utils/persistence.py`` and ``training/training_loop.py``):
the file is ``pickle.dump(dict(ema=…, loss_fn=…, augment_pipe=…, dataset_kwargs=…))``. Every network class is
decorated as *persistent*: its instances reduce to ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with
``meta = {type: 'class', version: 6, module_src: <the whole source file>, class_name, state}``, where ``state`` is the
module's ``__dict__`` (``_parameters``, ``_buffers``, ``_modules``, ``_init_args``, ``_init_kwargs``, …). EDM's own
loader *executes* ``module_src``; so does plain ``pickle.load``, together with anything else a tampered file names.

Here a restricted unpickler resolves only an allow-list of globals, each to an inert stand-in: persistent objects
become `PersistentRecord` (class name + state, ``module_src`` is kept only as a hash and never executed), torch
containers become `ModuleRecord`, tensors are rebuilt through torch's own ``weights_only`` loader. Any other global
(``os.system``, ``builtins.eval``, …) stops the load with a `UserError` before anything is called. The records are
then mapped onto this package's ``EDMPrecond``/``VPPrecond``/``VEPrecond`` around ``SongUNet``/``DhariwalUNet``,
built from the recorded constructor arguments, and the weights are loaded strictly (every key, every shape).
"""

from __future__ import annotations

import _compat_pickle
import collections
import hashlib
import inspect
import io
import math
import pickle
from pathlib import Path

import torch

from ..diffusion.precond import vp_sigma
from ..errors import UserError
from ..nets.dhariwalunet import DhariwalUNet
from ..nets.factory import build_denoiser
from ..nets.songunet import SongUNet
from .checkpoint import file_sha256 as digest_and_size

# ------------------------------------------------------------------------------------------- inert stand-ins
_SNAPSHOT_VERSION = 6  # torch_utils.persistence._version of every released EDM pickle


class PersistentRecord:
    """What ``_reconstruct_persistent_obj(meta)`` would have built, as data: the class name and the state dict."""

    def __init__(self, meta):
        if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("class_name"), str):
            raise _Refused("a torch_utils.persistence record without type='class' and a class_name")
        self.class_name = meta["class_name"]
        self.version = meta.get("version")
        src = meta.get("module_src")
        self.module_src_sha256 = hashlib.sha256(src.encode()).hexdigest() if isinstance(src, str) else None
        self.state = dict(meta.get("state") or {})

    def __repr__(self):
        return f"PersistentRecord({self.class_name})"


class ModuleRecord:
    """Stand-in for a ``torch.nn`` container (ModuleDict, ModuleList, Sequential): keeps its state dict only.
    (Built by the unpickler with ``cls.__new__``, so there is no ``__init__``.)"""

    class_name = "Module"
    state: dict = {}

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise _Refused(f"{self.class_name} state that is not a dict")
        self.state = dict(state)

    def __repr__(self):
        return f"ModuleRecord({self.class_name})"


def _container(name: str):
    return type(name, (ModuleRecord,), {"class_name": name})


class _EasyDict(dict):
    """Stand-in for ``dnnlib.util.EasyDict`` (a plain dict subclass)."""


class _Refused(Exception):
    pass


def _reconstructor(cls, base, state):
    """``copyreg._reconstructor`` (protocol < 2 object reconstruction), restricted to the stand-ins above."""
    if not (isinstance(cls, type) and issubclass(cls, (ModuleRecord, _EasyDict)) and base in (object, dict)):
        raise _Refused(f"copyreg._reconstructor of {cls!r}")
    obj = cls.__new__(cls)
    if state is not None:
        obj.__setstate__(state) if isinstance(obj, ModuleRecord) else obj.update(state)
    return obj


def _load_storage_bytes(b):
    """``torch.storage._load_from_bytes``: a storage serialised with torch.save; read with torch's weights-only
    unpickler (no code runs), onto the CPU."""
    if not isinstance(b, (bytes, bytearray)):
        raise _Refused("torch.storage._load_from_bytes without bytes")
    return torch.load(io.BytesIO(bytes(b)), map_location="cpu", weights_only=True)


def _is_storage(s) -> bool:
    return isinstance(s, (torch.TypedStorage, torch.UntypedStorage))


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not _is_storage(storage):
        raise _Refused("torch._utils._rebuild_tensor_v2 without a storage")
    return torch._utils._rebuild_tensor_v2(storage, int(storage_offset), tuple(size), tuple(stride), False,
                                           collections.OrderedDict())


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    if not isinstance(data, torch.Tensor):
        raise _Refused("torch._utils._rebuild_parameter without a tensor")
    return data.detach()  # a plain tensor is all the weight loader needs; hooks and Python state are dropped


class _TypeName(str):
    """A non-callable stand-in for ``torch.Tensor`` / ``torch.nn.Parameter`` (only ever an argument of
    ``_rebuild_from_type_v2``; handing out the real classes would let a stream call them)."""


_TENSOR_TYPES = (_TypeName("torch.Tensor"), _TypeName("torch.nn.Parameter"))


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in (_rebuild_tensor_v2, _rebuild_parameter) or new_type not in _TENSOR_TYPES:
        raise _Refused("torch._tensor._rebuild_from_type_v2 of something other than a tensor")
    return func(*args)


def _numpy_scalar(dtype, data=None):
    """``numpy.core.multiarray.scalar`` for plain numeric scalars only (EDM records e.g. skip_scale=np.sqrt(0.5))."""
    import numpy as np
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biufc" or not isinstance(data, (bytes, bytearray)):
        raise _Refused("numpy scalar of a non-numeric dtype")
    return np.frombuffer(bytes(data), dtype=dtype, count=1)[0].item()


def _codecs_encode(text, encoding="utf-8"):
    """``_codecs.encode``: how protocol ≤ 2 streams store bytes (latin-1 text); other codecs are refused."""
    if not isinstance(text, str) or encoding != "latin1":
        raise _Refused("_codecs.encode other than latin-1 text")
    return text.encode("latin1")


def _numpy_dtype(spec, align=False, copy=True):
    import numpy as np
    if not isinstance(spec, str) or len(spec) > 8:
        raise _Refused("numpy.dtype of a non-string spec")
    return np.dtype(spec)


def _allowed() -> dict:
    import torch._tensor
    import torch._utils
    import torch.storage
    allowed = {
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): PersistentRecord,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "object"): object,
        ("builtins", "dict"): dict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("copyreg", "_reconstructor"): _reconstructor,
        ("dnnlib.util", "EasyDict"): _EasyDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
        ("torch", "Tensor"): _TENSOR_TYPES[0],
        ("torch.nn.parameter", "Parameter"): _TENSOR_TYPES[1],
        ("torch.storage", "_load_from_bytes"): _load_storage_bytes,
        ("numpy", "dtype"): _numpy_dtype,
        ("_codecs", "encode"): _codecs_encode,
        ("numpy.core.multiarray", "scalar"): _numpy_scalar,
        ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    }
    for name in ("ModuleDict", "ModuleList", "Sequential"):
        allowed[("torch.nn.modules.container", name)] = _container(name)
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, f):
        super().__init__(f)
        self._allowed = _allowed()

    def find_class(self, module, name):
        # Python-2-era names in protocol < 3 streams (__builtin__.set, copy_reg._reconstructor), as pickle does
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise _Refused(f"global {module}.{name}") from None

    def persistent_load(self, pid):
        raise _Refused("a persistent id (this is not a plain pickle.dump snapshot)")


def read_edm_pickle(path) -> object:
    """Unpickle an EDM snapshot into plain containers, `PersistentRecord`s and tensors, refusing anything else.

    Raises `UserError` naming the refused global; nothing named in the file is called before that check."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"EDM snapshot not found: {p}")
    try:
        with open(p, "rb") as f:
            return _RestrictedUnpickler(f).load()
    except _Refused as e:
        raise UserError(f"{p}: refused to unpickle {e}; EDM snapshots reference only torch tensors and "
                        f"torch_utils.persistence records, so this file is not one (or was tampered with). "
                        f"Nothing in it was executed") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, RuntimeError) as e:
        raise UserError(f"{p}: not a readable EDM snapshot ({type(e).__name__}: {str(e)[:120]}); give a "
                        f"network-snapshot-*.pkl written by NVlabs/edm") from None


# ------------------------------------------------------------------------------------------- records → network
# EDM's constructor defaults (training/networks.py) for the keyword arguments a record may leave out.
_PRECOND_DEFAULTS = {
    "EDMPrecond": dict(sigma_min=0.0, sigma_max=math.inf, sigma_data=0.5, model_type="DhariwalUNet"),
    "VPPrecond": dict(beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5, model_type="SongUNet"),
    "VEPrecond": dict(sigma_min=0.02, sigma_max=100.0, model_type="SongUNet"),
}
_ARCH = {"SongUNet": "songunet", "DhariwalUNet": "dhariwalunet"}
SAMPLING_RANGE = (0.002, 80.0)  # EDM generate.py's default grid ends, clipped to each network's support


def _plain(v):
    """Recorded constructor values as JSON-friendly Python (tuples → lists, numpy scalars were already floats)."""
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return v


def _flat_tensors(rec, prefix: str = "", out=None) -> dict:
    """state_dict-style {dotted name: tensor} of a record tree (parameters, persistent buffers, submodules)."""
    out = {} if out is None else out
    state = rec.state
    skip = set(state.get("_non_persistent_buffers_set") or ())
    for group in ("_parameters", "_buffers"):
        for name, t in (state.get(group) or {}).items():
            if t is None or (group == "_buffers" and name in skip):
                continue
            if not isinstance(t, torch.Tensor):
                raise UserError(f"EDM snapshot entry {prefix}{name} is not a tensor")
            out[prefix + name] = t
    for name, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, (PersistentRecord, ModuleRecord)):
            raise UserError(f"EDM snapshot submodule {prefix}{name} is not a module record")
        _flat_tensors(child, f"{prefix}{name}.", out)
    return out


def edm_net_config(rec: PersistentRecord, dropout: float | None = None) -> dict:
    """This package's ``net_config`` for an EDM preconditioner record (constructor arguments → our names)."""
    cls = rec.class_name
    if cls == "iDDPMPrecond":
        raise UserError("iDDPMPrecond snapshots (EDM's ADM baseline, learned variance) are not supported; use an "
                        "EDMPrecond snapshot such as edm-imagenet-64x64-cond-adm.pkl")
    if cls not in _PRECOND_DEFAULTS:
        raise UserError(f"the snapshot's 'ema' network is a {cls}; expected EDMPrecond, VPPrecond or VEPrecond")
    if rec.state.get("_init_args"):
        raise UserError(f"{cls} record has positional constructor arguments; EDM records keyword arguments only")
    kw = dict(_PRECOND_DEFAULTS[cls])
    kw.update({str(k): _plain(v) for k, v in dict(rec.state.get("_init_kwargs") or {}).items()})
    try:
        R, C, L = int(kw.pop("img_resolution")), int(kw.pop("img_channels")), int(kw.pop("label_dim", 0))
    except KeyError as e:
        raise UserError(f"{cls} record lacks the constructor argument {e.args[0]}") from None
    kw.pop("use_fp16", None)  # fp16 execution is a runtime choice here; weights are fp32 in every EDM snapshot
    model_type = kw.pop("model_type")
    if model_type not in _ARCH:
        raise UserError(f"unknown EDM model_type {model_type!r}; supported: SongUNet, DhariwalUNet")
    lo, hi = SAMPLING_RANGE
    if cls == "EDMPrecond":
        precond, pk = "edm", {}
        sigma_data = float(kw.pop("sigma_data"))
        smin, smax = max(lo, float(kw.pop("sigma_min"))), min(hi, float(kw.pop("sigma_max")))
    elif cls == "VPPrecond":
        precond, sigma_data = "vp", 0.5
        pk = {k: kw.pop(k) for k in ("beta_d", "beta_min", "M", "epsilon_t")}
        smin = max(lo, float(vp_sigma(pk["epsilon_t"], pk["beta_d"], pk["beta_min"])))
        smax = min(hi, float(vp_sigma(1.0, pk["beta_d"], pk["beta_min"])))
    else:
        precond, pk, sigma_data = "ve", {}, 0.5
        smin, smax = max(lo, float(kw.pop("sigma_min"))), min(hi, float(kw.pop("sigma_max")))
    if dropout is not None:
        kw["dropout"] = float(dropout)
    arch = _ARCH[model_type]
    _check_model_kwargs(arch, kw)
    return {"arch": arch, "img_channels": C, "img_resolution": R, "label_dim": L, "sigma_data": sigma_data,
            "sigma_min": smin, "sigma_max": smax, "kwargs": kw, "precond": precond, "precond_kwargs": pk}


def _check_model_kwargs(arch: str, kw: dict) -> None:
    net_cls = SongUNet if arch == "songunet" else DhariwalUNet
    known = set(inspect.signature(net_cls.__init__).parameters) - {"self", "img_resolution", "in_channels",
                                                                   "out_channels", "label_dim"}
    unknown = sorted(set(kw) - known)
    if unknown:
        raise UserError(f"EDM {net_cls.__name__} record has constructor arguments this package does not know: "
                        f"{', '.join(unknown)}")


def load_edm_snapshot(path, key: str = "ema", dropout: float | None = None) -> dict:
    """A checkpoint-like dict (role 'teacher', ``net_config``, ``sample_net`` weights, ``sampling``, ``source``) from
    an EDM snapshot; the weights are already checked against the rebuilt network (strict keys and shapes)."""
    top = read_edm_pickle(path)
    if isinstance(top, PersistentRecord):  # a bare pickled network, not the snapshot dict
        top = {key: top}
    if not isinstance(top, dict) or key not in top:
        found = sorted(top) if isinstance(top, dict) else type(top).__name__
        raise UserError(f"{path}: no {key!r} entry in the snapshot (found {found}); EDM snapshots hold the network "
                        f"under 'ema'")
    rec = top[key]
    if not isinstance(rec, PersistentRecord):
        raise UserError(f"{path}: the {key!r} entry is not a persistent EDM network record")
    if rec.version != _SNAPSHOT_VERSION:
        raise UserError(f"{path}: torch_utils.persistence version {rec.version}, expected {_SNAPSHOT_VERSION}")
    cfg = edm_net_config(rec, dropout)
    tensors = _flat_tensors(rec)
    net = build_denoiser(cfg)
    load_state_dict_strict(net, tensors, str(path))
    sha = file_sha256(path)
    return {"format": "edm-pickle", "method": "edm", "role": "teacher", "step": 0, "net_config": cfg,
            "sample_net": {k: v.contiguous() for k, v in net.state_dict().items()},
            # a seed's class is drawn from its own RNG after the latent, as EDM's generate.py does (eval/generate.py)
            "sampling": {"sampler": "heun", "nfe": 35, "seed_labels": "edm"}, "config": {"data": {}},
            "teacher_path": None,
            "source": {"format": "NVlabs/edm pickle", "file": Path(path).name, "sha256": sha, "entry": key,
                       "class": rec.class_name, "model": rec.state.get("_modules", {}).get("model").class_name
                       if isinstance(rec.state.get("_modules", {}).get("model"), PersistentRecord) else None}}


def load_state_dict_strict(net: torch.nn.Module, tensors: dict, where: str) -> None:
    """Load ``tensors`` into ``net`` requiring the same key set and every shape equal; `UserError` otherwise."""
    own = net.state_dict()
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise UserError(f"{where}: weights do not match the rebuilt network: {len(missing)} missing "
                        f"({', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}), {len(unexpected)} unexpected "
                        f"({', '.join(unexpected[:3])}{' …' if len(unexpected) > 3 else ''})")
    bad = [(k, tuple(tensors[k].shape), tuple(v.shape)) for k, v in own.items() if tensors[k].shape != v.shape]
    if bad:
        k, got, want = bad[0]
        raise UserError(f"{where}: {len(bad)} weight(s) have the wrong shape, e.g. {k}: {got} in the file, {want} in "
                        f"the network built from its recorded arguments")
    net.load_state_dict({k: tensors[k].to(own[k].dtype) for k in own}, strict=True)


def file_sha256(path) -> str:
    return digest_and_size(path)[0]
