"""Command line: ``diffdistill train-teacher | sample | eval | demo`` (and ``distill`` as methods land).

Every command takes ``--config FILE`` plus flags and ``--set section.key=value`` overrides; the resolved config is
saved in the run directory. User mistakes print one line ``diffdistill: error: ...`` and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from . import __version__
from .compare import compare
from .config import TEACHER_PRESETS, RunOptions, check_device, list_presets, load_preset, preset_path, resolve
from .demo import run_demo
from .diffusion.samplers import CHURN_DEFAULTS, TEACHER_SAMPLERS
from .distill import distill
from .errors import UserError
from .eval.evaluate import evaluate_checkpoint, parse_seeds, sampling_spec_for
from .eval.generate import generate
from .eval.inception import compute_reference, load_extractor, load_reference, resolve_inception_path, save_reference
from .eval.plots import write_png_folder
from .io import convert_teacher, export_checkpoint, load_for_sampling
from .io.load import export_lora_adapter
from .io.diffusers import export_diffusers
from .io.paths import check_output_file
from .options import UNBOUNDED_STEPS
from .lora import LoRAOptions
from .methods.embedding_loss import ELOptions
from .methods.registry import get_method, list_methods, lora_methods
from .train.distributed import init_distributed, rank, release
from .train.health import is_out_of_memory, out_of_memory_message
from .train.memory import dry_run_report
from .train.trainer import DivergenceError, OutOfMemoryStop, Trainer
from .data.latent_cache import encode_data
from .io.text_encode import PromptEncoder, read_prompt_labels, read_prompts, write_prompt_file
from .io.vae import latent_codec_for

# Exit codes: 0 done; 2 bad input (one line naming the fix); 3 diverged (NaN/inf, nan_policy=stop); 4 out of
# memory; 128 + signal number (130 SIGINT, 143 SIGTERM) when a signal stopped training after a final checkpoint.
EXIT_USER, EXIT_DIVERGED, EXIT_OOM = 2, 3, 4
_MODEL_FILE = "checkpoint (.pt), exported .safetensors, NVlabs/edm .pkl or diffusers UNet2DModel folder"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise UserError(f"{message} (see '{self.prog} --help')")


class _Deprecated(argparse.Action):
    """An old spelling of a flag: works for this release, with one line naming the new one."""

    def __init__(self, option_strings, dest, new_flag=None, **kw):
        self.new_flag = new_flag
        super().__init__(option_strings, dest, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"diffdistill: warning: {option_string} is deprecated here, use {self.new_flag}", file=sys.stderr)
        setattr(namespace, self.dest, values)


TEACHER_OBJECTIVES = ("edm", "flow")   # the teacher method's name, which is also its preconditioning's


def _add_training_flags(p):
    """The flags every training command shares (train-teacher, distill)."""
    p.add_argument("--batch-size", type=int, help="batch size per process (default: the preset's)")
    p.add_argument("--budget-minutes", type=float, metavar="M",
                   help="train for M minutes of training-loop wall-clock, then write a checkpoint and stop; "
                        "the preset's iteration count then no longer applies (--iters still caps the run) "
                        "(default: no limit)")
    p.add_argument("--seed", type=int, help="seed of noise draws, batch order and initialisation (default 0)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default cpu); with --dry-run also meta: the networks are "
                                    "built without memory and planned from their shapes")
    p.add_argument("--resume", help="'auto' (newest valid checkpoint in the run directory) or a checkpoint path "
                                    "(default: start fresh)")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in a folder that holds another run, deleting that run's checkpoints/logs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to log.jsonl)")


def _add_run_flags(p):
    p.add_argument("--config", help="YAML/JSON file with sections run/data/net/method; flags and --set override it "
                                    "(default: none)")
    p.add_argument("--out", help="run directory (default: the preset's, under runs/)")
    p.add_argument("--iters", dest="iters", type=int, help="training iterations (default: the preset's)")
    p.add_argument("--steps", dest="iters", type=int, action=_Deprecated, new_flag="--iters", help=argparse.SUPPRESS)
    _add_training_flags(p)
    p.add_argument("--dry-run", action="store_true",
                   help="list the networks with parameter counts and estimate peak memory, then exit (writes nothing)")
    p.add_argument("--plan-ranks", type=int, metavar="N",
                   help="with --dry-run and run.fsdp: plan each process's share of the sharded networks for N "
                        "processes (default: the processes launched; the per-process batch stays as resolved)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config entry, repeatable, e.g. --set method.lr=5e-4 --set run.ckpt_every=200 "
                        "('diffdistill options run' lists the run keys)")


def _add_sampler_flags(p):
    """--steps, --sampler and the stochastic sampler's settings, shared by sample and eval."""
    p.add_argument("--steps", type=int, help="sampler steps N (teacher: heun/stochastic NFE = 2N-1, euler/ddim NFE = "
                                             "N; default: the checkpoint's)")
    p.add_argument("--sampler", choices=sorted(TEACHER_SAMPLERS),
                   help="teacher sampler; stochastic is EDM's Algorithm 2 (Heun with churn, --s-churn etc.) "
                        "(default: the checkpoint's, heun; a student keeps its own)")
    # Unset flags stay None so that only what the user gave is recorded; the sampler applies EDM's defaults.
    p.add_argument("--s-churn", type=float, metavar="S",
                   help="stochastic sampler: S_churn >= 0; each step with S_tmin <= sigma <= S_tmax first adds fresh "
                        "noise to raise sigma to sigma*(1+gamma), gamma = min(S_churn/N, sqrt(2)-1) (EDM ImageNet-64: "
                        "40 with 256 steps) (default 0, as EDM generate.py: exactly the heun sampler)")
    p.add_argument("--s-tmin", type=float, metavar="SIGMA",
                   help="stochastic sampler: lowest sigma that gets churn, S_tmin (EDM ImageNet-64: 0.05) "
                        "(default 0, as EDM generate.py)")
    p.add_argument("--s-tmax", type=float, metavar="SIGMA",
                   help="stochastic sampler: highest sigma that gets churn, S_tmax (EDM ImageNet-64: 50) "
                        "(default inf, as EDM generate.py)")
    p.add_argument("--s-noise", type=float, metavar="F",
                   help="stochastic sampler: noise inflation S_noise > 0 (EDM ImageNet-64: 1.003) "
                        "(default 1, as EDM generate.py)")
    p.add_argument("--guidance", type=float, metavar="W",
                   help="guidance scale of a conditional net: classifier-free guidance D_null + W*(D_cond - "
                        "D_null), the null condition being the all-zero label or the prompts' null (negative) "
                        "embedding (1: none; costs 2 network calls per step; the teacher must have been trained "
                        "with method.label_dropout > 0); a net that takes the scale as input (FLUX.1-dev, a "
                        "w-conditioned student) gets W as its extra.guidance instead, one call per step (default: "
                        "none, 1; the prompts' own extra.guidance or the student's recorded default)")
    p.add_argument("--prompts", metavar="FILE",
                   help="encoded prompts (.npz / .safetensors: embeds [N, L, D], optional mask, pooled, extra.*, "
                        "null.*) for a net conditioned on text embeddings; seed s gets prompt s mod N (default: "
                        "the run's data.prompts)")


