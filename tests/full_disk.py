"""A full disk, simulated: writes under one directory fail with ENOSPC past a byte budget."""
import builtins
import errno
import io
import os


class _FullDisk:
    """A file that takes `budget` bytes, then raises ENOSPC (what a full disk does mid-write)."""

    def __init__(self, real, budget):
        self.real, self.budget = real, budget

    def write(self, data):
        data = bytes(data) if not isinstance(data, str) else data
        if len(data) > self.budget[0]:
            self.real.write(data[:self.budget[0]])
            self.real.flush()
            self.budget[0] = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.budget[0] -= len(data)
        return self.real.write(data)

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.real.close()


def disk_full(monkeypatch, under, budget: int):
    """From now on, the disk holds `budget` more bytes under the directory `under`: every open()
    for writing a file there returns one whose writes fail with ENOSPC past that (old and new
    code alike: the target itself or a temporary file beside it)."""
    real_open, left, under = builtins.open, [budget], os.path.abspath(under) + os.sep

    def fake_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if (isinstance(file, (str, os.PathLike)) and os.path.abspath(file).startswith(under)
                and any(c in mode for c in "wax")):
            return _FullDisk(handle, left)
        return handle

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)  # zipfile (np.savez) opens through io.open
