"""Reading and writing the files a command is given or keeps, in one place.

Writes are atomic: a temporary file beside the target, then ``os.replace``, so a reader (a
notebook, the grid's progress line, a second command) sees the old complete file or the new one,
never a torn one. Reads of TOML and JSON turn every way a file can be wrong (missing, a folder,
not UTF-8, not parseable, the wrong shape) into one exception with a one-line message.
"""

from __future__ import annotations

import contextlib
import ctypes
import difflib
import errno
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class UnreadableFile(ValueError):
    """A file that is missing, not a file, not text or not what it should hold; the message is
    one line naming the file and what is wrong."""


# --- one-line messages ------------------------------------------------------------------------------
def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type name."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def did_you_mean(name: str, choices: Sequence[str], cutoff: float = 0.6) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices`` (``difflib`` similarity >= ``cutoff``),
    or an empty string."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=cutoff)
    return f" (did you mean '{close[0]}'?)" if close else ""


# --- links: never written through ---------------------------------------------------------------------
class LinkRefused(UnreadableFile):
    """A path a command would write, replace or delete is a symbolic link (or lies under one); the
    message is one line naming the link."""


def refuse_links(folder: str | os.PathLike, what: str = "run folder") -> None:
    """Raise ``LinkRefused`` naming the first symbolic link among ``folder`` itself and everything
    under it; links are looked at (``lstat``), never followed (``os.walk`` lists a linked folder
    without entering it). The one rule behind every write into a run folder (docs/design.md,
    "The run folder": no links)."""
    folder = Path(folder)
    if folder.is_symlink():
        raise LinkRefused(_link_message(folder, what))
    for parent, folders, names in os.walk(folder):
        for name in sorted(folders + names):
            path = Path(parent) / name
            if path.is_symlink():
                raise LinkRefused(_link_message(path, what))


def _link_message(path: Path, what: str) -> str:
    try:
        target = f" (to {os.readlink(path)})"
    except OSError:
        target = ""
    return (f"{path}: is a symbolic link{target}; dynamics never writes through a link in a {what}: "
            "put the real file or folder there, or remove the link")


