"""Gradient accumulation (``run.grad_accum``): k micro-batches of B/k end on the parameters of one batch of B.

Float64 throughout (tiny MLP denoisers on 2-D points): 3 iterations with grad_accum = 1 at batch B against
grad_accum = k at batch B, for every method whose losses sum over samples — TTUR phases, the GAN terms, EMA copies,
optimizer and scheduler states and the embedding loss's MMD (gradient caching) included — equal to round-off
(1e-10 relative; measured 1e-16 … 1e-12). The networks really ran on micro-batches (their largest training forward
is B/k samples), the generator's RNG stream ends where the single-batch run's ends, and the methods whose losses
couple a batch's samples are refused with one line saying why.
"""

import json
import math
import re

import pytest
import torch
from helpers.dm_helpers import MLP_CFG, flat_tensors, tiny_teacher

from diffdistill.config import validate_run
from diffdistill.data import dataset_from_config
from diffdistill.errors import UserError
from diffdistill.methods.draws import Draws
from diffdistill.methods.embedding_loss import EmbeddingLoss
from diffdistill.train.trainer import Trainer

CFD_MLP = "helpers.pd_helpers:random_points_mlp"


def _ring8(n=256, num_classes=0):
    ds = dataset_from_config({"name": "ring8", "n": n, "seed": 0})
    ds.x = ds.x.to(torch.get_default_dtype())
    if num_classes:   # labels for class-conditional teacher training (label dropout)
        ds.labels, ds.num_classes = torch.arange(n) % num_classes, num_classes
    return ds


def _trainer(out, method, k, *, batch=8, steps=3, distil=True, label_dim=0, data=True, net=None, el=None,
             run=None, data_classes=0, **opts):
    """A Trainer of ``method`` on a tiny MLP (a random teacher for distillations), built in the default dtype."""
    teacher, cfg = tiny_teacher(MLP_CFG, label_dim=label_dim) if distil else (None, dict(MLP_CFG))
    cfg = {**cfg, **(net or {})}
    run = validate_run({"out": str(out), "steps": steps, "batch_size": batch, "log_every": 1, "ckpt_every": 0,
                        "sample_every": 0, "progress": False, "seed": 0, "grad_accum": k, **(run or {})})
    full = {"run": run, "data": {"name": "ring8", "n": 256, "seed": 0} if data else {}, "net": cfg,
            "method": {"name": method, **opts}}
    supplements = [EmbeddingLoss(**el)] if el is not None else []
    tr = Trainer(full, teacher=teacher, teacher_path="mem" if distil else None,
                 dataset=_ring8(num_classes=data_classes) if data else None,
                 supplements=supplements)
    tr.start_check = lambda *a, **kw: None   # sampling health check: not what is tested, and slow
    return tr


def _flat(obj, prefix=""):
    return flat_tensors(obj, prefix, numbers=True)


def _state(tr) -> dict:
    """Every tensor and number of the method's state (nets, EMA copies, optimizer and scheduler states, extra
    state) and of the supplements."""
    return {**_flat(tr.method.state_dict(), "method"),
            **_flat({s.name: s.state_dict() for s in tr.supplements}, "supplements")}


def _largest_training_forward(tr) -> list:
    """Records the batch of every forward of a trained network with autograd on (the passes whose activations are
    kept for backward)."""
    sizes = []
    trained = {id(p) for opt in tr.method.optimizers.values() for g in opt.param_groups for p in g["params"]}
    for net in tr.method.nets.values():
        if any(id(p) in trained for p in net.parameters()):
            net.register_forward_pre_hook(lambda m, args: sizes.append(len(args[0])) if torch.is_grad_enabled()
                                          else None)
    return sizes


