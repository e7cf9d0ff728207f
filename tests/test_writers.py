"""Scalar writers (JSONL, TensorBoard event files read back by TensorBoard) and progress lines for batch jobs."""
import io
import json
import math

import numpy as np
import pytest

from moe_grok import strict_json
from moe_grok.writers import JsonlWriter, TensorBoardWriter, checked_scalars, tfevents
from moe_grok.writers import tensorboard as tensorboard_lib
from moe_grok.writers.progress import ProgressLines, progress, track

from tensorboard_reader import read_scalars


def test_crc32c_is_castagnolis():
    assert tfevents.crc32c(b"123456789") == 0xE3069283  # the standard check value of CRC-32C
    assert tfevents.crc32c(b"") == 0


def test_tensorboard_reads_the_scalars_back(tmp_path):
    """Steps, tags and float32 values arrive as written; NaN and Inf are kept; numpy scalars are accepted."""
    with TensorBoardWriter(str(tmp_path)) as writer:
        writer.write_scalars(0, {"train/loss": 2.5, "eval/test_accuracy": float("nan")})
        writer.write_scalars(10, {"train/loss": np.float32(0.1), "eval/test_accuracy": 1e40})  # beyond float32: Inf
        writer.write_scalars(2**40, {"train/loss": -math.inf})
        writer.flush()
    scalars = read_scalars(tmp_path)
    assert scalars["train/loss"] == [(0, 2.5), (10, pytest.approx(0.1)), (2**40, -math.inf)]
    (step0, nan), (step10, inf) = scalars["eval/test_accuracy"]
    assert (step0, step10) == (0, 10) and math.isnan(nan) and inf == math.inf


def test_history_replaces_the_event_files_and_writers_never_share_a_file(tmp_path):
    """A resumed run's writer holds the kept rows, appends after them, and leaves no other event file:
    no step twice. Writers opened in the same second get files of their own."""
    first, second = TensorBoardWriter(str(tmp_path)), TensorBoardWriter(str(tmp_path))
    assert first.path != second.path
    for writer in (first, second):
        writer.write_scalars(0, {"a": 1.0})
        writer.write_scalars(10, {"a": 2.0})
        writer.close()
    assert len(tensorboard_lib.event_files(str(tmp_path))) == 2
    with TensorBoardWriter(str(tmp_path), history=[(0, {"a": 1.0})]) as resumed:
        resumed.write_scalars(10, {"a": 3.0})
    assert tensorboard_lib.event_files(str(tmp_path)) == [resumed.path]
    assert read_scalars(tmp_path) == {"a": [(0, 1.0), (10, 3.0)]}


def test_jsonl_writes_strict_json_with_nan_as_null(tmp_path):
    path = tmp_path / "scalars.jsonl"
    with JsonlWriter(str(path)) as writer:
        writer.write_scalars(0, {"loss": float("nan"), "accuracy": 0.5})
        writer.write_scalars(5, {"loss": 1.0, "accuracy": np.float64(0.75)})
    lines = path.read_text().splitlines()
    assert [strict_json.loads(line) for line in lines] == [{"step": 0, "loss": None, "accuracy": 0.5},
                                                          {"step": 5, "loss": 1.0, "accuracy": 0.75}]
    with JsonlWriter(str(path), history=[(0, {"loss": 2.0})]) as writer:
        writer.write_scalars(1, {"loss": 1.5})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"step": 0, "loss": 2.0},
                                                                            {"step": 1, "loss": 1.5}]


@pytest.mark.parametrize("step,scalars,error", [(-1, {"a": 1.0}, ValueError), (1.5, {"a": 1.0}, ValueError),
                                                (0, {"a": "1.0"}, TypeError), (0, {"": 1.0}, TypeError),
                                                (0, {"a": None}, TypeError)])
def test_bad_scalars_are_refused(step, scalars, error):
    with pytest.raises(error):
        checked_scalars(step, scalars)


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_progress_lines_at_every_tenth_with_rate_and_eta():
    stream, clock = io.StringIO(), _Clock()
    lines = ProgressLines(200, "train 1 seed", unit="step", initial=100, stream=stream, clock=clock)
    for _ in range(100):
        clock.now += 0.5  # 2 steps/s
        lines.update(1)
    lines.set_postfix({"test_acc": "0.50"})
    lines.close()
    written = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert len(written) == 4 + 1  # at 120 (60%), 140, 160, 180; the last by close, with the postfix set at the end
    assert written[0].endswith("train 1 seed: 120/200 step (60%), 2 step/s, elapsed 0:00:10, ETA 0:00:40")
    assert written[-1].endswith("200/200 step (100%), 2 step/s, elapsed 0:00:50, test_acc=0.50")


def test_the_rate_after_the_first_line_leaves_the_start_up_out():
    stream, clock = io.StringIO(), _Clock()
    lines = ProgressLines(10, "train", unit="step", stream=stream, clock=clock)
    clock.now += 10  # the first step compiles
    lines.update(1)
    clock.now += 1
    lines.update(1)
    assert [line.split(" ", 2)[2] for line in stream.getvalue().splitlines()] == [
        "train: 1/10 step (10%), 10 s/step, elapsed 0:00:10, ETA 0:01:30",
        "train: 2/10 step (20%), 1 step/s, elapsed 0:00:11, ETA 0:00:08"]


def test_progress_lines_of_a_slow_inner_loop_come_by_time_only():
    stream, clock = io.StringIO(), _Clock()
    lines = ProgressLines(4, "step 3000", unit="batch", stream=stream, clock=clock, marks=None, transient=True)
    for _ in range(4):
        clock.now += 20
        lines.update(1)
    lines.close()
    written = stream.getvalue().splitlines()
    assert [line.split(" ", 2)[2] for line in written] == [
        "step 3000: 2/4 batch (50%), 20 s/batch, elapsed 0:00:40, ETA 0:00:40",
        "step 3000: 4/4 batch (100%), 20 s/batch, elapsed 0:01:20"]
    quiet = io.StringIO()
    with ProgressLines(4, "fast", stream=quiet, marks=None, transient=True) as fast:
        fast.update(4)
    assert quiet.getvalue() == ""


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_a_bar_a_log_gets_lines_and_disabled_gets_nothing():
    log = io.StringIO()
    assert list(track(range(3), desc="checkpoints", stream=log)) == [0, 1, 2]
    assert "checkpoints: 3/3 it (100%)" in log.getvalue() and "\r" not in log.getvalue()
    terminal = _Terminal()
    list(track(range(3), desc="checkpoints", stream=terminal))
    assert "\r" in terminal.getvalue()  # tqdm's bar
    silent = io.StringIO()
    bar = progress(3, desc="x", enabled=False, stream=silent)
    bar.update(3)
    bar.close()
    assert bar.n == 3 and silent.getvalue() == ""