def _sampler_options(a) -> dict:
    """The stochastic sampler flags the user gave, as a spec's 'sampler_options'."""
    return {k: getattr(a, k) for k in CHURN_DEFAULTS if getattr(a, k) is not None}


def _run_flags(a) -> dict:
    run = {k: v for k, v in {"out": a.out, "steps": a.iters, "batch_size": a.batch_size, "seed": a.seed,
                             "device": a.device, "resume": a.resume,
                             "max_minutes": a.budget_minutes}.items() if v is not None}
    if a.budget_minutes is not None and a.iters is None:
        run["steps"] = UNBOUNDED_STEPS  # the budget decides, as in `compare`
    if a.overwrite:
        run["overwrite"] = True
    if a.no_progress:
        run["progress"] = False
    return {"run": run}


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="diffdistill", description="Distill diffusion teachers into one-step / few-step students.")
    p.add_argument("--version", action="version", version=f"diffdistill {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    t = sub.add_parser("train-teacher", help="train a teacher denoiser with the EDM loss or flow matching")
    t.add_argument("--objective", choices=TEACHER_OBJECTIVES,
                   help="edm: EDM denoising loss and preconditioning; flow: flow matching (velocity loss, "
                        "logit-normal t, rectified-flow network in σ-space) (default: the config's, edm)")
    t.add_argument("--preset", choices=sorted(TEACHER_PRESETS),
                   help="built-in recipe, configs/edm/NAME.yaml (default digits, or the config file's preset:)")
    t.add_argument("--data", help="dataset: digits | ring8 | checkerboard | two_moons | a folder, .zip or .npz "
                                  "(default: the preset's)")
    _add_run_flags(t)

    s = sub.add_parser("sample", help="draw samples from a teacher or student checkpoint")
    s.add_argument("checkpoint", help=f"teacher or student: {_MODEL_FILE}")
    _add_sampler_flags(s)
    _add_decode_flags(s, sample=True)
    s.add_argument("--num-samples", type=int, default=64, help="number of samples (default %(default)s)")
    s.add_argument("--seed", type=int, default=0, help="first seed; sample i uses seed+i (default %(default)s)")
    s.add_argument("--seeds", metavar="A-B", help="EDM-style seed list instead of --seed/--num-samples, e.g. 0-63 or "
                                                  "0-31,1000-1031: one sample per seed (default: none)")
    s.add_argument("--out", required=True, help="FILE.npz (arrays 'samples', 'labels') or a folder for PNGs")
    s.add_argument("--raw", action="store_true", help="images: keep the sampler's values in the .npz (default: "
                   "clamped to [-1, 1]; PNG pixels are always clipped)")
    s.add_argument("--labels", choices=["edm", "mod"], help="class of each seed: edm (drawn from the seed's RNG "
                   "as NVlabs/edm generate.py) or mod (seed mod classes); default: the checkpoint's (edm for EDM "
                   ".pkl teachers)")
    s.add_argument("--batch-size", type=int, default=256,
                   help="samples generated at once; lower it on out of memory (default %(default)s)")
    s.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default %(default)s)")

    e = sub.add_parser("eval", help="measure a checkpoint: proxy-FID/KID (images), sliced W2/MMD (2-D), images/s")
    e.add_argument("checkpoint", help=f"teacher or student: {_MODEL_FILE}")
    _add_sampler_flags(e)
    _add_decode_flags(e, sample=False)
    e.add_argument("--num-samples", type=int, default=2000,
                   help="samples generated and compared with the data (default %(default)s)")
    e.add_argument("--seed", type=int, default=0, help="first seed; sample i uses seed+i (default %(default)s)")
    e.add_argument("--seeds", metavar="A-B", help="EDM-style seed list instead of --seed/--num-samples, e.g. "
                                                  "2000-3999 for a second set disjoint from the default 0-1999 "
                                                  "(--seed 1 would reuse 1,999 of its samples) (default: none)")
    e.add_argument("--data", help="data to compare with: digits | ring8 | checkerboard | two_moons | a folder, .zip "
                                  "or .npz; needed for a diffusers teacher or a data-free student of one (default: "
                                  "the data recorded in the checkpoint)")
    e.add_argument("--out", help="metrics JSON file (default: print only)")
    e.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default %(default)s)")
    e.add_argument("--inception", help="local inception-2015-12-05.pt (TorchScript of StyleGAN2-ADA / clean-fid) or "
                                       "weights-inception-2015-12-05-6726825d.pth (torch-fidelity state dict); default "
                                       "$DIFFDISTILL_INCEPTION. With --ref: Inception FID/KID/precision-recall")
    e.add_argument("--ref", help="reference: EDM-style .npz (mu, sigma; from 'diffdistill ref-stats' also features) "
                                 "or a folder / zip / image .npz (default: none, the built-in proxy metrics only)")
    e.add_argument("--no-kid", action="store_true", help="skip KID")
    e.add_argument("--no-pr", action="store_true", help="skip precision/recall")
    e.add_argument("--batch-size", type=int, default=250,
                   help="generation and feature batch size (default %(default)s)")

    r = sub.add_parser("ref-stats", help="Inception reference statistics (EDM-style .npz) of a folder / zip / .npz")
    r.add_argument("data", help="folder of images (recursive), EDM zip, or image .npz")
    r.add_argument("--inception", help="local inception-2015-12-05.pt (TorchScript) or torch-fidelity's "
                                       "weights-inception-2015-12-05-6726825d.pth (default $DIFFDISTILL_INCEPTION)")
    r.add_argument("--out", required=True, help="OUT.npz (mu, sigma, num_images, recipe[, features])")
    r.add_argument("--max-images", type=int, metavar="N", help="use the first N images, sorted by name (default: all)")
    r.add_argument("--no-features", action="store_true",
                   help="store mu/sigma only (KID and precision/recall need the features)")
    r.add_argument("--batch-size", type=int, default=250, help="images per Inception batch (default %(default)s)")
    r.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default %(default)s)")

    ct = sub.add_parser("convert-teacher", help="NVlabs/edm .pkl or diffusers UNet2DModel folder -> teacher "
                                                ".safetensors (+ .json); the pickle's code is never run")
    ct.add_argument("source", help="EDM network-snapshot .pkl, or a diffusers pipeline / UNet2DModel folder")
    ct.add_argument("out", help="OUT.safetensors")
    ct.add_argument("--dropout", type=float, help="set the network's dropout probability (students copy it; DMD2 "
                                                  "uses 0; default: the source's)")

    methods = list_methods(role="student")
    m = sub.add_parser("distill", help="distill a teacher checkpoint into a few-step student",
                       description="Methods:\n" + "\n".join(f"  {k:14s} {v}" for k, v in methods.items()),
                       epilog="A method's options (type, range, official default, source) and presets:\n"
                              "  diffdistill options METHOD     e.g. diffdistill options dmd2; set one with --set "
                              "method.KEY=VALUE\n"
                              "  diffdistill options run        the run keys (--set run.KEY=VALUE)\n"
                              "  diffdistill options el         the embedding loss's keys (--set el.KEY=VALUE)\n"
                              "  diffdistill options lora       LoRA students (--set lora.rank=8; "
                              + ", ".join(lora_methods()) + ")",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("--method", required=True, choices=sorted(methods), metavar="NAME",
                   type=lambda name: name.replace("-", "_"),  # diff-instruct == diff_instruct
                   help="one of: " + ", ".join(sorted(methods)) + "; 'diffdistill options NAME' lists its options")
    m.add_argument("--teacher", required=True, help=f"teacher: {_MODEL_FILE}")
    m.add_argument("--student-steps", dest="student_steps", type=int,
                   help="sampling steps of the student (default: the method's, usually 1)")
    m.add_argument("--steps", dest="student_steps", type=int, action=_Deprecated, new_flag="--student-steps",
                   help=argparse.SUPPRESS)
    m.add_argument("--preset", help="configs/METHOD/NAME.yaml: 'official' (the paper's recipe: the method's "
                                    "defaults + official run settings), 'images' or 'points' (default: the "
                                    "teacher's kind, or the config file's preset:); 'diffdistill options METHOD' "
                                    "lists them")
    m.add_argument("--iters", type=int, help="training iterations (default: the method's preset)")
    m.add_argument("--start-steps", type=int, metavar="N",
                   help="step-halving methods (pd, cfd, rdd): the teacher's steps at the start, N -> N/2 -> ... -> "
                        "--student-steps (default: the preset's)")
    m.add_argument("--iters-per-halving", type=int, metavar="K",
                   help="step-halving methods: training iterations per halving; the run is K x log2(N/steps) "
                        "iterations unless --iters is given (default: the preset's)")
    m.add_argument("--data", help="real data for methods that use it (default: the teacher's training data)")
    m.add_argument("--sample-shape", metavar="C,H,W",
                   help="latent shape of one sample for a diffusers transformer teacher, which takes any size "
                        "(e.g. 16,128,128 for FLUX at 1024 px; C,F,H,W for Wan video) (default: its config's)")
    m.add_argument("--prompts", metavar="FILE",
                   help="encoded prompts for a teacher conditioned on text embeddings (.npz / .safetensors: embeds "
                        "[N, L, D], optional mask, pooled, extra.*, and null.* = the negative prompt); data-free "
                        "draws pick rows uniformly (default: the data's own, when it carries them)")
    m.add_argument("--el-weight", type=float, metavar="W", nargs="?", const=3.0,
                   help="add the embedding loss (EL: MMD to real data in random-network features) to the generator "
                        "loss of dmd2, dmd, diff_instruct, sid or cd, its gradient W times the base loss's in norm "
                        "(W alone: 3, the calibrated default; --set el.mode=fixed makes W a plain multiplier; other "
                        "options via --set el.KEY=VALUE: count, seed, widths, kernel, unbiased, ...). EL reads real "
                        "data, so the data-free methods (sid, dmd, diff_instruct) then use data too (default: no "
                        "EL)")
    m.add_argument("--config", help="YAML/JSON file with sections run/data/method; flags and --set override it "
                                    "(default: none)")
    m.add_argument("--out", help="run directory (default runs/<method>)")
    _add_training_flags(m)
    m.add_argument("--dry-run", action="store_true",
                   help="list every network (student, teacher, helpers, EMA copies) with parameter counts and "
                        "estimate peak memory for the batch, then exit without training or writing anything")
    m.add_argument("--plan-ranks", type=int, metavar="N",
                   help="with --dry-run and run.fsdp: plan each process's share of the sharded networks for N "
                        "processes (default: the processes launched; the per-process batch stays as resolved)")
    m.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config entry, repeatable, e.g. --set method.lr=5e-4 --set run.ckpt_every=200 "
                        "(the keys: 'diffdistill options METHOD', 'options run', 'options el', 'options lora')")

    o = sub.add_parser("options", help="list a method's options (type, range, official default, source) and presets")
    o.add_argument("name", help="a method (e.g. dmd2), 'run', 'el' or 'lora'")

    x = sub.add_parser("export", help="write a checkpoint's sampling weights as .safetensors with JSON metadata")
    x.add_argument("checkpoint", help="a teacher or student checkpoint (.pt) written by diffdistill")
    x.add_argument("out", help="OUT.safetensors, or a folder with --format diffusers")
    x.add_argument("--format", choices=["safetensors", "diffusers", "peft"], default="safetensors",
                   help="safetensors: one file with JSON metadata (a LoRA student: merged into its base teacher); "
                        "diffusers: a folder with unet/ or transformer/, scheduler/ and diffdistill_sampling.json "
                        "(students of diffusers teachers only; text-to-image ones: a pipeline folder with "
                        "model_index.json); peft: a LoRA student's adapter alone, a folder with "
                        "adapter_model.safetensors and adapter_config.json as peft writes them "
                        "(default %(default)s)")

    c = sub.add_parser("compare", help="run several methods on one teacher with the same seeds and budget; "
                                       "report.md + report.html")
    c.add_argument("--teacher", required=True, help="teacher checkpoint or exported .safetensors")
    c.add_argument("--methods", required=True, help="comma-separated method names, e.g. dmd2,sid,diff-instruct")
    c.add_argument("--iters", type=int, help="iterations per method (default: each method's preset)")
    c.add_argument("--budget-minutes", type=float, metavar="M",
                   help="training wall-clock per method in minutes, evaluation excluded (default: no limit)")
    c.add_argument("--num-samples", type=int, default=2000, help="samples per table row (default %(default)s)")
    c.add_argument("--curve-points", type=int, default=8,
                   help="evaluations along each training run (default %(default)s)")
    c.add_argument("--el-weight", type=float, metavar="W",
                   help="add the EL supplement at weight W to every method that trains a generator from noise "
                        "(rows marked +EL; EL reads real data, also for data-free methods; default: no EL)")
    c.add_argument("--seed", type=int, default=0,
                   help="run seed of every method (the first one with --seeds) and the first seed of the evaluation "
                        "samples (default %(default)s)")
    c.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="train every method N times, run seeds SEED, SEED+1, ..., one run folder each; table cells "
                        "become mean ± 95%% t-interval with Welch's t-test against the best (default %(default)s)")
    c.add_argument("--out", default="runs/compare", help="report folder (default %(default)s)")
    c.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default %(default)s)")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override applied to every method's run, e.g. --set run.batch_size=32")

    d = sub.add_parser("demo", help="the main job: digits teacher, evaluation and report.md (minutes on a CPU)")
    d.add_argument("--out", default="runs/demo", help="demo folder: runs and report.md (default %(default)s)")
    d.add_argument("--train-teacher", action="store_true", help="retrain the teacher even if a shipped one exists")
    d.add_argument("--teacher-steps", type=int, default=None,
                   help="train a new teacher for this many iterations (default: the shipped teacher; with "
                        "--train-teacher the digits preset's iterations)")
    d.add_argument("--num-samples", type=int, default=2000, help="samples per evaluation (default %(default)s)")
    d.add_argument("--distill-iters", type=int, help="distillation iterations (default: the method's preset)")
    d.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default %(default)s)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_latent_parsers(sub)
    return p


