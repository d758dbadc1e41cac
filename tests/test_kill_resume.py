"""Kill -9 at a random step, resume with --resume auto, and get the uninterrupted run's final state bit for bit.

Each case starts ``python -m diffdistill.cli distill`` (2-D ring8 teacher, small MLP, a checkpoint every 7 steps,
the log written every step) as a subprocess, SIGKILLs it once the log passes a random step after the first
checkpoint, resumes in-process with the same command plus ``--resume auto``, and compares every tensor of the final
checkpoint (nets, optimizers, schedulers, EMA / stage state, RNG, step) with an uninterrupted run. One case also
truncates the newest checkpoint the killed run left: resume must skip it, say so, and still end identical.
``benchmarks/kill_resume.py`` runs 10 repetitions per method. Adding a method = one word in METHODS (and its small
settings in helpers/kill_resume.METHOD_ARGS).
"""

import random

import pytest

from helpers.kill_resume import kill_and_resume, make_teacher, reference_run, registered

METHODS = ["dmd2", "sid", "pd"]
# (method, repetition seed, truncate the newest checkpoint before resuming)
CASES = [("dmd2", 0, False), ("dmd2", 1, True), ("sid", 2, False), ("pd", 3, False)]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_teacher(tmp_path_factory.mktemp("kr_teacher"))


@pytest.fixture(scope="module")
def references(teacher, tmp_path_factory):
    root, cache = tmp_path_factory.mktemp("kr_reference"), {}

    def get(method):
        if method not in cache:
            cache[method] = reference_run(method, teacher, root / method)
        return cache[method]
    return get


@pytest.mark.timeout(240)
@pytest.mark.parametrize("method,seed,corrupt", [c for c in CASES if c[0] in METHODS],
                         ids=[f"{m}-rep{s}{'-corrupt-newest' if c else ''}" for m, s, c in CASES if m in METHODS])
def test_sigkill_then_resume_auto_is_bitwise_identical(method, seed, corrupt, teacher, references, tmp_path):
    if not registered(method):
        pytest.skip(f"method {method!r} is not registered yet")
    info = kill_and_resume(method, teacher, tmp_path / "run", random.Random(seed), references(method),
                           corrupt_newest=corrupt)
    assert info.get("killed_at") is not None, info
    assert info["rc_killed"] == -9 and info["checkpoints_left"], info
    assert info["rc_resume"] == 0, info["stderr_resume"]
    assert "Traceback" not in info["stderr_resume"]
    assert info["resumed_from"] is not None and info["resumed_from"] <= info["killed_at"], info
    if corrupt:  # the truncated newest checkpoint is skipped loudly, the one before it is used
        assert info["skipped_warning"], info
        assert f"ckpt-{info['resumed_from']:08d}.pt" != info["corrupted"], info
    assert info["differences"] == [], info["differences"][:10]
