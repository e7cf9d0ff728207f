"""Whole files or nothing: every file a run leaves is written aside and renamed into place.

A file is written to a temporary name in its own directory (same filesystem, so `os.replace`
is one atomic rename), flushed and fsynced, then renamed over the target. A kill or a full
disk at any point leaves either the previous complete file or the new complete one, never a
truncated one. On failure the temporary file is removed and the error names the target file.

A directory (a converted checkpoint, a report with its sub-reports) is built aside the same way
and swapped in whole with `replace_directory`.

Temporary names: ``<target>.<pid>-<thread>.tmp<ext>`` (files; the extension kept, for writers
that choose a format by it) and ``<target>.<pid>-<thread>.tmp`` (directories); two writers
never share one. `remove_stale_temporaries` removes those of processes that no longer run.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator

TMP_MARK = ".tmp"
_TMP_RE = re.compile(r"\.(\d+)-\d+\.tmp(\.[^./]*)?$")  # <target>.<pid>-<thread>.tmp[<ext>]


class WriteError(OSError):
    """An OSError (errno kept: ENOSPC for a full disk) that names the file that could not be written."""


def temporary_path(path: str | os.PathLike, keep_extension: bool = True) -> str:
    """A temporary name beside `path`, unique to this process and thread."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1] if keep_extension else ""
    return f"{path}.{os.getpid()}-{threading.get_ident()}{TMP_MARK}{ext}"


def _named(error: OSError, path: str) -> WriteError:
    return WriteError(error.errno, error.strerror or str(error), path)  # "[Errno 28] No space left...: '<path>'"


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def _fsync_directory(directory: str) -> None:
    """Make a rename in `directory` durable (a crash after it returns keeps the new name)."""
    with contextlib.suppress(OSError):  # some filesystems refuse fsync on a directory; the rename still holds
        fd = os.open(directory or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside `path` for a writer that takes a path (np.savez, savefig);
    on success it is fsynced and renamed to `path`. On any error the temporary file is removed;
    an OSError is raised again as WriteError naming `path`."""
    path = os.fspath(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        _remove(tmp)
        raise (error if isinstance(error, WriteError) else _named(error, path)) from error
    except BaseException:
        _remove(tmp)
        raise
    _fsync_directory(os.path.dirname(path))


@contextlib.contextmanager
def open_aside(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator:
    """`open(path, mode)` written aside: the file object writes a temporary file that replaces
    `path` when the block ends without error (see `writing`). mode "w" / "wb"; kwargs as open."""
    if mode not in ("w", "wb"):
        raise ValueError(f"open_aside writes whole files: mode 'w' or 'wb', not {mode!r}")
    with writing(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def write_text(path: str | os.PathLike, text: str) -> None:
    """Replace the file at `path` by `text` (UTF-8), whole or not at all."""
    with open_aside(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace the file at `path` by `data`, whole or not at all."""
    with open_aside(path, "wb") as f:
        f.write(data)


def write_files(writers: dict[str, Callable[[str], None]]) -> None:
    """Write a set of files, whole or not at all: `writers` maps each target path to a function
    that writes the file at the path it is given (a temporary one beside the target). Every file
    is written aside first; only when all are complete are they renamed into place, so a failure
    (a full disk, an error in a writer) leaves every previous file as it was and no temporary
    file behind. An OSError is raised again as WriteError naming the target being written."""
    written: dict[str, str] = {}
    try:
        for path, write in writers.items():
            tmp = temporary_path(path)
            written[path] = tmp
            try:
                write(tmp)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
            except OSError as error:
                raise (error if isinstance(error, WriteError) else _named(error, path)) from error
    except BaseException:
        for tmp in written.values():
            _remove(tmp)
        raise
    for path, tmp in written.items():
        os.replace(tmp, path)
    for directory in {os.path.dirname(p) for p in written}:
        _fsync_directory(directory)


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), b)


def replace_directory(staging: str, path: str) -> None:
    """Put the complete directory `staging` at `path` (same parent directory), removing what
    was there. Where the kernel can swap two names atomically (Linux), a kill leaves either the
    old directory or the new one at `path`; elsewhere the old one is renamed aside first, and a
    kill between the two renames leaves it at ``<path>.<pid>-<thread>.tmp``."""
    path = os.path.abspath(path)
    staging = os.path.abspath(staging)
    try:
        os.rename(staging, path)  # no or an empty directory at `path`
    except OSError as error:
        if error.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise _named(error, path) from error
        if _exchange(staging, path):
            _remove(staging)  # now the old directory
        else:
            old = temporary_path(path, keep_extension=False) + ".old"
            os.rename(path, old)
            os.rename(staging, path)
            _remove(old)
    _fsync_directory(os.path.dirname(path))


@contextlib.contextmanager
def directory_aside(path: str | os.PathLike) -> Iterator[str]:
    """Yield an empty temporary directory beside `path`; when the block ends without error it
    replaces `path` whole (`replace_directory`). On error it is removed and `path` is untouched;
    an OSError is raised again as WriteError naming the file at fault as it would be under `path`."""
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    staging = temporary_path(path, keep_extension=False)
    try:
        os.mkdir(staging)
        yield staging
        replace_directory(staging, path)
    except OSError as error:
        _remove(staging)
        # Name the file where it was to be (path/...), not inside the temporary directory.
        where = os.fspath(error.filename) if isinstance(error.filename, (str, os.PathLike)) else ""
        where = path + where[len(staging):] if where.startswith(staging) else path
        raise WriteError(error.errno, error.strerror or str(error), where) from error
    except BaseException:
        _remove(staging)
        raise


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(directory: str, prefix: str = "") -> list[str]:
    """Remove the temporary files and directories in `directory` (names starting with `prefix`)
    left by writers of this host that no longer run (a kill between write and rename, a full
    disk); returns their paths. Those of running processes (another writer) are kept."""
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for name in sorted(os.listdir(directory)):
            match = _TMP_RE.search(name.removesuffix(".old"))
            if name.startswith(prefix) and match and not _pid_running(int(match.group(1))):
                _remove(os.path.join(directory, name))
                removed.append(os.path.join(directory, name))
    return removed