def _plan_ranks(a) -> int | None:
    """--plan-ranks N, checked (None when not given)."""
    n = getattr(a, "plan_ranks", None)
    if n is not None and n < 1:
        raise UserError(f"--plan-ranks must be a positive number of processes, got {n}")
    if n is not None and not a.dry_run:
        raise UserError("--plan-ranks plans a --dry-run's memory: add --dry-run")
    return n


def cmd_train_teacher(a) -> int:
    ranks = _plan_ranks(a)
    flags = _run_flags(a)
    if a.objective:
        flags["method"] = {"name": a.objective}
        flags["net"] = {"precond": a.objective}
    if a.data:
        flags["data"] = _data_spec(a.data)
    cfg = resolve(a.preset, a.config, flags, a.set, default_preset="digits")
    trainer = Trainer(cfg, dry_run=a.dry_run)
    if a.dry_run:
        print(dry_run_report(trainer, ranks))
        print(resolved_config_text(trainer.cfg))
        return 0
    trainer.run()
    if trainer.stopped_by_signal:
        return _stopped(trainer)
    print(f"teacher checkpoint: {trainer.ckpt_dir}/ (newest ckpt-*.pt); samples: {trainer.out / 'samples'}")
    return 0


def resolved_config_text(cfg: dict, hide_out: bool = False) -> str:
    """The resolved configuration as YAML (what config.json would hold), for --dry-run."""
    cfg = json.loads(json.dumps(cfg, default=str))
    if hide_out:
        cfg["run"].pop("out", None)  # a temporary folder during a dry run
    return "resolved configuration:\n" + yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True).rstrip()


