"""Writing a folder so that it appears whole or not at all.

The files go into a hidden sibling folder that is renamed into place only once everything in it
is written, so an interrupted or failed write never leaves something that looks like a valid
checkpoint; free space is checked first, and a full or read-only disk is named in one line.
"""

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from llama.memory import format_bytes


@contextlib.contextmanager
def new_folder(dst: str | Path, src: str | Path | None, needed_bytes: int) -> Iterator[Path]:
    """A folder to write a checkpoint into, that appears as dst only once all of it is written.

    The files go into a hidden sibling, .NAME.partial, renamed to dst at the end. A run that fails
    or is interrupted removes it; one killed outright leaves only that hidden folder, which the
    next run replaces. Free space is checked first, and a full or read-only disk is named.
    """
    dst = Path(dst)
    if src is not None and dst.resolve() == Path(src).resolve():
        raise ValueError(f"the output folder {str(dst)!r} is the input folder: choose a new one")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ValueError(f"{str(dst)!r} already exists and is not an empty folder: choose a new one")
    partial = dst.parent / f".{dst.name}.partial"
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        free = shutil.disk_usage(partial).free
        if needed_bytes > free:
            raise OSError(errno.ENOSPC, "no space")
        yield partial
        if dst.exists():
            dst.rmdir()  # empty, as checked
        partial.rename(dst)
    except (OSError, RuntimeError) as err:  # torch.save reports a failed write as a RuntimeError
        problem = write_problem(dst, err, needed_bytes)  # before the partial files go: a full disk still shows
        shutil.rmtree(partial, ignore_errors=True)
        if problem is None:
            raise
        raise ValueError(problem) from err
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def write_problem(dst: Path, err: Exception, needed_bytes: int) -> str | None:
    """A failed write in words, or None if err is not one."""
    code = getattr(err, "errno", None)
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write to {str(dst)!r}: {os.strerror(code).lower()}; choose another folder"
    try:
        free = shutil.disk_usage(dst.parent).free
    except OSError:
        free = None
    if code == errno.ENOSPC or (isinstance(err, RuntimeError) and free is not None and free < needed_bytes):
        has = "an unknown amount" if free is None else format_bytes(free)
        return f"no space left on {str(dst)!r}: the checkpoint needs {format_bytes(needed_bytes)}, the disk has {has}"
    if isinstance(err, OSError):
        return f"cannot write to {str(dst)!r}: {err.strerror or err}"
    return None
