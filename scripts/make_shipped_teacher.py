"""Produce a digits teacher that ships with the package (src/diffdistill/assets/teacher_<preset>.safetensors):
the unconditional ``digits`` teacher, or the class-conditional ``digits_cond`` one (label dropout, CFG-able).

It is trained by the project's own preset (``diffdistill train-teacher --preset PRESET``), measured in the demo's
feature space (a conditional teacher also for conditional correctness), and exported with that recipe and those
numbers in its metadata. tests/test_shipped_teacher.py checks each file against its preset (and, under ``-m slow``,
retrains the preset and compares the quality reached).

    python scripts/make_shipped_teacher.py [--preset digits|digits_cond] [--workdir runs/shipped-PRESET]
"""

import argparse
import json
from pathlib import Path

from diffdistill.config import resolve
from diffdistill.eval.evaluate import digits_floor_and_ceiling, evaluate_net
from diffdistill.io import export_checkpoint
from diffdistill.io.checkpoint import list_checkpoints
from diffdistill.train.trainer import Trainer

ASSETS = Path(__file__).resolve().parent.parent / "src" / "diffdistill" / "assets"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="digits", choices=("digits", "digits_cond"))
    ap.add_argument("--workdir", default=None, help="run folder (default runs/shipped-PRESET)")
    ap.add_argument("--out", default=None, help="default src/diffdistill/assets/teacher_PRESET.safetensors")
    a = ap.parse_args()
    a.workdir = a.workdir or f"runs/shipped-{a.preset}"
    a.out = a.out or str(ASSETS / f"teacher_{a.preset}.safetensors")
    cfg = resolve(a.preset, flags={"run": {"out": a.workdir, "resume": "auto"}})
    tr = Trainer(cfg)
    tr.run()
    seconds, prev = 0.0, 0  # training time from the run's own log (also right when the run was resumed)
    for line in (Path(a.workdir) / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        seconds, prev = seconds + rec["sec_per_step"] * (rec["step"] - prev), rec["step"]
    m = evaluate_net(tr.method.sampling_net(), {"sampler": "heun", "nfe": 35}, cfg["data"], 2000, seed=0)
    ref = digits_floor_and_ceiling()
    measured = {"proxy_fid_35nfe": m["proxy_fid"], "kid_35nfe": m["kid"],
                "proxy_fid_n297_35nfe": m["proxy_fid_n297"], "num_samples": 2000, "seed": 0,
                "floor_proxy_fid": ref["floor_proxy_fid"]}
    if "class_accuracy" in m:   # a class-conditional teacher: conditional correctness, unguided
        measured["class_accuracy_35nfe"] = m["class_accuracy"]
    meta = {"preset": a.preset, "train_seconds": round(seconds, 1), "measured": measured}
    export_checkpoint(list_checkpoints(tr.ckpt_dir)[-1], a.out, meta)
    print(json.dumps(meta, indent=2))
    print(f"wrote {a.out} ({Path(a.out).stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