PAIRS = dict(num_pairs=16, pairs_chunk=16, heun_steps=2)
CASES = {
    "dmd": dict(method="dmd", data=False, label_dim=3, lr=1e-3, warmup_steps=0, **PAIRS),
    "dmd2_ttur_gan": dict(method="dmd2", lr=1e-3, warmup_steps=0, dfake_gen_update_ratio=2, gan_weight=0.05,
                          gan_critic_weight=0.1, ema_halflife_kimg=0.01),
    "dmd2_multistep_conditional": dict(method="dmd2", data=False, label_dim=3, lr=1e-3, warmup_steps=0,
                                       dfake_gen_update_ratio=2, gan_weight=0.0, student_steps=3, k=3, batch=12),
    "diff_instruct": dict(method="diff_instruct", data=False, label_dim=3, lr=1e-3, ema_halflife_kimg=0.01),
    "sid": dict(method="sid", data=False, lr=1e-3, ema_halflife_kimg=0.01, k=4),
    "cd": dict(method="cd", lr=1e-3, target_ema=0.5, ema_beta_const=0.9),
    "pd": dict(method="pd", lr=1e-3, start_steps=4, iters_per_halving=2),
    "cfd": dict(method="cfd", lr=1e-3, start_steps=4, iters_per_halving=2, classifier=CFD_MLP, beta=0.1, gamma=1.0),
    "edm": dict(method="edm", distil=False, lr=1e-2, warmup_steps=0, ema_halflife_kimg=0.01),
    "edm_label_dropout": dict(method="edm", distil=False, net={"label_dim": 3}, data_classes=3, lr=1e-2,
                              warmup_steps=0, label_dropout=0.3),
    "dmd_guided": dict(method="dmd", data=False, label_dim=3, lr=1e-3, warmup_steps=0, guidance_real=2.0, **PAIRS),
    "dmd2_guided": dict(method="dmd2", data=False, label_dim=3, lr=1e-3, warmup_steps=0, gan_weight=0.0,
                        guidance_real=1.75, guidance_fake=0.5),
    "sid_lsg": dict(method="sid", data=False, label_dim=3, lr=1e-3, guidance_real=2.0, guidance_fake=1.5,
                    guidance_fake_train=2.0),
    "flow": dict(method="flow", distil=False, net={"precond": "flow"}, lr=1e-2, warmup_steps=0,
                 ema_halflife_kimg=0.01, k=4),
    "dmd2_el": dict(method="dmd2", lr=1e-3, warmup_steps=0, dfake_gen_update_ratio=2, gan_weight=0.05,
                    el={"ratio_every": 1}),
    "diff_instruct_el_fixed": dict(method="diff_instruct", lr=1e-3, el={"mode": "fixed", "weight": 0.3}),
    "cd_el": dict(method="cd", lr=1e-3, el={"ratio_every": 2}),   # EL's samples: a fresh draw after the loss
}


@pytest.mark.parametrize("case", list(CASES))
def test_micro_batches_give_the_parameters_of_one_batch(float64, tmp_path, case):
    kw = dict(CASES[case])
    k, method = kw.pop("k", 2), kw.pop("method")
    one = _trainer(tmp_path / "one", method, 1, **kw)
    acc = _trainer(tmp_path / "acc", method, k, **kw)
    start = {n: v.clone() for n, v in _state(one).items()}
    sizes_one, sizes_acc = _largest_training_forward(one), _largest_training_forward(acc)
    one.run()
    acc.run()
    a, b = _state(one), _state(acc)
    assert list(a) == list(b)
    for n, v in a.items():
        if not v.is_floating_point():
            assert torch.equal(v, b[n]), n
            continue
        err = float((v - b[n]).abs().max()) / max(float(v.abs().max()), 1e-300)
        assert err < 1e-10, (case, n, err)
    for part in ("nets",) + (("emas",) if any(".emas." in n for n in a) else ()):
        moved = [n for n, v in start.items() if f".{part}." in n and v.is_floating_point()
                 and not torch.equal(v, a[n])]
        assert moved, f"training changed no {part}: the comparison would be vacuous"
    assert any(".optimizers." in n and n.endswith(("exp_avg", "exp_avg_sq")) for n in a)   # Adam moments compared
    # the losses ran on micro-batches of B/k, and the generator's stream ends where the one-batch run's does
    assert sizes_one and max(sizes_acc) * k == max(sizes_one), (max(sizes_one), max(sizes_acc))
    assert torch.equal(one.gen.get_state(), acc.gen.get_state())
    # the logged losses are the micro-batches' mean: the batch's loss
    log_one = (tmp_path / "one" / "log.jsonl").read_text().splitlines()
    log_acc = (tmp_path / "acc" / "log.jsonl").read_text().splitlines()
    assert len(log_one) == len(log_acc) == 3
    for ra, rb in zip(map(json.loads, log_one), map(json.loads, log_acc)):
        assert set(ra) == set(rb)
        for key in ra:
            if key.startswith(("loss/", "grad_norm/")):
                assert math.isclose(ra[key], rb[key], rel_tol=1e-6, abs_tol=1e-9), (key, ra[key], rb[key])
    if kw.get("el"):   # the gradient-norm ratio was measured (under accumulation: from the summed gradients)
        assert "supplements.el.last_ratio" in b and float(b["supplements.el.last_ratio"]) > 0