def _stopped(trainer) -> int:
    """Exit code 128 + signal after a signal stopped training (the trainer has written a final checkpoint), so job
    scripts can tell an interrupted run from a finished one."""
    import signal
    name = signal.Signals(trainer.stopped_by_signal).name
    print(f"diffdistill: stopped by {name} at step {trainer.step} after writing a checkpoint; continue with the same "
          f"command plus --resume auto", file=sys.stderr)
    return 128 + int(trainer.stopped_by_signal)


def cmd_distill(a) -> int:
    ranks = _plan_ranks(a)
    flags = _run_flags(a)
    if a.student_steps is not None:
        if a.student_steps <= 0:
            raise UserError(f"--student-steps must be positive, got {a.student_steps}")
        flags["method"] = {"student_steps": a.student_steps}
    halving = {k: v for k, v in {"start_steps": a.start_steps, "iters_per_halving": a.iters_per_halving}.items()
               if v is not None}
    if halving:  # the method's schema refuses them if it has no step-halving schedule
        flags.setdefault("method", {}).update(halving)
    if a.data:
        flags["data"] = _data_spec(a.data)
    if a.prompts:
        flags.setdefault("data", {})["prompts"] = str(Path(a.prompts).resolve())
    if a.sample_shape:
        flags["teacher"] = {"sample_shape": _shape_arg(a.sample_shape)}
    if a.el_weight is not None:
        flags["el"] = {"weight": a.el_weight}
    if a.dry_run:
        import tempfile
        with tempfile.TemporaryDirectory(prefix="diffdistill-dry-run-") as tmp:
            flags["run"]["out"] = tmp  # files a method precomputes (DMD's pairs) go to a temp folder
            trainer = distill(a.method, a.teacher, flags=flags, config_file=a.config, overrides=a.set, dry_run=True,
                              preset=a.preset)
            print(dry_run_report(trainer, ranks))
            print(resolved_config_text(trainer.cfg, hide_out=True))
        return 0
    trainer = distill(a.method, a.teacher, flags=flags, config_file=a.config, overrides=a.set, preset=a.preset)
    if trainer.stopped_by_signal:
        return _stopped(trainer)
    print(f"student checkpoint: {trainer.ckpt_dir}/ (newest ckpt-*.pt)")
    return 0


