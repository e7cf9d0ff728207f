"""TensorBoard's own reader (the `tensorboard` package of the test extra) over a log directory."""
import os

from tensorboard.backend.event_processing import event_accumulator


def read_scalars(logdir):
    """{tag: [(step, value), ...]} of every scalar TensorBoard finds in `logdir` (one run: its event files)."""
    assert os.path.isdir(logdir), f"no TensorBoard directory {logdir}"
    accumulator = event_accumulator.EventAccumulator(str(logdir), size_guidance={event_accumulator.SCALARS: 0})
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}
