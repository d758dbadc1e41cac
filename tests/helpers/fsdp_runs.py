"""Small training runs for the FSDP2 tests (tests/test_fsdp.py), in-process or under torchrun.

A case is a dict ``{"out": DIR, "method": NAME, "opts": {...}, "run": {...}}`` trained with the Trainer API on a
random tiny MLP teacher (helpers.dm_helpers) and ring8 data; rank 0 then writes ``DIR/final.pt`` — the method's
whole state consolidated to full tensors (nets, optimizer moments, EMA copies), the layout of an unsharded run's —
and every rank ``DIR/local-RANK.json`` (how many parameter elements of each network it holds).

As a script (``python -m torch.distributed.run --nproc_per_node=2 fsdp_runs.py CASES.json``) it trains every case
of the JSON list in one launch, so the torchrun start-up is paid once.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RUN = {"steps": 3, "batch_size": 8, "log_every": 1, "ckpt_every": 2, "sample_every": 0, "progress": False,
       "seed": 0}


def train(case: dict):
    """Train one case in float64 (round-off small enough that the comparisons of sharded and single-process runs
    measure the computation, not the CPU's float32 reduction order: Adam turns round-off in near-zero gradients
    into whole-step differences, 3.6e-4 of a tensor's scale in float32 on one machine, 1e-6 on another); returns
    the Trainer (its process group, if it made one, is left to the caller)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return _train(case)
    finally:
        torch.set_default_dtype(previous)


def _train(case: dict):
    sys.path.insert(0, str(HERE.parent))
    from helpers.dm_helpers import MLP_CFG, tiny_teacher

    from diffdistill.config import validate_run
    from diffdistill.data import dataset_from_config
    from diffdistill.train import distributed as dist
    from diffdistill.train.sharding import consolidated
    from diffdistill.train.trainer import Trainer
    teacher, cfg = tiny_teacher(MLP_CFG)
    run = validate_run({"out": case["out"], **RUN, **case.get("run", {})})
    full = {"run": run, "data": {"name": "ring8", "n": 256, "seed": 0}, "net": cfg,
            "method": {"name": case["method"], **case.get("opts", {})}}
    if "lora" in case:
        full["lora"] = case["lora"]
    tr = Trainer(full, teacher=teacher, teacher_path="mem", dataset=dataset_from_config(full["data"]))
    tr.start_check = lambda *a, **kw: None   # the sampling health check: not what these tests are about
    tr.run()
    state = consolidated(tr.method.state_dict())   # a collective under FSDP
    local = {k: sum((p.to_local() if dist.is_sharded(p) else p).numel() for p in net.parameters())
             for k, net in tr.method.nets.items()}
    Path(case["out"], f"local-{dist.rank()}.json").write_text(json.dumps(local))
    if dist.rank() == 0:
        torch.save(state, Path(case["out"]) / "final.pt")
    return tr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], timeout: float = 300, nproc: int = 2) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node=N ARGS`` with this checkout's sources on the path."""
    src = str(HERE.parent.parent / "src")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                           f"--master_port={free_port()}", *args], check=False, capture_output=True, text=True, env=env,
                          timeout=timeout)


def launch(cases: list[dict], root: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    spec = Path(root) / "cases.json"
    spec.write_text(json.dumps(cases))
    return torchrun([str(Path(__file__).resolve()), str(spec)], timeout)


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.path.insert(0, str(HERE.parent.parent / "src"))
    from diffdistill.train import distributed as _dist
    for c in json.loads(Path(sys.argv[1]).read_text()):
        train(c)
    _dist.destroy()
