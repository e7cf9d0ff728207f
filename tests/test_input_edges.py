"""Issue 35, inputs at the edges: every bad data file, checkpoint spec, config value or array that used to
give a silently wrong result or an unnamed traceback is named (file, line, option or spec) before any
work starts, or gives a correct result. Each test failed on the code before the fix."""
import gzip
import json
import logging
import os

import jax
import numpy as np
import pytest

from moe_grok.analysis.options import AnalysisOptions, analysis_config
from moe_grok.checkpoints import sources as sources_lib
from moe_grok.config import toy
from moe_grok.data import corpus, tasks
from moe_grok.data.splits import EvalSplit, next_token_targets
from moe_grok.extraction.routing import extract_dataset
from moe_grok.model import checkpoint_io
from moe_grok.model import params as params_lib
from moe_grok.sharding import make_mesh
from moe_grok.studies import olmoe_run, toy_bounds
from moe_grok.theory.synthetic_run import SyntheticConfig, synthetic_config
from moe_grok.training import loop, multiseed

from config_files import load_config


def _write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return str(path)


def _ids_records(rng, n, vocab=50, length=6):
    return [{"input_ids": rng.integers(2, vocab, length).tolist()} for _ in range(n)]


@pytest.fixture(scope="module")
def toy_model():
    """A tiny toy MoEConfig (vocab 16) and its random params: enough for extract_dataset."""
    model_config = toy(vocab_size=16, num_layers=2, hidden_size=16, head_dim=8, num_heads=2, num_kv_heads=2,
                       num_experts=4, moe_impl="dense")
    params = jax.jit(params_lib.init_params, static_argnums=0)(model_config, jax.random.key(0))
    return model_config, params


# ----------------------------------------------------------------------------------------
# Case 2: the same data file listed twice; repeated samples inside a file are counted
# ----------------------------------------------------------------------------------------
def test_data_file_listed_twice_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    math = _write_jsonl(tmp_path / "math.jsonl", _ids_records(rng, 4))
    code = _write_jsonl(tmp_path / "code.jsonl", _ids_records(rng, 4))
    with pytest.raises(ValueError, match=r"math\.jsonl' is listed twice"):
        corpus.load_jsonl_ids([math, math, code], 8, groups_from_files=True)
    # Under two spellings too (./ in the path).
    other_spelling = os.path.join(str(tmp_path), ".", "math.jsonl")
    with pytest.raises(ValueError, match="listed twice"):
        corpus.load_jsonl_ids([math, code, other_spelling], 8, groups_from_files=True)


def test_repeated_samples_in_a_file_are_counted(tmp_path, caplog):
    rng = np.random.default_rng(0)
    records = _ids_records(rng, 3)
    path = _write_jsonl(tmp_path / "math.jsonl", records + [records[0], records[2]])
    with caplog.at_level(logging.WARNING):
        split, info = corpus.load_jsonl_ids(path, 8, groups_from_files=True, return_info=True)
    assert len(split) == 5  # kept: the data is the user's
    assert info.n_duplicates == 2
    assert "2 sample(s) repeat an earlier sample" in caplog.text
    assert "math.jsonl:line 4 = " in caplog.text


# ----------------------------------------------------------------------------------------
# Case 3: a sample without a scored position (one real token) in a user-built EvalSplit
# ----------------------------------------------------------------------------------------
def test_sample_without_a_scored_position_is_refused():
    tokens = np.array([[5, 6, 7, 1], [5, 1, 1, 1], [4, 3, 1, 1]], np.int32)
    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]], np.int32)
    with pytest.raises(ValueError, match=r"sample\(s\) \[1\] .*group\(s\) \['b'\].*no scored position"):
        EvalSplit(tokens, mask, *next_token_targets(tokens, mask), np.array([0, 1, 1]), ("a", "b"))