def _shape_arg(s: str) -> list[int]:
    try:
        shape = [int(v) for v in s.split(",")]
    except ValueError:
        shape = []
    if len(shape) < 3 or min(shape) <= 0:
        raise UserError(f"--sample-shape wants positive sizes C,H,W (or C,F,H,W), got {s!r}")
    return shape


def _data_spec(s: str) -> dict:
    if s in TEACHER_PRESETS:  # a built-in data set: as its teacher preset loads it
        return dict(load_preset("edm", s)["data"])
    return {"path": s}


def _seed_list(a) -> list[int]:
    """--seeds A-B,… or --seed/--num-samples; both at once is refused."""
    if a.seeds is None:
        return list(range(a.seed, a.seed + a.num_samples))
    if a.seed != 0:
        raise UserError("give either --seeds or --seed/--num-samples, not both")
    seeds = parse_seeds(a.seeds)
    a.num_samples = len(seeds)
    return seeds


def cmd_sample(a) -> int:
    import numpy as np
    seeds = _seed_list(a)
    if a.num_samples <= 0:
        raise UserError(f"--num-samples must be positive, got {a.num_samples}")
    if a.batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {a.batch_size}")
    check_device(a.device)
    net, state = load_for_sampling(a.checkpoint, a.device)
    spec = sampling_spec_for(state, a.steps, a.sampler, _sampler_options(a), a.guidance, a.prompts)
    out = Path(a.out)
    if out.suffix != ".npz" and not net.img_resolution:  # refuse before sampling, not after
        raise UserError("PNG output is for images; use --out FILE.npz for 2-D points")
    codec = _sample_codec(a, state, out)
    latent = codec is None and (state.get("net_config") or {}).get("arch") == "diffusers_cond"
    if latent and out.suffix != ".npz":
        raise UserError("PNG output of a latent model needs its VAE, and none was found: give --vae DIR, or "
                        "write --out FILE.npz (latents)")
    x, labels, info = generate(net, seeds, spec, batch_size=a.batch_size, device=a.device, label_rule=a.labels)
    z = x
    if codec is not None:
        x = codec.decode_batched(z, a.batch_size)
    if x.ndim == 4 and not a.raw and not latent:  # images are float32 in [-1, 1]; latents and points keep theirs
        x = x.clamp(-1, 1)
    if out.suffix == ".npz":
        out.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"samples": x.numpy().astype(np.float32)}
        if codec is not None:   # the decoded images' latents beside them
            arrays["latents"] = z.numpy().astype(np.float32)
        if "prompt_index" in info:   # which encoded prompt each sample was generated for
            arrays["prompt_index"] = np.asarray(info["prompt_index"], dtype=np.int64)
        elif labels is not None:
            arrays["labels"] = labels.argmax(1).numpy()
        np.savez(out, **arrays)
    else:
        if x.ndim != 4:
            raise UserError("PNG output is for images; use --out FILE.npz for 2-D points")
        write_png_folder(x, out, [f"{s:06d}" for s in seeds])
    print(f"wrote {a.num_samples} samples to {out} (NFE {info['nfe']}, {info['images_per_second']:.1f} samples/s)")
    return 0