def test_resume_under_accumulation_is_exact(float64, tmp_path):
    """A checkpoint between steps holds no accumulation state: stop at 2, resume to 4 = 4 uninterrupted."""
    kw = dict(lr=1e-3, warmup_steps=0, dfake_gen_update_ratio=2, gan_weight=0.05)
    full = _trainer(tmp_path / "full", "dmd2", 2, steps=4, **kw)
    full.run()
    _trainer(tmp_path / "split", "dmd2", 2, steps=2, **kw).run()
    resumed = _trainer(tmp_path / "split", "dmd2", 2, steps=4, run={"resume": "auto"}, **kw)
    resumed.run()
    a, b = _state(full), _state(resumed)
    for n, v in a.items():
        assert torch.equal(v, b[n]), n


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("method,opts,said", [
    ("rdd", dict(start_steps=4, iters_per_halving=2, classifier=CFD_MLP), "relational losses compare every pair"),
    ("cfd", dict(start_steps=4, iters_per_halving=2, classifier=CFD_MLP, beta=0.1, gamma=0.75),
     "diversity term"),
    ("sid", dict(sida=True), "SiDA's GAN losses multiply batch means"),
])
def test_batch_coupled_methods_refuse_accumulation(tmp_path, method, opts, said):
    import diffdistill.methods.rdd  # noqa: F401  (registers cfd and rdd)
    with pytest.raises(UserError) as e:
        _trainer(tmp_path / method, method, 2, **opts)
    msg = str(e.value)
    assert "\n" not in msg and f"run.grad_accum=2 is refused for method {method!r}" in msg and said in msg, msg
    assert msg.endswith("run.activation_checkpointing also lower memory)"), msg
    assert not (tmp_path / method).exists()
    _trainer(tmp_path / f"{method}1", method, 1, steps=1, **opts)   # the same options build with grad_accum=1


def test_indivisible_batch_and_regression_minibatch_are_refused(tmp_path):
    with pytest.raises(UserError, match=r"run.grad_accum=3 does not divide the per-process batch 8 into equal "
                                        r"micro-batches: use a batch that is a multiple of 3 \(e.g. 6 or 9\) or a "
                                        r"run.grad_accum that divides 8 \(2, 4, 8\)$"):
        _trainer(tmp_path / "a", "edm", 3, distil=False)
    with pytest.raises(UserError, match=r"method.reg_batch_size=5 is not divisible by run.grad_accum=2"):
        _trainer(tmp_path / "b", "dmd", 2, data=False, reg_batch_size=5, **PAIRS)
    with pytest.raises(UserError, match=r"run.grad_accum must be >= 1"):
        _trainer(tmp_path / "c", "edm", 0, distil=False)
    assert not any((tmp_path / n).exists() for n in "abc")


