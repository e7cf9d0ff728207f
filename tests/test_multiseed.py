"""All seeds of a toy config trained together: bitwise the single-seed runs, exact resume, layout."""
import os

import jax
import numpy as np
import pytest

from moe_grok.studies import toy_run
from moe_grok.training import loop, multiseed
from moe_grok.training.checkpointing import RunCheckpoints

from training_helpers import StepRecorder, metrics_without_time, tiny_config


def _final_params(workdir):
    sources = toy_run.run_checkpoint_sources(workdir)
    return sources[-1].step, sources[-1].load()[1]


@pytest.fixture(scope="module")
def recorded_two_seeds(tmp_path_factory):
    """Seeds 3 and 1 trained together for 20 steps, with a user callback every 5 steps (between the evaluations:
    the seeds' threads stop there too)."""
    config = tiny_config(steps=20)
    workdir = str(tmp_path_factory.mktemp("multi"))
    recorder = StepRecorder(every_steps=5)
    return config, workdir, multiseed.train(config, workdir, [3, 1], progress=False, callbacks=[recorder]), recorder


@pytest.fixture(scope="module")
def two_seeds(recorded_two_seeds):
    return recorded_two_seeds[:3]


def test_user_callback_sees_every_seed_at_its_cadence(recorded_two_seeds):
    _, _, seed_dirs, recorder = recorded_two_seeds
    for seed, seed_dir in zip((3, 1), seed_dirs, strict=True):
        calls = [call for call in recorder.calls if call[0] == seed]
        assert [call[1] for call in calls] == [0, 5, 10, 15, 20]
        final = toy_run.run_checkpoint_sources(seed_dir)[-1].load()[1]["embed"]["embedding"]
        assert calls[-1][2] == float(np.sum(np.asarray(final, np.float64)))  # the seed's own params
    assert len(recorder.calls) == 10


def test_seed_of_a_multiseed_run_equals_its_single_seed_run(two_seeds, tmp_path):
    config, _, seed_dirs = two_seeds
    assert [os.path.basename(d) for d in seed_dirs] == ["seed_3", "seed_1"]
    single = config.copy_and_resolve_references()
    single.train.seed = 1
    loop.train(single, str(tmp_path / "single"), progress=False)
    assert metrics_without_time(seed_dirs[1]) == metrics_without_time(str(tmp_path / "single"))
    step, params = _final_params(seed_dirs[1])
    reference_step, reference = _final_params(str(tmp_path / "single"))
    assert step == reference_step == 20
    jax.tree.map(np.testing.assert_array_equal, params, reference)
    # The two seeds really differ (init and minibatches): the comparison above is not vacuous.
    other = _final_params(seed_dirs[0])[1]
    assert not np.array_equal(other["embed"]["embedding"], params["embed"]["embedding"])


def test_multiseed_resume_after_kill_is_exact(two_seeds, tmp_path):
    config, reference, _ = two_seeds
    workdir = str(tmp_path / "killed")
    multiseed.train(config, workdir, [3, 1], stop_at=10, progress=False)
    assert RunCheckpoints(multiseed.seed_workdir(workdir, 1)).steps() == [0, 10]
    multiseed.train(config, workdir, [3, 1], progress=False)
    for seed in (3, 1):
        resumed, uninterrupted = multiseed.seed_workdir(workdir, seed), multiseed.seed_workdir(reference, seed)
        assert metrics_without_time(resumed) == metrics_without_time(uninterrupted)
        jax.tree.map(np.testing.assert_array_equal, _final_params(resumed)[1], _final_params(uninterrupted)[1])


def test_seeds_resume_from_the_state_they_all_have(two_seeds, tmp_path):
    """A kill between two seeds' saves leaves one seed a checkpoint ahead: both resume from the
    older state, and the result is still the uninterrupted run."""
    import shutil

    config, reference, _ = two_seeds
    workdir = str(tmp_path / "uneven")
    multiseed.train(config, workdir, [3, 1], stop_at=20, progress=False)
    behind = multiseed.seed_workdir(workdir, 1)
    for name in ("train_state", "checkpoints"):
        shutil.rmtree(os.path.join(behind, name, "20"))
    with open(os.path.join(behind, "metrics.jsonl")) as f:
        rows = f.readlines()
    with open(os.path.join(behind, "metrics.jsonl"), "w") as f:
        f.writelines(rows[:-1])
    multiseed.train(config, workdir, [3, 1], progress=False)
    for seed in (3, 1):
        assert metrics_without_time(multiseed.seed_workdir(workdir, seed)) == \
            metrics_without_time(multiseed.seed_workdir(reference, seed))


def test_other_seeds_on_a_multiseed_workdir_are_refused(two_seeds):
    config, workdir, _ = two_seeds
    with pytest.raises(ValueError, match=r"train\.seed: \[3, 1\] -> \[3, 1, 2\]"):
        multiseed.train(config, workdir, [3, 1, 2], progress=False)
    with pytest.raises(ValueError, match="distinct"):
        multiseed.train(config, workdir, [1, 1], progress=False)


def test_seed_directories_are_single_seed_runs(two_seeds):
    """Each seed_<s> is a complete single-seed run: the analysis reads it, and resuming it alone
    (same identity, more steps) continues it."""
    config, _, seed_dirs = two_seeds
    assert [s.step for s in toy_run.run_checkpoint_sources(seed_dirs[0])] == [0, 10, 20]
    single = config.copy_and_resolve_references()
    single.train.seed = 3
    assert loop.train(single, seed_dirs[0], progress=False)["step"] == 20  # finished: nothing to do
