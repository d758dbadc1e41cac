"""The digits teachers shipped in the package are what the project's own presets produce, and they are good:
`teacher_digits` (preset `digits`, unconditional) and `teacher_digits_cond` (preset `digits_cond`: 10 classes,
10 % label dropout, so it can be sampled with classifier-free guidance).

Default suite: the file's recorded recipe equals today's preset (so the preset cannot drift from the shipped
weights), the weights load strictly, and re-measuring the first 594 of its recorded samples gives their known
proxy-FID, within 2× the real-data floor. `-m slow`: the full 2,000-sample re-measure against the recorded numbers,
and retraining the preset from scratch reaches the shipped quality.
"""


import pytest

from diffdistill.config import load_preset, resolve
from diffdistill.demo import SHIPPED_TEACHER
from diffdistill.eval.evaluate import digits_floor_and_ceiling, evaluate_net
from diffdistill.io import load_for_sampling
from diffdistill.methods.registry import get_method

pytestmark = pytest.mark.skipif(not SHIPPED_TEACHER.exists(), reason="no shipped teacher in this checkout")
SHIPPED = {"digits": SHIPPED_TEACHER, "digits_cond": SHIPPED_TEACHER.with_name("teacher_digits_cond.safetensors")}

STABLE_KEYS = ("data", "net", "method")


def _recipe(cfg):
    """The parts of a config that decide the weights; the method section completed with its schema's defaults (a
    file written before an option existed records it as its default)."""
    run = {k: cfg["run"][k] for k in ("steps", "batch_size", "seed")}
    method = dict(cfg["method"])
    name = method.pop("name", "edm")
    return {"run": run, **{k: cfg[k] for k in STABLE_KEYS},
            "method": {"name": name, **get_method(name).Options.from_dict(method).to_dict()}}


@pytest.mark.parametrize("preset", SHIPPED)
def test_shipped_teacher_matches_the_preset(preset):
    net, state = load_for_sampling(SHIPPED[preset])
    assert state["role"] == "teacher" and state["method"] == "edm" and state["preset"] == preset
    assert _recipe(state["config"]) == _recipe(resolve(preset))
    assert state["step"] == load_preset("edm", preset)["run"]["steps"]
    assert net.label_dim == load_preset("edm", preset)["net"]["label_dim"]
    assert SHIPPED[preset].stat().st_size <= 2 * 1024 * 1024


@pytest.mark.slow
@pytest.mark.parametrize("preset", SHIPPED)
def test_shipped_teacher_quality_is_what_it_says(preset):
    net, state = load_for_sampling(SHIPPED[preset])
    rec = state["measured"]
    m = evaluate_net(net, {"sampler": "heun", "nfe": 35}, state["config"]["data"], rec["num_samples"],
                     seed=rec["seed"])
    floor = digits_floor_and_ceiling()["floor_proxy_fid"]
    assert m["proxy_fid"] == pytest.approx(rec["proxy_fid_35nfe"], rel=0.05)
    # same-size comparison with the floor (297 held-out real digits): the teacher is within 2× of real data
    assert m["proxy_fid_n297"] <= 2 * floor, (m["proxy_fid_n297"], floor)
    if net.label_dim:   # conditional correctness (classes seed mod 10), as recorded, and high
        assert m["class_accuracy"] == pytest.approx(rec["class_accuracy_35nfe"], abs=0.01)
        assert m["class_accuracy"] >= 0.9


# Proxy-FID of the first 594 of the recorded 2,000 samples (seeds 0–593, Heun 35 NFE), measured by the code whose
# 2,000-sample re-measure (``-m slow`` above) gives the recorded 4.081609 (file: 4.081604); per 297-sample subset
# the recorded run has 15.16, 18.29 | 18.83, 21.05, 16.57, 12.49 (mean 17.06, the recorded proxy_fid_n297).
FIRST_594_PROXY_FID = 10.3793


def test_shipped_teacher_quality_on_the_first_594_samples():
    """The default suite's re-measure of the unconditional teacher (the 2,000-sample one is ``-m slow``, ≈ 80 s):
    seeds 0–593 are the recorded run's first two 297-sample subsets, so their proxy-FID is a fixed number (above),
    their subset mean is near the recorded six-subset mean (16.72 vs 17.06), and that mean is within 2× the
    real-data floor of the same size (297 held-out real digits)."""
    net, state = load_for_sampling(SHIPPED["digits"])
    rec = state["measured"]
    assert rec["num_samples"] == 2000 and rec["seed"] == 0
    m = evaluate_net(net, {"sampler": "heun", "nfe": 35}, state["config"]["data"], 594, seed=0)
    assert m["proxy_fid"] == pytest.approx(FIRST_594_PROXY_FID, rel=0.05)
    assert m["proxy_fid_n297"] == pytest.approx(rec["proxy_fid_n297_35nfe"], rel=0.1)
    floor = digits_floor_and_ceiling()["floor_proxy_fid"]
    assert m["proxy_fid_n297"] <= 2 * floor, (m["proxy_fid_n297"], floor)


def test_shipped_conditional_teacher_gives_the_requested_digit():
    """The default suite's quick check of the conditional teacher (the full re-measurement is ``-m slow``): 200
    samples, classes seed mod 10, class accuracy ≥ 90 % unguided, and guidance raises it at the cost of the
    within-class spread."""
    net, _ = load_for_sampling(SHIPPED["digits_cond"])
    plain = evaluate_net(net, {"sampler": "heun", "nfe": 35}, {"name": "digits"}, 200, seed=0)
    guided = evaluate_net(net, {"sampler": "heun", "nfe": 35, "guidance": 2.0}, {"name": "digits"}, 200, seed=0)
    assert plain["class_accuracy"] >= 0.9 and guided["class_accuracy"] > plain["class_accuracy"], (plain, guided)
    # within each class as varied as the real digits of that class (measured 0.995), and guidance trades that
    # variety for correctness (0.85 at w = 2)
    assert 0.8 < plain["cond_spread"] < 1.2 and guided["cond_spread"] < plain["cond_spread"] - 0.05
    assert guided["cond_recall"] < plain["cond_recall"]


@pytest.mark.slow
def test_retraining_the_preset_reaches_the_shipped_quality(tmp_path):
    from diffdistill.train.trainer import Trainer
    _, state = load_for_sampling(SHIPPED_TEACHER)
    cfg = resolve("digits", flags={"run": {"out": str(tmp_path), "progress": False, "sample_every": 0}})
    tr = Trainer(cfg)
    tr.run()
    m = evaluate_net(tr.method.sampling_net(), {"sampler": "heun", "nfe": 35}, cfg["data"], 2000, seed=0)
    assert m["proxy_fid"] <= 1.5 * state["measured"]["proxy_fid_35nfe"] + 0.1