# ----------------------------------------------------------------------------------------
# Cases 4 and 18: extract_dataset's targets
# ----------------------------------------------------------------------------------------
def test_negative_or_too_large_scored_targets_are_refused(toy_model):
    model_config, params = toy_model
    tokens = np.array([[3, 4, 5, 6], [7, 8, 9, 10]], np.int32)
    targets, target_mask = next_token_targets(tokens, np.ones_like(tokens))
    for bad in (-1, -100, 16):
        wrong = targets.copy()
        wrong[1, 0] = bad
        with pytest.raises(ValueError, match=rf"samples \[1\].*\[{bad}\].*target_mask to 0"):
            extract_dataset(model_config, params, tokens, None, wrong, target_mask, progress=False)
    # HF's ignore label at an unscored position is fine: the loss equals the one without it.
    ignored = targets.copy()
    ignored[:, -1] = -100  # target_mask is 0 there
    with_ignore = extract_dataset(model_config, params, tokens, None, ignored, target_mask, progress=False)
    plain = extract_dataset(model_config, params, tokens, None, targets, target_mask, progress=False)
    np.testing.assert_array_equal(with_ignore["loss"], plain["loss"])


def test_targets_without_target_mask_are_refused(toy_model):
    model_config, params = toy_model
    tokens = np.array([[3, 4, 5, 6]], np.int32)
    targets, target_mask = next_token_targets(tokens, np.ones_like(tokens))
    with pytest.raises(ValueError, match="targets given without target_mask"):
        extract_dataset(model_config, params, tokens, targets=targets, progress=False)
    with pytest.raises(ValueError, match="target_mask given without targets"):
        extract_dataset(model_config, params, tokens, target_mask=target_mask, progress=False)


def test_negative_max_pairs_is_refused_and_zero_means_all_pairs():
    assert AnalysisOptions.from_config(analysis_config(max_pairs=0)).max_pairs is None  # documented: all pairs
    with pytest.raises(ValueError, match="max_pairs must be >= 1 or None, got -5"):
        AnalysisOptions.from_config(analysis_config(max_pairs=-5))


# ----------------------------------------------------------------------------------------
# Case 5: a validation file whose stem matches no domain
# ----------------------------------------------------------------------------------------
def test_validation_domain_matching_no_training_domain_is_refused(caplog):
    with pytest.raises(ValueError, match=r"'maths' \(did you mean 'math'\?\) match no training domain"):
        olmoe_run.check_validation_domains(("math", "code"), ("maths", "code"), "val/maths.jsonl,val/code.jsonl")
    with caplog.at_level(logging.WARNING):
        olmoe_run.check_validation_domains(("math", "code"), ("code",), "val/code.jsonl")
    assert "no sample of domain(s) ['math']" in caplog.text


# ----------------------------------------------------------------------------------------
# Cases 7 and 15: checkpoint specs
# ----------------------------------------------------------------------------------------
def test_one_checkpoint_under_two_steps_is_refused(tmp_path):
    ckpt = tmp_path / "ckpt" / "step1000"
    ckpt.mkdir(parents=True)
    with pytest.raises(ValueError, match=r"'.*step1000=1000' and '.*step1000=2000' name the same checkpoint"):
        sources_lib.checkpoint_sources([f"{ckpt}=1000", f"{ckpt}=2000"])
    with pytest.raises(ValueError, match="name the same checkpoint"):
        sources_lib.checkpoint_sources([str(ckpt), f"{tmp_path}/ckpt/./step1000=2000"])
    with pytest.raises(ValueError, match="name the same checkpoint"):
        sources_lib.checkpoint_sources(["org/model@step5", "org/model@step5=6"])
    # Two revisions of one repo are two checkpoints.
    assert [s.step for s in sources_lib.checkpoint_sources(["org/model@step5", "org/model@step6"])] == [5, 6]


@pytest.mark.parametrize("spec", ["ckpt/step1000=abc", "ckpt/step1000=-5", "ckpt/x=", "=5"])
def test_bad_step_in_a_spec_is_named_before_any_checkpoint(spec):
    with pytest.raises(ValueError, match=rf"checkpoint spec '{spec}'"):
        sources_lib.checkpoint_sources([spec])


