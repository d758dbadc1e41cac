"""Crash-safe checkpoints: atomic writes, a sha256 manifest per checkpoint, and finding the newest valid one.

A checkpoint is one ``torch.save`` dict of tensors and plain Python values (loadable with ``weights_only=True``,
so opening one never runs code). Writing ``ckpt-00000100.pt``:

1. ``torch.save`` to a temp file in the same folder, fsync it, hash it (sha256);
2. write the manifest ``ckpt-00000100.pt.json`` (bytes, sha256, step, method) atomically (temp + fsync + rename);
3. rename the temp file onto ``ckpt-00000100.pt`` and fsync the folder.

So a checkpoint file that exists is complete and has a manifest; a kill at any point leaves at most a stale temp
file or an orphan manifest, both removed on the next save. A full disk (ENOSPC, or EDQUOT for a quota) during any of
the steps removes the temp file and raises a one-line UserError with the space needed and free. A checkpoint whose
bytes later change (a truncated copy, a bad disk) no longer matches its manifest: ``load_checkpoint`` refuses it and
``--resume auto`` skips it, loudly.
Exported weights for users go to safetensors (``export_safetensors``).

A sharded checkpoint (``run.fsdp``) is the same ``.pt`` file plus a folder ``ckpt-00000100.dcp`` of
``torch.distributed.checkpoint`` shards (every rank writes its own): the shards go to ``.ckpt-00000100.dcp.tmp``,
which is renamed once every rank has written, and only then are the manifest — which lists every shard file with
its bytes and sha256 — and the ``.pt`` file written as above. So a ``.pt`` file that exists has its complete shard
folder, ``verify_checkpoint`` checks the shards too, and a kill leaves at most a temp or orphan folder, removed on
the next save.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import UserError

FORMAT = "diffdistill-checkpoint-v1"
MANIFEST_FORMAT = "diffdistill-manifest-v1"
SHARD_KEY = "__sharded_tensor__"   # marks a placeholder for a tensor kept in the shard folder (train/sharding.py)


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _mib(n: int) -> str:
    """Bytes as MiB, or GiB from 1 GiB on."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _disk_full_reason(e: OSError, folder: Path) -> str:
    """'no space left on device (0.3 MiB free on that filesystem)' or the quota's wording."""
    try:
        free = _mib(shutil.disk_usage(folder).free)
    except OSError:
        free = "unknown"
    if e.errno == errno.EDQUOT:
        return f"disk quota exceeded ({free} free on that filesystem; your quota allows less)"
    return f"no space left on device ({free} free on that filesystem)"


def _atomic_write(path: Path, write_fn) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the user's usual permissions
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write(path: Path, write_fn) -> None:
    """Call ``write_fn(tmp_path)``, fsync the file, then ``os.replace`` it onto ``path``. A full disk is a one-line
    UserError (the temp file removed, ``path`` as it was)."""
    try:
        _atomic_write(path, write_fn)
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        raise UserError(f"{_disk_full_reason(e, Path(path).parent)} writing {path}; it was left as it was and the "
                        f"partial file removed: free space there, then run the command again") from None


def file_sha256(path, chunk: int = 1 << 22) -> tuple[str, int]:
    """(hex sha256, size in bytes) of a file, read in 4 MiB chunks."""
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            n += len(block)
    return h.hexdigest(), n


def manifest_path(path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".json")


def _tensor_bytes(obj, seen=None) -> int:
    """Bytes of the tensor storages in a nested state (each storage once): about what ``torch.save`` writes."""
    seen = set() if seen is None else seen
    if torch.is_tensor(obj):
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    return 0


def _disk_full_error(e: OSError, state: dict, path: Path) -> UserError:
    """The one line for a checkpoint write that ran out of space: what it needs, what is free, that the earlier
    checkpoints are intact (the write went to a temp file) and how to continue."""
    previous = [p for p in list_checkpoints(path.parent) if p != path]
    if previous:  # the same run's state: the previous checkpoint's size is the best estimate of this one's
        needed = f"about {_mib(previous[-1].stat().st_size)} (the size of {previous[-1].name})"
        kept = (f"the previous checkpoints are intact (newest: {previous[-1]}); free space there, then run the "
                f"same command plus --resume auto to continue from it")
    else:
        needed = f"at least {_mib(_tensor_bytes(state))} (its tensors)"
        kept = "there is no earlier checkpoint of this run: free space there, then run the command again"
    return UserError(f"{_disk_full_reason(e, path.parent)} writing checkpoint {path} at step {state.get('step')}: it "
                     f"needs {needed}; the partial file was removed and {kept}")


def sharded_dir(path) -> Path:
    """The folder of a checkpoint's DCP shards: ``ckpt-00000100.pt`` → ``ckpt-00000100.dcp``."""
    path = Path(path)
    return path.with_name(path.name[:-len(".pt")] + ".dcp" if path.name.endswith(".pt") else path.name + ".dcp")


