"""Scalars as a TensorBoard event file (`tensorboard --logdir DIR` shows them).

The format is encoded here (tfevents), without a TensorBoard or TensorFlow dependency: tensorboardX,
the lightest library that writes it, imports torch whenever torch is installed and names its files by
the second, so two writers of one directory in one second overwrite each other (measured with 2.6.5).
"""
from __future__ import annotations

import itertools
import os
import socket
import threading
import time
from collections.abc import Iterable, Mapping

from moe_grok import atomic_files
from moe_grok.writers import tfevents
from moe_grok.writers.scalar_writer import AppendingFile, checked_scalars

EVENT_FILE_MARK = "tfevents"  # TensorBoard reads every file of a directory whose name holds it
_file_numbers = itertools.count()  # with the pid and the time: two writers never share a file name
_number_lock = threading.Lock()


def event_file_name() -> str:
    """A new event file's name: TensorBoard's pattern `events.out.tfevents.<seconds>.<host>`, then this
    process' id and a per-process counter; names sort by creation time, which is the order TensorBoard
    reads the files of a run in."""
    with _number_lock:
        number = next(_file_numbers)
    return f"events.out.{EVENT_FILE_MARK}.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{number}"


def event_files(logdir: str) -> list[str]:
    """The event files in `logdir` (paths, sorted by name), temporaries of atomic_files left out."""
    if not os.path.isdir(logdir):
        return []
    return [os.path.join(logdir, name) for name in sorted(os.listdir(logdir))
            if EVENT_FILE_MARK in name and atomic_files.TMP_MARK not in name]


class TensorBoardWriter(AppendingFile):
    """Writes scalars to a new event file in `logdir` (a scalar writer: see scalar_writer); one event per
    `write_scalars`, its values stored as float32 (NaN and Inf kept), wall time now.

    history: when given, the run's event files in `logdir` are replaced: the new file is first written
    whole (atomic_files) with these (step, scalars) rows, then every other event file of `logdir` is
    removed, and the writer appends to the new file. A resumed run passes the rows it keeps, so no step
    appears twice and none it redoes stays behind. Without history, the new file sits beside the
    directory's earlier ones. A kill can cut only the last record short; TensorBoard stops reading a
    file there.
    """

    def __init__(self, logdir: str, history: Iterable[tuple[int, Mapping[str, float]]] | None = None):
        super().__init__(os.path.join(logdir, event_file_name()), "ab")
        self.logdir = logdir
        os.makedirs(logdir, exist_ok=True)
        atomic_files.remove_stale_temporaries(logdir)
        now = time.time()
        content = tfevents.record(tfevents.header_event(now))
        if history is None:
            with open(self.path, "xb") as f:
                f.write(content)
        else:
            content += b"".join(tfevents.record(tfevents.scalars_event(now, *checked_scalars(step, scalars)))
                                for step, scalars in history)
            atomic_files.write_bytes(self.path, content)
            for path in event_files(logdir):
                if path != self.path:
                    os.remove(path)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        step, scalars = checked_scalars(step, scalars)
        if not scalars:
            return
        self.append(tfevents.record(tfevents.scalars_event(time.time(), step, scalars)))