# ------------------------------------------------------------------------------------------------ the draws
def test_draws_pass_through_without_accumulation():
    """k = 1 (and outside an accumulated phase): every draw is the plain torch call on the generator."""
    d, g = Draws(torch.Generator().manual_seed(3)), torch.Generator().manual_seed(3)
    assert torch.equal(d.randn((5, 2)), torch.randn((5, 2), generator=g))
    assert torch.equal(d.randint(7, 4), torch.randint(7, (4,), generator=g))
    assert torch.equal(d.randint(9, 3, low=2), torch.randint(2, 9, (3,), generator=g))
    assert d.shared(lambda gen: int(torch.randint(5, (1,), generator=gen))) == int(torch.randint(5, (1,), generator=g))
    assert torch.equal(d.generator.get_state(), g.get_state())


def test_draws_hand_each_micro_batch_its_rows_of_the_batch():
    k, n = 3, 2
    d, g = Draws(torch.Generator().manual_seed(0), k), torch.Generator().manual_seed(0)
    full_noise = torch.randn((k * n, 2), generator=g)
    full_idx = torch.randint(10, (k * n,), generator=g)
    shared = int(torch.randint(4, (1,), generator=g))
    full_pair = torch.randn((2 * k * n,), generator=g)   # one draw for cat([real, generated])
    d.begin(k)
    for j in range(k):
        d.micro(j)
        rows = slice(j * n, (j + 1) * n)
        assert torch.equal(d.randn((n, 2)), full_noise[rows])
        assert torch.equal(d.randint(10, n), full_idx[rows])
        assert d.shared(lambda gen: int(torch.randint(4, (1,), generator=gen))) == shared
        pair = d.per_sample(2 * n, lambda m, gen: torch.randn((m,), generator=gen), groups=2)
        assert torch.equal(pair, torch.cat([full_pair[rows], full_pair[k * n:][rows]]))
    d.end()
    assert torch.equal(d.generator.get_state(), g.get_state())       # the batch's stream, consumed once
    assert d.parts == 1 and d.share(8) == 8


def test_draws_that_differ_between_micro_batches_are_a_bug():
    d = Draws(torch.Generator().manual_seed(0), 2)
    d.begin(2)
    d.micro(0)
    d.randn((2, 2))
    d.micro(1)
    with pytest.raises(RuntimeError, match="is \\('rows', 3, 1\\), the first micro-batch's was \\('rows', 2, 1\\)"):
        d.randn((3, 2))
    d.begin(2)
    d.micro(0)
    d.randn((2, 2))
    d.micro(1)
    with pytest.raises(RuntimeError, match="micro-batch 1 made 0 random draws, the first made 1"):
        d.end()
    with pytest.raises(UserError, match=r"the batch \(5\) is not divisible by run.grad_accum=2"):
        d.begin(2)
        d.share(5)


# ------------------------------------------------------------------------------------------------ memory plan
def test_dry_run_estimates_the_activations_of_one_micro_batch(tmp_path):
    """--dry-run's activations under grad_accum = 4 at batch 64 are those of batch 16 (what one micro-batch
    keeps); weights and optimizer state do not change."""
    from diffdistill.train.memory import dry_run_report, estimate_memory
    kw = dict(lr=1e-3, gan_weight=0.05)
    tr = _trainer(tmp_path / "a", "dmd2", 4, batch=64, **kw)
    acc = estimate_memory(tr)
    small = estimate_memory(_trainer(tmp_path / "b", "dmd2", 1, batch=16, **kw))
    whole = estimate_memory(_trainer(tmp_path / "c", "dmd2", 1, batch=64, **kw))
    assert set(acc["activations"]) == {"generator", "critic"}
    for ph in acc["activations"]:
        assert acc["activations"][ph] == small["activations"][ph] < whole["activations"][ph] / 2, ph
    assert acc["weights"] == whole["weights"] and acc["optimizer_state"] == whole["optimizer_state"]
    report = dry_run_report(tr)
    assert re.search(r"peak memory estimate per process at batch 64 as 4 micro-batches of 16 \(run.grad_accum; "
                     r"activations of one\):", report), report


def test_out_of_memory_advice_names_accumulation():
    from diffdistill.train.health import memory_knobs
    assert "--set run.grad_accum=k" in memory_knobs()
