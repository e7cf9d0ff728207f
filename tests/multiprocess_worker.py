"""One process of a multi-process `moe-grok olmoe` run, started by tests/test_multiprocess.py, with what it
reads and writes made observable:

    python multiprocess_worker.py RECORD PROCESS_ID CRASH -- <the olmoe job's command line>

RECORD: a JSON-lines file (outside the run's out_dir) this process appends an event to as it happens, so a
killed process keeps what it did: {"kind": "tensor", "directory", "key", "index"} for every checkpoint
tensor (or expert of a fused tensor) read from a safetensors file; {"kind": "rows", "shape", "start", "stop"}
for every shard of an integer (token / mask) batch put on this process's devices; {"kind": "extracted", "step"}
for every checkpoint extracted here rather than read from the cache; {"kind": "crash", "time"} (Unix time) as it
crashes on purpose (CRASH).
PROCESS_ID: this process's index (also passed to the job as --config.cluster.process_id); process 0 runs under
umask 022 and the others under umask 077, so every file or directory a process other than 0 creates lacks the
world-read bit.
CRASH: "none", or "P:N": process P kills itself (SIGKILL) as it starts its N-th extraction, leaving its peers
inside the run's collectives; "P:N:raise": it raises RuntimeError there instead.
"""
import json
import os
import signal
import sys
import time

import numpy as np

record_path, process_id, crash = sys.argv[1], int(sys.argv[2]), sys.argv[3]
assert sys.argv[4] == "--"
os.umask(0o022 if process_id == 0 else 0o077)
crash_process, crash_at, *how = crash.split(":") if crash != "none" else (-1, -1)
crash_process, crash_at, raises = int(crash_process), int(crash_at), how == ["raise"]


def note(**event):
    with open(record_path, "a") as f:
        f.write(json.dumps(event) + "\n")


import jax  # noqa: E402

from moe_grok.checkpoints import cache  # noqa: E402
from moe_grok.cli import command  # noqa: E402
from moe_grok.model import safetensors  # noqa: E402

make_array_from_callback = jax.make_array_from_callback


def recording_make_array(shape, sharding, callback, *args, **kwargs):
    def recording_callback(index):
        out = callback(index)
        if np.issubdtype(np.asarray(out).dtype, np.integer) and len(shape) == 2:
            start, stop, _ = index[0].indices(shape[0])
            note(kind="rows", shape=list(shape), start=start, stop=stop)
        return out

    return make_array_from_callback(shape, sharding, recording_callback, *args, **kwargs)


jax.make_array_from_callback = recording_make_array
read_tensor = safetensors.SafetensorsReader.read


def recording_read(self, key, index=()):
    note(kind="tensor", directory=self.directory, key=key, index=[int(i) for i in index])
    return read_tensor(self, key, index)


safetensors.SafetensorsReader.read = recording_read
extract_splits, checkpoint_stats = cache.extract_splits, cache._checkpoint_stats
extractions = 0


def crashing_extract_splits(*args, **kwargs):
    global extractions
    extractions += 1
    if process_id == crash_process and extractions == crash_at:
        note(kind="crash", time=time.time())
        if raises:
            raise RuntimeError(f"process {process_id} failed on purpose")
        os.kill(os.getpid(), signal.SIGKILL)
    return extract_splits(*args, **kwargs)


def recording_checkpoint_stats(source, extracted, params):
    note(kind="extracted", step=source.step)
    return checkpoint_stats(source, extracted, params)


cache.extract_splits, cache._checkpoint_stats = crashing_extract_splits, recording_checkpoint_stats
command.main(sys.argv[5:])
