"""Command line: ``diffdistill train-teacher | sample | eval | demo`` (and ``distill`` as methods land).

Every command takes ``--config FILE`` plus flags and ``--set section.key=value`` overrides; the resolved config is
saved in the run directory. User mistakes print one line ``diffdistill: error: ...`` and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import UserError

EXIT_USER, EXIT_DIVERGED = 2, 3


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise UserError(f"{message} (see '{self.prog} --help')")


def _add_run_flags(p, steps_default_help="preset's"):
    p.add_argument("--config", help="YAML/JSON file with sections run/data/net/method")
    p.add_argument("--out", help="run directory (default: the preset's, under runs/)")
    p.add_argument("--steps", type=int, help=f"training iterations (default: the {steps_default_help})")
    p.add_argument("--batch-size", type=int, help="batch size per process")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu, cuda or cuda:N")
    p.add_argument("--resume", help="'auto' (newest checkpoint in the run directory) or a checkpoint path")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to log.jsonl)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config entry, e.g. --set method.lr=5e-4 --set run.ckpt_every=200")


def _run_flags(a) -> dict:
    run = {k: v for k, v in {"out": a.out, "steps": a.steps, "batch_size": a.batch_size, "seed": a.seed,
                             "device": a.device, "resume": a.resume}.items() if v is not None}
    if a.no_progress:
        run["progress"] = False
    return {"run": run}


def build_parser() -> argparse.ArgumentParser:
    from .config import PRESETS
    p = _Parser(prog="diffdistill", description="Distill diffusion teachers into one-step / few-step students.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    t = sub.add_parser("train-teacher", help="train a teacher denoiser with the EDM loss")
    t.add_argument("--preset", default="digits", choices=sorted(PRESETS), help="built-in recipe (default digits)")
    t.add_argument("--data", help="dataset: digits | ring8 | checkerboard | two_moons | a folder, .zip or .npz")
    _add_run_flags(t)

    s = sub.add_parser("sample", help="draw samples from a teacher or student checkpoint")
    s.add_argument("checkpoint")
    s.add_argument("--steps", type=int, help="sampler steps (teacher: Heun steps, NFE = 2N-1; default: checkpoint's)")
    s.add_argument("--sampler", choices=["heun", "euler", "ddim"], help="teacher sampler (default heun)")
    s.add_argument("--num-samples", type=int, default=64)
    s.add_argument("--seed", type=int, default=0, help="first seed; sample i uses seed+i")
    s.add_argument("--out", required=True, help="FILE.npz (arrays 'samples', 'labels') or a folder for PNGs")
    s.add_argument("--device", default="cpu")

    e = sub.add_parser("eval", help="measure a checkpoint: proxy-FID/KID (images), sliced W2/MMD (2-D), images/s")
    e.add_argument("checkpoint")
    e.add_argument("--steps", type=int, help="sampler steps (default: the checkpoint's)")
    e.add_argument("--sampler", choices=["heun", "euler", "ddim"])
    e.add_argument("--num-samples", type=int, default=2000)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", help="metrics JSON file (default: print only)")
    e.add_argument("--device", default="cpu")

    from .methods.registry import list_methods
    methods = list_methods(role="student")
    m = sub.add_parser("distill", help="distill a teacher checkpoint into a few-step student",
                       description="Methods:\n" + "\n".join(f"  {k:14s} {v}" for k, v in methods.items()),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("--method", required=True, choices=sorted(methods), metavar="NAME",
                   type=lambda name: name.replace("-", "_"),  # diff-instruct == diff_instruct
                   help="one of: " + ", ".join(sorted(methods)))
    m.add_argument("--teacher", required=True, help="teacher checkpoint (.pt written by train-teacher)")
    m.add_argument("--student-steps", "--steps", dest="student_steps", type=int,
                   help="sampling steps of the student (default: the method's, usually 1)")
    m.add_argument("--iters", type=int, help="training iterations (default: the method's preset)")
    m.add_argument("--start-steps", type=int, metavar="N",
                   help="step-halving methods (pd, cfd, rdd): the teacher's steps at the start, N -> N/2 -> ... -> "
                        "--steps (default: the preset's)")
    m.add_argument("--iters-per-halving", type=int, metavar="K",
                   help="step-halving methods: training iterations per halving (the run is K x log2(N/steps) "
                        "iterations unless --iters is given)")
    m.add_argument("--data", help="real data for methods that use it (default: the teacher's training data)")
    m.add_argument("--config", help="YAML/JSON file with sections run/data/method")
    m.add_argument("--out", help="run directory (default runs/<method>)")
    m.add_argument("--batch-size", type=int)
    m.add_argument("--seed", type=int)
    m.add_argument("--device")
    m.add_argument("--resume")
    m.add_argument("--no-progress", action="store_true")
    m.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")

    x = sub.add_parser("export", help="write a checkpoint's sampling weights as .safetensors with JSON metadata")
    x.add_argument("checkpoint")
    x.add_argument("out", help="OUT.safetensors")

    c = sub.add_parser("compare", help="run several methods on one teacher with the same seeds and budget; "
                                       "report.md + report.html")
    c.add_argument("--teacher", required=True, help="teacher checkpoint or exported .safetensors")
    c.add_argument("--methods", required=True, help="comma-separated, e.g. dmd2,sid,diff-instruct")
    c.add_argument("--iters", type=int, help="iterations per method (default: each method's preset)")
    c.add_argument("--budget-minutes", type=float, help="training wall-clock per method (evaluation excluded)")
    c.add_argument("--num-samples", type=int, default=2000, help="samples per table row")
    c.add_argument("--curve-points", type=int, default=8, help="evaluations along each training run")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", default="runs/compare")
    c.add_argument("--device", default="cpu")
    c.add_argument("--no-progress", action="store_true")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override applied to every method's run, e.g. --set run.batch_size=32")

    d = sub.add_parser("demo", help="the main job: digits teacher, evaluation and report.md (minutes on a CPU)")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--train-teacher", action="store_true", help="retrain the teacher even if a shipped one exists")
    d.add_argument("--teacher-steps", type=int, default=None, help="teacher training iterations (default: preset)")
    d.add_argument("--num-samples", type=int, default=2000, help="samples per evaluation")
    d.add_argument("--distill-iters", type=int, help="distillation iterations (default: the method's preset)")
    d.add_argument("--device", default="cpu")
    d.add_argument("--no-progress", action="store_true")
    return p


def cmd_train_teacher(a) -> int:
    from .config import resolve
    from .train.trainer import Trainer
    flags = _run_flags(a)
    if a.data:
        flags["data"] = _data_spec(a.data)
    cfg = resolve(a.preset, a.config, flags, a.set)
    trainer = Trainer(cfg)
    trainer.run()
    print(f"teacher checkpoint: {trainer.ckpt_dir}/ (newest ckpt-*.pt); samples: {trainer.out / 'samples'}")
    return 0


def cmd_distill(a) -> int:
    from .distill import distill
    flags = {"run": {k: v for k, v in {"out": a.out, "steps": a.iters, "batch_size": a.batch_size, "seed": a.seed,
                                       "device": a.device, "resume": a.resume}.items() if v is not None}}
    if a.no_progress:
        flags["run"]["progress"] = False
    if a.student_steps is not None:
        if a.student_steps <= 0:
            raise UserError(f"--steps (student steps) must be positive, got {a.student_steps}")
        flags["method"] = {"student_steps": a.student_steps}
    halving = {k: v for k, v in {"start_steps": a.start_steps, "iters_per_halving": a.iters_per_halving}.items()
               if v is not None}
    if halving:
        import inspect
        from .methods.registry import get_method, list_methods
        accepts = lambda name: "start_steps" in inspect.signature(get_method(name).__init__).parameters  # noqa: E731
        if not accepts(a.method):
            names = ", ".join(n for n in list_methods(role="student") if accepts(n))
            raise UserError(f"--start-steps/--iters-per-halving set a step-halving schedule; method {a.method!r} "
                            f"has none (methods with one: {names})")
        for k, v in halving.items():
            if v <= 0:
                raise UserError(f"--{k.replace('_', '-')} must be positive, got {v}")
        flags.setdefault("method", {}).update(halving)
    if a.data:
        flags["data"] = _data_spec(a.data)
    trainer = distill(a.method, a.teacher, flags=flags, config_file=a.config, overrides=a.set)
    print(f"student checkpoint: {trainer.ckpt_dir}/ (newest ckpt-*.pt)")
    return 0


def _data_spec(s: str) -> dict:
    from .config import PRESETS
    if s == "digits":
        return {"name": "digits", "split": "train"}
    if s in PRESETS and PRESETS[s]["data"].get("name") == s:
        return dict(PRESETS[s]["data"])
    return {"path": s}


def cmd_sample(a) -> int:
    import numpy as np
    from .eval.evaluate import load_for_sampling, sampling_spec_for
    from .eval.generate import generate
    from .eval.plots import image_grid
    if a.num_samples <= 0:
        raise UserError(f"--num-samples must be positive, got {a.num_samples}")
    net, state = load_for_sampling(a.checkpoint, a.device)
    spec = sampling_spec_for(state, a.steps, a.sampler)
    x, labels, info = generate(net, range(a.seed, a.seed + a.num_samples), spec, device=a.device)
    out = Path(a.out)
    if out.suffix == ".npz":
        out.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"samples": x.numpy().astype(np.float32)}
        if labels is not None:
            arrays["labels"] = labels.argmax(1).numpy()
        np.savez(out, **arrays)
    else:
        if x.ndim != 4:
            raise UserError("PNG output is for images; use --out FILE.npz for 2-D points")
        import matplotlib.pyplot as plt
        out.mkdir(parents=True, exist_ok=True)
        for i in range(x.shape[0]):
            g = image_grid(x[i:i + 1], nrow=1, pad=0)
            plt.imsave(out / f"{a.seed + i:06d}.png", g, cmap="gray" if g.ndim == 2 else None, vmin=0, vmax=255)
    print(f"wrote {a.num_samples} samples to {out} (NFE {info['nfe']}, {info['images_per_second']:.1f} samples/s)")
    return 0


def cmd_eval(a) -> int:
    from .eval.evaluate import evaluate_checkpoint
    if a.num_samples <= 1:
        raise UserError(f"--num-samples must be at least 2, got {a.num_samples}")
    metrics = evaluate_checkpoint(a.checkpoint, steps=a.steps, sampler=a.sampler, num_samples=a.num_samples,
                                  seed=a.seed, device=a.device)
    text = json.dumps(metrics, indent=2)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")
    print(text)
    return 0


def cmd_export(a) -> int:
    from .eval.evaluate import export_checkpoint
    if not a.out.endswith(".safetensors"):
        raise UserError(f"export writes safetensors: give an output path ending in .safetensors, not {a.out!r}")
    meta = export_checkpoint(a.checkpoint, a.out)
    print(f"wrote {a.out} ({meta['role']}, method {meta['method']}, step {meta['step']})")
    return 0


def cmd_compare(a) -> int:
    from .compare import compare
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    compare(a.teacher, methods, out=a.out, iters=a.iters, budget_minutes=a.budget_minutes, seed=a.seed,
            num_samples=a.num_samples, curve_points=a.curve_points, device=a.device, progress=not a.no_progress,
            overrides=a.set)
    return 0


def cmd_demo(a) -> int:
    from .demo import run_demo
    run_demo(out=a.out, retrain_teacher=a.train_teacher, teacher_steps=a.teacher_steps,
             num_samples=a.num_samples, device=a.device, progress=not a.no_progress,
             distill_iters=a.distill_iters)
    return 0


COMMANDS = {"train-teacher": cmd_train_teacher, "distill": cmd_distill, "sample": cmd_sample, "eval": cmd_eval, "export": cmd_export,
            "compare": cmd_compare, "demo": cmd_demo}


def main(argv=None) -> int:
    from .train.trainer import DivergenceError
    try:
        parser = build_parser()
        a = parser.parse_args(argv)
        if not a.command:
            parser.print_help()
            return EXIT_USER
        return COMMANDS[a.command](a)
    except UserError as e:
        print(f"diffdistill: error: {e}", file=sys.stderr)
        return EXIT_USER
    except DivergenceError as e:
        print(f"diffdistill: diverged: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        print("diffdistill: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