def open_no_follow(path: str | os.PathLike, flags: int, what: str = "run folder") -> int:
    """``os.open(path, flags | O_NOFOLLOW)`` (mode 0o644 when it creates): a file descriptor, or
    ``LinkRefused`` when ``path`` is a symbolic link."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise LinkRefused(_link_message(Path(path), what)) from None
        raise


# --- faults of the file system: one line each -----------------------------------------------------------
# errno -> what to do; the ones in BAD_INPUT are the user's path, not the machine (exit 2, else 1)
FAULT_REMEDIES = {
    errno.ENOSPC: "free space on that file system, then run the command again (a run continues with --resume)",
    errno.EDQUOT: "the disk quota is used up: free space, then run the command again (a run continues with --resume)",
    errno.EROFS: "choose a folder on a writable file system (--runs-dir, --out)",
    errno.EACCES: "no permission: check the owner and mode of that path, or choose another folder",
    errno.EPERM: "not permitted (an immutable file? see lsattr): check that path, or choose another folder",
    errno.ENAMETOOLONG: "a name is too long for the file system: choose a shorter one",
    errno.ENOTDIR: "a part of that path is a file, not a folder: choose another path",
    errno.EISDIR: "that path is a folder, not a file: choose another path",
    errno.EIO: "the disk reported an I/O error: check the device",
}
BAD_INPUT_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR})
_ERRNO_IN_TEXT = re.compile(r"(?:os error|errno)\s*(\d+)", re.IGNORECASE)


def describe_os_error(error: OSError) -> str:
    """One line for an OS error met on a file: the path, what the system said, what to do."""
    path = error.filename if error.filename is not None else "a file"
    said = (error.strerror or first_line(error)).rstrip(".")
    said = said[0].lower() + said[1:] if said else "failed"
    remedy = FAULT_REMEDIES.get(error.errno)
    return f"{path}: {said}" + (f"; {remedy}" if remedy else "")


def as_os_error(error: BaseException, folder: str | os.PathLike) -> OSError | None:
    """The OS error behind a library's error while it wrote into ``folder`` (safetensors' "os
    error 28", pyarrow's "errno 28", torch.save's "unexpected pos" on a full disk), as an
    ``OSError`` naming ``folder``; None when it was not one. Libraries that say only that the write
    failed are asked after the fact: a file system with no free blocks is ENOSPC, one mounted
    read-only EROFS."""
    if isinstance(error, OSError) and error.errno is not None and error.filename is not None \
            and error.strerror == os.strerror(error.errno):
        return error
    if isinstance(error, OSError) and error.errno is not None:  # pyarrow's own words, or no path: ours
        return OSError(error.errno, os.strerror(error.errno), str(folder))
    if not isinstance(error, (OSError, RuntimeError)) and type(error).__name__ != "SafetensorError":
        return None  # a bug or bad data, whatever the disk holds
    found = _ERRNO_IN_TEXT.search(str(error))
    code = int(found.group(1)) if found else None
    if code is None:
        try:
            stats = os.statvfs(next(p for p in (Path(folder), *Path(folder).parents) if p.exists()))
        except OSError:
            return None
        if stats.f_flag & os.ST_RDONLY:
            code = errno.EROFS
        elif stats.f_bavail * stats.f_frsize < 1 << 20:  # under 1 MiB left: the write ran out of room
            code = errno.ENOSPC
    return OSError(code, os.strerror(code), str(folder)) if code is not None else None


# --- atomic writes -------------------------------------------------------------------------------------
def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary path beside ``path`` and rename it into place; the
    temporary file is removed if ``write`` raises. The temporary name is this writer's own (pid and
    a random token), so two writers never write into each other's file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as error:
        fault = as_os_error(error, path) if isinstance(error, Exception) else None  # before space is freed
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if fault is not None and fault is not error:
            raise fault from error
        if isinstance(error, OSError) and error.filename == str(tmp):  # name the file, not our temporary one
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise
    return path


def staging_folder_beside(target: str | os.PathLike) -> Path:
    """A new hidden folder next to ``target`` (same file system, so renaming it onto ``target`` is
    atomic), with the permissions a plain ``mkdir`` would give."""
    target = Path(target)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as error:  # named as the folder it was for, not the temporary name
        raise OSError(error.errno, error.strerror, str(target)) from error
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    return staging


def named_as_target(error: BaseException, staging: str | os.PathLike, target: str | os.PathLike) -> BaseException:
    """``error`` with a path under the staging folder ``staging`` named as the same path under
    ``target`` (what the user knows); other errors as they are."""
    filename = getattr(error, "filename", None)
    if not isinstance(error, OSError) or not isinstance(filename, str) or not filename.startswith(str(staging)):
        return error
    renamed = OSError(error.errno, error.strerror, str(target) + filename[len(str(staging)):])
    renamed.__cause__ = error
    return renamed


def replace_folder(new: str | os.PathLike, target: str | os.PathLike) -> None:
    """Put the folder ``new`` in place of the existing folder ``target`` and delete the old one,
    with an intact ``target`` at every moment: the two are swapped in one atomic step
    (``renameat2(RENAME_EXCHANGE)``, Linux >= 3.15), then the old one, now at ``new``, is removed.
    Where the swap is not available, ``target`` is first renamed aside (a crash between the two
    renames leaves it there, hidden, rather than losing it)."""
    new, target = Path(new), Path(target)
    if _exchange(new, target):
        shutil.rmtree(new)
        return
    aside = target.with_name(f".{target.name}.replaced-{os.getpid()}-{secrets.token_hex(4)}")
    os.rename(target, aside)
    os.rename(new, target)
    shutil.rmtree(aside)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the system cannot (then nothing happened)."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # not supported by this kernel / file system
        return False
    raise OSError(error, os.strerror(error), str(b))


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    text = json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n"
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def write_parquet(path: str | os.PathLike, table) -> Path:
    """``table`` (a ``pyarrow.Table``) to ``path``, atomically."""
    import pyarrow.parquet as pq  # lazy: pyarrow is only needed by the callers that write tables

    return write_atomic(path, lambda tmp: pq.write_table(table, tmp))


# --- reads -----------------------------------------------------------------------------------------------
def read_text(path: str | os.PathLike, what: str) -> str:
    """The UTF-8 text of ``path``; ``what`` names it in the error (``--config grid.toml``)."""
    path = Path(path)
    if not path.exists():
        raise UnreadableFile(f"{what}: no such file")
    if not path.is_file():
        raise UnreadableFile(f"{what}: is a folder, not a file" if path.is_dir() else f"{what}: not a regular file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UnreadableFile(f"{what}: not UTF-8 text (byte {error.start})") from None
    except OSError as error:
        raise UnreadableFile(f"{what}: cannot be read ({error.strerror or first_line(error)})") from None


def read_toml(path: str | os.PathLike, what: str | None = None) -> dict[str, Any]:
    what = what or str(path)
    try:
        return tomllib.loads(read_text(path, what))
    except tomllib.TOMLDecodeError as error:
        raise UnreadableFile(f"{what}: not valid TOML ({first_line(error)})") from None


def read_json(path: str | os.PathLike, what: str | None = None, *, expect: type = dict) -> Any:
    """The JSON value in ``path``, which must be an ``expect`` (an object by default)."""
    what = what or str(path)
    text = read_text(path, what)
    if not text.strip():
        raise UnreadableFile(f"{what}: empty")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise UnreadableFile(f"{what}: not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(value, expect):
        kind = {dict: "an object", list: "a list"}.get(expect, expect.__name__)
        raise UnreadableFile(f"{what}: holds {type(value).__name__}, not {kind}")
    return value


def check_parquet(path: str | os.PathLike, what: str | None = None, columns: Sequence[str] = ()) -> None:
    """Read only the footer of the parquet file ``path`` (cheap at any size): raises
    ``UnreadableFile`` when it is not a file, cut off, not parquet, or lacks one of ``columns``."""
    import pyarrow as pa  # lazy: see read_parquet
    import pyarrow.parquet as pq

    what = what or str(path)
    if not Path(path).is_file():
        raise UnreadableFile(f"{what}: is a folder, not a file" if Path(path).is_dir() else f"{what}: no such file")
    try:
        names = pq.read_schema(path).names
    except (pa.ArrowException, OSError, ValueError) as error:
        raise UnreadableFile(f"{what}: not a readable parquet file ({first_line(error)})") from None
    missing = [name for name in columns if name not in names]
    if missing:
        raise UnreadableFile(f"{what}: lacks the column(s) {', '.join(missing)}")


def read_parquet(path: str | os.PathLike, what: str | None = None, columns: Sequence[str] = ()):
    """The table in ``path`` as a pandas DataFrame; ``columns`` must all be in it. A truncated or
    garbled file, or one without those columns, raises ``UnreadableFile``."""
    import pandas as pd  # lazy: only readers of tables need pandas and pyarrow
    import pyarrow as pa

    what = what or str(path)
    if not Path(path).is_file():
        raise UnreadableFile(f"{what}: is a folder, not a file" if Path(path).is_dir() else f"{what}: no such file")
    try:
        frame = pd.read_parquet(path)
    except (pa.ArrowException, OSError, ValueError) as error:
        raise UnreadableFile(f"{what}: not a readable parquet file ({first_line(error)})") from None
    missing = [name for name in columns if name not in frame]
    if missing:
        raise UnreadableFile(f"{what}: lacks the column(s) {', '.join(missing)}")
    return frame