def save_sharded(tensors: dict, path, rank: int) -> dict | None:
    """Write ``tensors`` (DTensors) with ``torch.distributed.checkpoint`` into a temp folder, then — rank 0, once
    every rank has written — hash every file and rename the folder to ``sharded_dir(path)``. A collective; returns
    the manifest's ``shards`` entry on rank 0 (None elsewhere), to be passed to ``save_checkpoint``."""
    import torch.distributed.checkpoint as dcp
    path = Path(path)
    final = sharded_dir(path)
    tmp = path.parent / f".{final.name}.tmp"
    try:
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(str(tmp), sync_files=True))
    except Exception as e:   # DCP re-raises a rank's failure on every rank, wrapped
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if "No space left" in str(e) or "Disk quota" in str(e):
            raise UserError(f"{_disk_full_reason(OSError(errno.ENOSPC, ''), path.parent)} writing the shards of "
                            f"checkpoint {path}: the partial folder was removed and the previous checkpoints are "
                            f"intact; free space there, then run the same command plus --resume auto") from None
        raise
    if rank != 0:
        return None
    files = {}
    for f in sorted(tmp.rglob("*")):
        if f.is_file():
            digest, size = file_sha256(f)
            files[str(f.relative_to(tmp))] = {"bytes": size, "sha256": digest}
    if final.exists():   # an older folder of the same step (a run restarted from an earlier checkpoint)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(path.parent)
    return {"dir": final.name, "files": files}


def _verify_shards(path: Path, shards: dict) -> tuple[bool, str]:
    folder = path.parent / str(shards.get("dir", ""))
    if not folder.is_dir():
        return False, f"its shard folder {folder.name} is missing"
    for name, want in (shards.get("files") or {}).items():
        f = folder / name
        if not f.is_file():
            return False, f"shard file {folder.name}/{name} is missing"
        size = f.stat().st_size
        if size != int(want["bytes"]):
            return False, f"shard file {folder.name}/{name} has {size} bytes but its manifest says {want['bytes']}"
        if file_sha256(f)[0] != want["sha256"]:
            return False, f"shard file {folder.name}/{name}: sha256 differs from its manifest"
    return True, ""