def _init_ranks(device: str) -> bool:
    """Join torchrun's process group when launched by it (eval / ref-stats shard their work); True on rank 0."""
    init_distributed(device)
    return rank() == 0


def _inception_setup(a) -> dict | None:
    """--inception/--ref → the extractor and reference of eval (None when no --ref is given)."""
    if not a.ref:
        if a.inception:
            raise UserError("--inception needs a reference: add --ref REF.npz (diffdistill ref-stats) or an image folder")
        return None
    path = resolve_inception_path(a.inception)
    if path is None:
        raise UserError("--ref needs the Inception network: --inception PATH/inception-2015-12-05.pt or "
                        "$DIFFDISTILL_INCEPTION")
    ext = load_extractor(path, a.device)
    return {"extractor": ext, "reference": load_reference(a.ref, ext, a.batch_size), "kid": not a.no_kid,
            "pr": not a.no_pr, "batch_size": a.batch_size}


def cmd_eval(a) -> int:
    seeds = _seed_list(a)
    if a.num_samples <= 1:
        raise UserError(f"--num-samples must be at least 2, got {a.num_samples}")
    if a.out:
        check_output_file(a.out, "--out")  # before the evaluation, not after it
    check_device(a.device)
    rank0 = _init_ranks(a.device)
    metrics = evaluate_checkpoint(a.checkpoint, steps=a.steps, sampler=a.sampler, num_samples=a.num_samples,
                                  seed=seeds[0], device=a.device, inception=_inception_setup(a), seeds=seeds,
                                  data=_data_spec(a.data) if a.data else None, sampler_options=_sampler_options(a),
                                  guidance=a.guidance, prompts=a.prompts, vae=a.vae)
    if not rank0:
        return 0
    text = json.dumps(metrics, indent=2)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")
    print(text)
    return 0


def cmd_ref_stats(a) -> int:
    path = resolve_inception_path(a.inception)
    if path is None:
        raise UserError("ref-stats needs the Inception network: --inception PATH/inception-2015-12-05.pt or "
                        "$DIFFDISTILL_INCEPTION")
    if not a.out.endswith(".npz"):
        raise UserError(f"ref-stats writes an .npz: give --out ending in .npz, not {a.out!r}")
    rank0 = _init_ranks(a.device)
    ref = compute_reference(a.data, load_extractor(path, a.device), a.batch_size, a.max_images,
                            keep_features=not a.no_features)
    if rank0:
        sha = save_reference(ref, a.out, keep_features=not a.no_features)
        print(f"wrote {a.out}: {ref.num_images} images, {ref.mu.shape[0]}-d features, sha256 {sha[:16]}…")
    return 0


def cmd_convert_teacher(a) -> int:
    meta = convert_teacher(a.source, a.out, dropout=a.dropout)
    cfg, src = meta["net_config"], meta["source"]
    print(f"wrote {a.out} (+ {Path(a.out).with_suffix('.json').name}): {src['format']} -> {cfg['arch']} with "
          f"{cfg['precond']} preconditioning, {cfg['img_channels']}x{cfg['img_resolution']}x{cfg['img_resolution']}, "
          f"label_dim {cfg['label_dim']}; reloaded output identical (max |diff| {meta['verified_max_abs_diff']})")
    return 0