# ----------------------------------------------------------------------------------------
# Case 13: undecodable data files
# ----------------------------------------------------------------------------------------
def test_undecodable_jsonl_files_are_named(tmp_path):
    rng = np.random.default_rng(0)
    good = _write_jsonl(tmp_path / "good.jsonl", _ids_records(rng, 3))
    with open(good, "rb") as f:
        raw = f.read()
    lines = raw.split(b"\n")
    lines[1] = lines[1][:-1] + b' , "note": "caf\xe9"}'  # latin-1 byte in line 2
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b"\n".join(lines))
    with pytest.raises(ValueError, match=r"latin1\.jsonl:line 2: not UTF-8 text \(byte 0xe9"):
        corpus.load_jsonl_ids(str(bad), 8, groups_from_files=True)

    compressed = gzip.compress(raw)
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(ValueError, match=r"cut\.jsonl\.gz: truncated gzip file"):
        corpus.load_jsonl_ids(str(truncated), 8, groups_from_files=True)

    plain = tmp_path / "plain.jsonl.gz"
    plain.write_bytes(raw)
    with pytest.raises(ValueError, match=r"plain\.jsonl\.gz: not a valid gzip file"):
        corpus.load_jsonl_ids(str(plain), 8, groups_from_files=True)


# ----------------------------------------------------------------------------------------
# Case 17: verify_theory's toy.samples
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("samples", [0, -3])
def test_verify_theory_samples_must_be_positive(tmp_path, samples):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=rf"toy\.samples must be a positive integer.*got {samples}"):
        toy_bounds.run(str(tmp_path / "no-run"), str(out), samples, SyntheticConfig.from_config(synthetic_config()))
    assert not out.exists()


# ----------------------------------------------------------------------------------------
# Case 12: a toy config is validated whole before anything is written
# ----------------------------------------------------------------------------------------
def _toy_config(**task_or_model):
    config = load_config("toy_grokking")
    config.train.steps = 2
    for key, value in task_or_model.items():
        section, name = key.split("__")
        config[section][name] = value
    return config


@pytest.mark.parametrize("changes, match", [
    (dict(task__p=3, task__train_fraction=0.9),
     r"invalid config\.task: .*operation 'add': p=3 gives 9 pairs, train_fraction=0\.9 .*empty validation split"
     r".*task\.p.*task\.train_fraction"),
    (dict(model__num_layers=0), r"invalid config\.model: .*num_layers=0 must be a positive integer"),
    (dict(model__num_experts=0), r"invalid config\.model: .*num_experts=0 must be a positive integer"),
])
def test_bad_toy_config_is_refused_before_anything_is_written(tmp_path, changes, match):
    config = _toy_config(**changes)
    for name, train in (("single", lambda d: loop.train(config, d, progress=False)),
                        ("multiseed", lambda d: multiseed.train(config, d, [0, 1], progress=False))):
        workdir = tmp_path / name
        with pytest.raises(ValueError, match=match):
            train(str(workdir))
        assert not workdir.exists() or not os.listdir(workdir), os.listdir(workdir)  # no run.json: a fix re-runs


def test_evaluation_splits_name_the_empty_split():
    data = tasks.make_dataset(tasks.TaskSpec(p=3, ops=("add", "mul"), train_fraction=(0.5, 0.9)))
    with pytest.raises(ValueError, match=r"operation 'mul'.*empty validation split"):
        tasks.evaluation_splits(data)


# ----------------------------------------------------------------------------------------
# Case 14: a mesh whose expert axis does not divide the experts
# ----------------------------------------------------------------------------------------
def test_expert_axis_that_does_not_divide_the_experts_is_named(tmp_path, toy_model):
    model_config, params = toy_model  # 4 experts
    ckpt = tmp_path / "step100"
    checkpoint_io.save_params(str(ckpt), model_config, params)
    mesh = make_mesh(data=1, expert=3)
    match = r"mesh\.expert=3 does not divide num_experts=4 of .*step100.*use one of \[1, 2, 4\]"
    with pytest.raises(ValueError, match=match):
        sources_lib.load_checkpoint(str(ckpt), None, "float32", mesh)
    source = sources_lib.checkpoint_sources([str(ckpt)], dtype="float32", mesh=mesh)[0]
    with pytest.raises(ValueError, match=match):
        olmoe_run.check_mesh_fits(mesh, source)  # run() calls it before the pipeline starts
    # A dividing axis loads.
    loaded_config, _ = sources_lib.load_checkpoint(str(ckpt), None, "float32", make_mesh(data=1, expert=2))
    assert loaded_config.num_experts == 4


