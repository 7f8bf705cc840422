"""Atomic files and folders, for run directories and jointopt's cache.

    >>> import shutil, tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> write_json(folder / "eval.json", {"score": 0.8})  # a temporary file, flushed, renamed over the target
    >>> read_json(folder / "eval.json")
    {'score': 0.8}
    >>> with staged_dir(folder / "adapters" / "classify") as tmp:  # a folder built aside, renamed into place
    ...     _ = (tmp / "adapter_config.json").write_text("{}")  # as `model.save_pretrained(tmp)` would
    >>> (folder / ".eval.json.x1y2.tmp").write_text("half")  # what a killed writer leaves
    4
    >>> remove_temporaries(folder)
    >>> sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))
    ['adapters', 'adapters/classify', 'adapters/classify/adapter_config.json', 'eval.json']
    >>> shutil.rmtree(folder)

A killed process leaves either the old file or the new one, never half of one; the next writer removes
the temporaries it left (`remove_temporaries`). A full disk or an unwritable folder is bad input
(`disk_errors`), not a crash.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from .errors import InputError
from .failpoints import failpoint


def now() -> str:
    """The current UTC time to the second, ISO 8601: the time stamps a run directory records."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# What to do when the file system refuses a write, by errno: the user's to fix, like bad input
_DISK_ADVICE = {
    errno.ENOSPC: "no space left on the device; free some space and run the same command again (it resumes)",
    errno.EDQUOT: "disk quota exceeded; free some space and run the same command again (it resumes)",
    errno.EROFS: "read-only file system; use another --runs-dir",
    errno.EACCES: "permission denied; fix the folder's permissions or use another --runs-dir",
    errno.EPERM: "operation not permitted; fix the folder's permissions or use another --runs-dir",
    errno.ENOTDIR: "part of the path is a file, not a folder; use another --runs-dir",
}

WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # met by writes only, wherever they are


def disk_error(err: OSError, path: Path | str | None = None) -> InputError | None:
    """The one-line InputError for a full disk or an unwritable folder; None for other OSErrors."""
    advice = _DISK_ADVICE.get(err.errno)
    if advice is None:
        return None
    where = path or err.filename
    return InputError(f"{where}: cannot write: {advice}" if where else f"cannot write: {advice}")


@contextmanager
def disk_errors(path: Path):
    """Turn a full disk or an unwritable folder, while writing `path`, into a one-line InputError."""
    try:
        yield
    except OSError as err:
        mapped = disk_error(err, path)
        if mapped is None:
            raise
        raise mapped from err


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write `data` to `path` so that readers see the old content or the new, never a mix."""
    with disk_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes files private; these are ordinary files
            with os.fdopen(fd, "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())
            failpoint(f"write/{path.name}")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def write_json(path: Path, obj: Any) -> None:
    """`obj` as indented JSON, non-ASCII characters kept, written atomically (write_atomic)."""
    write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """One JSON object per line, written atomically (write_atomic)."""
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


@contextmanager
def atomic_target(path: Path):
    """Yield a temporary path (same folder, same suffix) that becomes `path` only on success;
    for writers that take a path, like `program.save` or `save_pretrained`."""
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        with disk_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            yield tmp
            failpoint(f"write/{path.name}")
            if tmp.is_dir():
                replace_dir(tmp, path)
            else:
                os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def replace_dir(src: Path, dst: Path) -> None:
    """Move folder `src` to `dst` (same file system), replacing whatever is at `dst`. `dst` is never
    half-written: the old one is renamed aside first, then `src` renamed into place (put back on
    failure). Between the two renames `dst` is briefly absent."""
    if not dst.exists():
        os.replace(src, dst)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    os.replace(dst, trash / dst.name)
    try:
        os.replace(src, dst)
    except BaseException:
        os.replace(trash / dst.name, dst)
        raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)


@contextmanager
def staged_dir(dst: Path):
    """Yield a new empty folder next to `dst` (`.NAME.tmp-*`, ordinary permissions) to fill; on
    success it replaces `dst` (`replace_dir`), on failure it is removed. For writers of a whole
    folder that may be killed midway (an adapter, a converted model)."""
    with disk_errors(dst):
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the folder is an ordinary one
        try:
            yield tmp
            failpoint(f"write/{dst.name}")
            replace_dir(tmp, dst)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def remove_stale_staged(dst: Path) -> None:
    """Remove the `staged_dir` folders of `dst` left by killed writers; only while holding a lock
    that keeps every other writer of `dst` out."""
    for stale in dst.parent.glob(f".{dst.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


# What the writers above leave when killed: write_atomic's `.NAME.*.tmp`, atomic_target's
# `.tmp-PID-NAME`, staged_dir's `.NAME.tmp-*` and replace_dir's `.NAME.old-*`
TEMPORARIES = (".*.tmp", ".tmp-*", ".*.tmp-*", ".*.old-*")


def remove_temporaries(folder: Path, recursive: bool = True) -> None:
    """Remove what killed writers left in `folder`; only while holding the lock of its run."""
    for pattern in TEMPORARIES:
        for stale in list(folder.rglob(pattern) if recursive else folder.glob(pattern)):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def read_json(path: Path) -> Any:
    """The JSON in `path`; a damaged or unreadable file is a one-line InputError."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: damaged or unreadable ({err.__class__.__name__}: {err})") from None


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of `path`, one a line (blank lines skipped); damaged or unreadable: InputError."""
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: damaged or unreadable ({err.__class__.__name__}: {err})") from None


def open_log(path: Path) -> IO[str]:
    """`path` opened for a child process's output as it comes (a log, not atomic: a reader may see part
    of it), its folder made; a full disk or an unwritable folder is a one-line InputError."""
    with disk_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "w")


def remove_path(path: Path) -> None:
    """Remove the file or folder tree at `path`, if there is one (a folder's files go as they can)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def copy_file(src: Path, dst: Path) -> None:
    """Copy file `src` to `dst` atomically (atomic_target): a killed copy leaves no part of a file at `dst`."""
    with atomic_target(dst) as tmp:
        shutil.copyfile(src, tmp)


def copy_dir(src: Path, dst: Path) -> None:
    """Copy folder `src` to `dst` as a whole (staged_dir): `dst` is the old folder or the full copy, never
    part of one."""
    with staged_dir(dst) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