def cmd_export(a) -> int:
    if a.format == "peft":
        if Path(a.out).exists() and (not Path(a.out).is_dir() or any(Path(a.out).iterdir())):
            raise UserError(f"export --format peft writes a new folder: {a.out} already exists and is not empty")
        info = export_lora_adapter(a.checkpoint, a.out)
        print(f"wrote {a.out}/adapter_model.safetensors + adapter_config.json (LoRA rank {info['lora']['rank']}, "
              f"{len(info['lora']['target_modules'])} layers; base teacher {info['lora']['base']['path']})")
        return 0
    if a.format == "diffusers":
        if Path(a.out).exists() and (not Path(a.out).is_dir() or any(Path(a.out).iterdir())):
            raise UserError(f"export --format diffusers writes a new folder: {a.out} already exists and is not empty")
        _, state = load_for_sampling(a.checkpoint)
        info = export_diffusers(state, a.out)
        print(f"wrote {a.out}: {', '.join(info['written'])}, diffdistill_sampling.json ({info['role']}, "
              f"{len(info['steps'])} step(s))")
        if info.get("pipeline_note"):
            print(f"note: no diffusers pipeline call reproduces this student: {info['pipeline_note']}")
        return 0
    if not a.out.endswith(".safetensors"):
        raise UserError(f"export writes safetensors: give an output path ending in .safetensors, not {a.out!r}")
    check_output_file(a.out, "export OUT")
    meta = export_checkpoint(a.checkpoint, a.out)
    print(f"wrote {a.out} ({meta['role']}, method {meta['method']}, step {meta['step']})")
    return 0


def cmd_options(a) -> int:
    if a.name in ("run", "el", "lora"):
        schema = {"run": RunOptions, "el": ELOptions, "lora": LoRAOptions}[a.name]
        title, presets = f"{a.name} options", []
    else:
        cls = get_method(a.name)
        schema, title, presets = cls.Options, f"{cls.name}: {cls.summary}", list_presets(cls.name)
    section = schema.section
    print(title)
    if presets:
        print("\npresets (--preset NAME; files under " + str(preset_path(a.name, "x").parent) + "):")
        for name in presets:
            first = next((ln[1:].strip() for ln in preset_path(a.name, name).read_text().splitlines()
                          if ln.startswith("#")), "")
            print(f"  {name:10s} {first}")
    print(f"\noptions (--set {section}.KEY=VALUE" + ("; the defaults are the official recipe" if presets else "") + "):")
    print(schema.describe())
    return 0


def cmd_compare(a) -> int:
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    compare(a.teacher, methods, out=a.out, iters=a.iters, budget_minutes=a.budget_minutes, seed=a.seed,
            num_samples=a.num_samples, curve_points=a.curve_points, device=a.device, progress=not a.no_progress,
            overrides=a.set, el_weight=a.el_weight, seeds=a.seeds)
    return 0


def cmd_demo(a) -> int:
    for flag, v, lo in (("--num-samples", a.num_samples, 2), ("--distill-iters", a.distill_iters, 1),
                        ("--teacher-steps", a.teacher_steps, 1)):
        if v is not None and v < lo:  # before the teacher evaluation, naming the flag
            raise UserError(f"demo {flag} must be at least {lo}, got {v}")
    run_demo(out=a.out, retrain_teacher=a.train_teacher, teacher_steps=a.teacher_steps,
             num_samples=a.num_samples, device=a.device, progress=not a.no_progress,
             distill_iters=a.distill_iters)
    return 0


# ------------------------------------------------------------------------------------------------ latent pipeline
def _add_decode_flags(p, sample: bool) -> None:
    """--decode / --vae: latents → images with the teacher folder's VAE (sample, eval)."""
    if sample:
        p.add_argument("--decode", action="store_true",
                       help="decode latent samples to images with the VAE (the teacher folder's vae/, or --vae) "
                            "before writing the .npz (default: PNG output is decoded whenever a VAE is found, "
                            ".npz keeps the latents)")
    p.add_argument("--vae", metavar="DIR",
                   help="VAE that decodes latent samples: a pipeline folder with vae/ or a VAE folder (default: the "
                        "teacher's diffusers folder's vae/" + (", when found; eval scores decoded images" if not
                                                               sample else "") + ")")


def _sample_codec(a, state, out: Path):
    """The VAE sample decodes with: required by --decode, automatic for PNG output, none for plain .npz."""
    if a.decode or a.vae:
        return latent_codec_for(state, a.vae, a.device, required=True)
    return latent_codec_for(state, None, a.device) if out.suffix != ".npz" else None


