"""One writer per directory: an fcntl lock file that names its holder."""
from __future__ import annotations

import fcntl
import os


class DirectoryLock:
    """Exclusive, non-blocking fcntl.flock on ``directory/lock_file`` for one writer at a time.

    The lock file records the holder's pid; a second writer raises RuntimeError naming it. The
    kernel releases the lock when the holder exits, however it exits. Training holds
    ``train.lock`` on its workdir (training.run_dir), an analysis ``analysis.lock`` on its out_dir
    (pipeline), a convert ``.<out>.convert.lock`` beside its output directory (model.checkpoint_io:
    the output itself is replaced whole). activity and directory_kind word the refusal ("is being
    trained ... use another workdir"); subject names what is locked (default: the directory).
    """

    def __init__(self, directory: str, lock_file: str, activity: str, directory_kind: str,
                 subject: str | None = None):
        self.path = os.path.join(directory, lock_file)
        self.activity, self.directory_kind = activity, directory_kind
        self.subject = subject  # what the refusal names (default: the directory holding the lock file)
        self._fd: int | None = None

    def __enter__(self) -> DirectoryLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if not isinstance(error, BlockingIOError):  # e.g. no flock on this filesystem
                os.close(fd)
                raise
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            subject = self.subject or os.path.dirname(self.path)
            raise RuntimeError(f"{subject} is being {self.activity} by another process (pid "
                               f"{holder}, lock {self.path}); wait for it to finish or use another "
                               f"{self.directory_kind}") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