# ----------------------------------------------------------------------------------------
# Case 16: token ids the checkpoint cannot embed, named with file and sample before it loads
# ----------------------------------------------------------------------------------------
@pytest.fixture
def olmoe_config(tmp_path, toy_model):
    """An olmoe_grokking config over a moe_grok checkpoint of the toy model (vocab 16) and two
    pre-tokenized JSONL domains; the second line of code.jsonl holds id 40."""
    model_config, params = toy_model
    ckpt = tmp_path / "ckpt"
    checkpoint_io.save_params(str(ckpt), model_config, params)
    math = _write_jsonl(tmp_path / "math.jsonl", [{"input_ids": [2, 3, 4, 5]}, {"input_ids": [5, 6, 7]}])
    code = _write_jsonl(tmp_path / "code.jsonl", [{"input_ids": [8, 9, 10]}, {"input_ids": [11, 40, 12]}])
    config = load_config("olmoe_grokking")
    config.checkpoints = f"{ckpt}=100"
    config.dtype = "float32"
    config.out_dir = str(tmp_path / "out")
    config.data.update(dict(format="jsonl_ids", paths=f"{math},{code}", seq_len=6, max_samples_per_group=0))
    return config


def test_token_ids_outside_the_vocabulary_name_the_file_and_sample(olmoe_config):
    with pytest.raises(ValueError, match=r"train data: 1 sample\(s\) .*outside \[0, 16\).*code\.jsonl:line 2 "
                                         r"\(token id 40\)"):
        olmoe_run.run(olmoe_config)
    assert not os.path.exists(olmoe_config.out_dir)  # before the first checkpoint: nothing cached


def test_pad_id_outside_the_vocabulary_is_named_as_pad_id(olmoe_config, toy_model):
    olmoe_config.data.paths = olmoe_config.data.paths.split(",")[0]  # math.jsonl: ids in range
    olmoe_config.data.pad_id = 20
    with pytest.raises(ValueError, match=r"data\.pad_id=20 is not a token id of checkpoint .*vocab_size 16"):
        olmoe_run.run(olmoe_config)
    assert not os.path.exists(olmoe_config.out_dir)
    # A user-built split padded with an out-of-range id: extract_dataset names the pad id, not "token ids".
    model_config, params = toy_model
    tokens = np.array([[3, 4, 5, 20]], np.int32)
    mask = np.array([[1, 1, 1, 0]], np.int32)
    with pytest.raises(ValueError, match=r"the pad id \[20\] .*padding positions.*pad_id"):
        extract_dataset(model_config, params, tokens, mask, progress=False)


def test_repeated_samples_are_counted_in_every_report(tmp_path, monkeypatch):
    """The OLMoE run's data notes (olmoe_run.data_notes) head each report's warnings (summary.json, table.txt)."""
    from moe_grok import pipeline
    from moe_grok.studies import olmoe_run

    rng = np.random.default_rng(0)
    records = _ids_records(rng, 3)
    path = _write_jsonl(tmp_path / "math.jsonl", records + [records[0]])
    _, info = corpus.load_jsonl_ids(path, 8, groups_from_files=True, return_info=True)
    notes = olmoe_run.data_notes({"train": info})
    assert notes == ["data: 1 sample(s) of the train split repeat an earlier sample of their domain (kept; a sample "
                     "and its copy are at pathway distance 0)"]
    monkeypatch.setattr(pipeline, "collect_checkpoint_stats", lambda *args: [])
    monkeypatch.setattr(pipeline, "analyze", lambda *args: {"warnings": ["from the analysis"]})
    monkeypatch.setattr(pipeline, "write_reports", lambda reports, *args: None)
    split = corpus.load_jsonl_ids(path, 8, groups_from_files=True)
    report = pipeline.run_pipeline([], {"train": split}, str(tmp_path / "out"), data_notes=notes)
    assert report["warnings"] == [*notes, "from the analysis"]