def save_checkpoint(state: dict, path: Path, shards: dict | None = None) -> None:
    """Write ``state`` to ``path`` with its manifest (see the module docstring for the order of the steps);
    ``shards``: what ``save_sharded`` returned, for a sharded checkpoint (the manifest lists its files)."""
    path = Path(path)
    state = dict(state, format=FORMAT)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        digest, size = file_sha256(tmp)
        manifest = {"format": MANIFEST_FORMAT, "file": path.name, "bytes": size, "sha256": digest,
                    "step": state.get("step"), "method": state.get("method"), "role": state.get("role"),
                    "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if shards is not None:
            manifest["shards"] = shards
        _atomic_write(manifest_path(path), lambda t: Path(t).write_text(json.dumps(manifest, indent=1) + "\n"))
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        if os.path.exists(tmp):  # before measuring what is free
            os.unlink(tmp)
        raise _disk_full_error(e, state, path) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def verify_checkpoint(path) -> tuple[bool | None, str]:
    """(ok, reason) for a checkpoint against its manifest: True = bytes and sha256 match, False = it does not
    (reason says how), None = there is no manifest to check against (a file copied alone, or written by an older
    version) — the caller then relies on the file loading at all."""
    path = Path(path)
    if not path.is_file():
        return False, "file missing"
    mp = manifest_path(path)
    if not mp.exists():
        return None, "no manifest"
    try:
        manifest = json.loads(mp.read_text())
        want_bytes, want_sha = int(manifest["bytes"]), str(manifest["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return False, f"its manifest {mp.name} is unreadable"
    size = path.stat().st_size
    if size != want_bytes:
        return False, f"{size} bytes but its manifest says {want_bytes} ({'truncated' if size < want_bytes else 'grown'})"
    if file_sha256(path)[0] != want_sha:
        return False, "sha256 differs from its manifest (the file was modified or damaged)"
    if manifest.get("shards"):
        ok, reason = _verify_shards(path, manifest["shards"])
        if not ok:
            return False, reason
        return True, f"sha256 of it and its {len(manifest['shards'].get('files') or {})} shard files match its manifest"
    return True, "sha256 matches its manifest"


def load_checkpoint(path, verify: bool = True) -> dict:
    """The checkpoint dict, after checking it against its manifest when it has one (``verify``). Every failure is
    a UserError naming the file and what to do."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path} (give the path of a .pt file written by diffdistill)")
    if path.is_dir():
        inside = list_checkpoints(path) or list_checkpoints(path / "checkpoints")
        example = inside[-1] if inside else path / "checkpoints" / "ckpt-00001000.pt"
        raise UserError(f"{path} is a folder, not a checkpoint: give a ckpt-*.pt file inside it ("
                        f"{'the newest: ' if inside else 'e.g. '}{example}), or --resume auto for the run in --out")
    if verify:
        ok, reason = verify_checkpoint(path)
        if ok is False:
            raise UserError(f"checkpoint {path} is corrupted: {reason}; use an earlier checkpoint of the run "
                            f"(--resume auto skips corrupt ones)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupted or foreign file
        raise UserError(f"cannot read checkpoint {path}: {type(e).__name__}; the file is corrupted or not a "
                        f"diffdistill checkpoint") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not a diffdistill checkpoint (missing format tag {FORMAT!r})")
    return state


_STEP_RE = re.compile(r"^ckpt-(\d+)\.pt$")
_TEMP_RE = re.compile(r"^\.ckpt-\d+\.pt(\.json)?\..*\.tmp$")
_MANIFEST_RE = re.compile(r"^ckpt-(\d+)\.pt\.json$")
_SHARDS_RE = re.compile(r"^ckpt-(\d+)\.dcp$")
_SHARDS_TEMP_RE = re.compile(r"^\.ckpt-\d+\.dcp\.tmp$")


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Checkpoints in ``ckpt_dir``, oldest first, by the step in their name."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _STEP_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def find_resume_checkpoint(ckpt_dir: Path):
    """For ``--resume auto``: (path, state, why, skipped) of the newest checkpoint that matches its manifest and
    loads; ``why`` says how it was checked and ``skipped`` lists the newer ones refused, with the reason for each.
    (None, None, '', []) when there is no checkpoint; a UserError when there are checkpoints but none is valid
    (starting over silently would throw the run away)."""
    skipped: list[tuple[Path, str]] = []
    for path in reversed(list_checkpoints(ckpt_dir)):
        ok, reason = verify_checkpoint(path)
        if ok is False:
            skipped.append((path, reason))
            continue
        try:
            state = load_checkpoint(path, verify=False)
        except UserError:
            skipped.append((path, "it does not load (truncated or not a diffdistill checkpoint)"))
            continue
        return path, state, (reason if ok else "no manifest to check, but it loads"), skipped
    if skipped:
        detail = "; ".join(f"{p.name}: {why}" for p, why in skipped[:3])
        raise UserError(f"no valid checkpoint in {ckpt_dir} ({len(skipped)} found, none usable — {detail}); "
                        f"delete them to start over, or use a new --out")
    return None, None, "", []


def checkpoint_path(ckpt_dir: Path, step: int) -> Path:
    return Path(ckpt_dir) / f"ckpt-{step:08d}.pt"


def remove_stale_files(ckpt_dir: Path) -> list[Path]:
    """Delete what a killed save leaves behind: temp files and manifests without a checkpoint, and shard folders
    that are temporary or have no checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    removed = []
    for p in ckpt_dir.iterdir():
        if p.is_dir():
            m = _SHARDS_RE.match(p.name)
            if _SHARDS_TEMP_RE.match(p.name) or (m and not (ckpt_dir / f"ckpt-{m.group(1)}.pt").exists()):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
            continue
        orphan = _MANIFEST_RE.match(p.name) and not p.with_name(p.name[:-len(".json")]).exists()
        if _TEMP_RE.match(p.name) or orphan:
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def prune_checkpoints(ckpt_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints (and their manifests); ``keep <= 0`` keeps all."""
    if keep <= 0:
        return
    for p in list_checkpoints(ckpt_dir)[:-keep]:
        p.unlink(missing_ok=True)
        manifest_path(p).unlink(missing_ok=True)
        shutil.rmtree(sharded_dir(p), ignore_errors=True)


def export_safetensors(state_dict: dict, path: Path, metadata: dict) -> None:
    """Weights as safetensors; metadata values are JSON-encoded (the header holds strings only)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    meta = {k: json.dumps(v) for k, v in metadata.items()}  # every value JSON, so readers json.loads all
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_consolidated(path, verify: bool = True) -> dict:
    """A checkpoint's whole state in one process, with full tensors: for a sharded checkpoint (``run.fsdp``) every
    placeholder of its ``.pt`` file is filled from its shard folder (no process group needed; every tensor is read
    into memory). An unsharded checkpoint is returned as ``load_checkpoint`` reads it."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    state = load_checkpoint(path, verify=verify)
    if not has_placeholders(state):
        return state
    with tempfile.TemporaryDirectory(prefix="diffdistill-consolidate-") as tmp:
        dcp_to_torch_save(sharded_dir(path), Path(tmp) / "full.pt")
        full = torch.load(Path(tmp) / "full.pt", map_location="cpu", weights_only=True)
    return fill_placeholders(state, lambda spec: full[spec[SHARD_KEY]])


def has_placeholders(state) -> bool:
    """Whether ``state`` holds a placeholder of a sharded tensor (a checkpoint written with run.fsdp)."""
    if isinstance(state, dict):
        return SHARD_KEY in state or any(has_placeholders(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return any(has_placeholders(v) for v in state)
    return False


def fill_placeholders(state, make):
    """``state`` with every placeholder ``{SHARD_KEY: key, shape, dtype, placements}`` replaced by ``make(it)``."""
    if isinstance(state, dict) and SHARD_KEY in state:
        return make(state)
    if isinstance(state, dict):
        return {k: fill_placeholders(v, make) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(fill_placeholders(v, make) for v in state)
    return state