def _add_latent_parsers(sub) -> None:
    ep = sub.add_parser("encode-prompts", help="encode prompts once with a diffusers pipeline folder's own text "
                                               "encoder(s) into a --prompts file")
    ep.add_argument("pipeline", help="local diffusers pipeline folder (model_index.json, text_encoder*/, "
                                     "tokenizer*/); read with local_files_only")
    ep.add_argument("--prompts", required=True, metavar="FILE",
                    help=".txt (one prompt per line) or .jsonl (a JSON string or {\"prompt\": ...} per line; "
                         "{\"text\": ..., \"label\": CLASS} records each prompt's class, for eval's conditional "
                         "correctness)")
    ep.add_argument("--out", required=True, help="OUT.safetensors or OUT.npz (+ OUT.json: each row's prompt)")
    _add_text_flags(ep)
    ep.add_argument("--image-size", metavar="H,W",
                    help="SDXL: the size in its time ids (original = target size, crop 0,0) (default: the "
                         "pipeline's default resolution)")
    ep.add_argument("--batch-size", type=int, default=64, help="prompts encoded at once (default %(default)s)")

    ed = sub.add_parser("encode-data", help="encode images + captions once with a pipeline folder's VAE and text "
                                            "encoder(s) into a latent .npz data set (resumable shards)")
    ed.add_argument("pipeline", help="local diffusers pipeline folder with vae/ and its text encoder(s)")
    ed.add_argument("--data", required=True,
                    help="folder of images with captions.jsonl / metadata.jsonl / captions.txt (FILE<TAB>caption) "
                         "or one subfolder per caption; or an .npz with images and 'captions'")
    ed.add_argument("--captions", metavar="FILE",
                    help="captions file instead of the one beside the images (for an .npz: one caption per image, "
                         "in order) (default: captions.jsonl, metadata.jsonl or captions.txt in the folder; an "
                         ".npz's 'captions' array)")
    ed.add_argument("--out", required=True, help="OUT.npz (latents, embeds, …, null.*, captions, files); work "
                                                 "shards go to OUT.shards/ until it is written")
    _add_text_flags(ed)
    ed.add_argument("--shard-size", type=int, default=1000, help="images per shard file (default %(default)s)")
    ed.add_argument("--batch-size", type=int, default=16, help="images per VAE call (default %(default)s)")
    ed.add_argument("--sample-posterior", action="store_true",
                    help="store a posterior sample (mean + std·noise, noise seeded per image) instead of the "
                         "posterior mean (default: the mean)")
    ed.add_argument("--seed", type=int, default=0, help="seed of --sample-posterior's noise (default %(default)s)")
    ed.add_argument("--keep-shards", action="store_true", help="keep OUT.shards/ after writing OUT.npz")
    ed.add_argument("--overwrite", action="store_true", help="encode again when OUT.npz exists")


def _add_text_flags(p) -> None:
    p.add_argument("--negative", metavar="TEXT",
                   help="negative prompt, stored as null.* (CFG's unconditional branch) (default: the pipeline's "
                        "own: the empty prompt \"\", or zeros for SDXL's force_zeros_for_empty_prompt)")
    p.add_argument("--max-sequence-length", type=int, metavar="N",
                   help="T5 / Gemma / umT5 tokens (SD3, FLUX, SANA, Wan) (default: the pipeline's __call__ default)")
    p.add_argument("--embedded-guidance", type=float, metavar="G",
                   help="FLUX with guidance_embeds: the guidance stored as extra.guidance (default: the "
                        "pipeline's guidance_scale, 3.5)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default %(default)s)")


def cmd_encode_prompts(a) -> int:
    out = Path(a.out)
    if out.suffix not in (".safetensors", ".npz"):
        raise UserError(f"encode-prompts writes .safetensors or .npz, not {out}")
    if a.batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {a.batch_size}")
    check_output_file(out, "--out")
    check_device(a.device)
    prompts = read_prompts(a.prompts)
    size = None
    if a.image_size:
        size = [int(v) for v in a.image_size.split(",")] if all(v.strip().isdigit() for v in
                                                               a.image_size.split(",")) else []
        if len(size) != 2 or min(size) <= 0:
            raise UserError(f"--image-size wants H,W, got {a.image_size!r}")
    enc = PromptEncoder(a.pipeline, a.negative, a.device, image_size=size, guidance=a.embedded_guidance,
                        max_sequence_length=a.max_sequence_length)
    if size and enc.name != "StableDiffusionXLPipeline":
        raise UserError(f"--image-size sets SDXL's time ids; a {enc.name} has none")
    cond = enc.encode(prompts, batch_size=a.batch_size)
    labels = read_prompt_labels(a.prompts)
    side = write_prompt_file(cond, out, prompts, enc.describe(), labels)
    fields = ", ".join(f"{k} {list(v)}" for k, v in cond.signature.items())
    print(f"wrote {out}: {len(cond)} prompts ({fields}; null: {enc.negative!r}"
          f"{'; class labels' if labels else ''}) + {side.name}")
    return 0


def cmd_encode_data(a) -> int:
    check_device(a.device)
    encode_data(a.pipeline, a.data, a.out, captions=a.captions, negative=a.negative, shard_size=a.shard_size,
                batch_size=a.batch_size, sample_posterior=a.sample_posterior, seed=a.seed, device=a.device,
                keep_shards=a.keep_shards, overwrite=a.overwrite, max_sequence_length=a.max_sequence_length,
                guidance=a.embedded_guidance)
    return 0


COMMANDS = {"train-teacher": cmd_train_teacher, "distill": cmd_distill, "sample": cmd_sample, "eval": cmd_eval, "export": cmd_export,
            "ref-stats": cmd_ref_stats, "options": cmd_options, "convert-teacher": cmd_convert_teacher,
            "compare": cmd_compare, "demo": cmd_demo}
COMMANDS.update({"encode-prompts": cmd_encode_prompts, "encode-data": cmd_encode_data})   # latent pipeline


def main(argv=None) -> int:
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
    except OutOfMemoryStop as e:
        print(f"diffdistill: {e}", file=sys.stderr)
        return EXIT_OOM
    except (RuntimeError, MemoryError) as e:  # out of memory outside the training loop (set-up, sampling, eval)
        if not is_out_of_memory(e):
            raise
        print(f"diffdistill: {out_of_memory_message(e)}", file=sys.stderr)
        return EXIT_OOM
    except KeyboardInterrupt:
        print("diffdistill: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading: not an error of ours
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    finally:
        release()   # the one-process group a run.fsdp run made, so a later command in this process starts plain


if __name__ == "__main__":
    sys.exit(main())
