"""Reading and writing the files a command is given or keeps, in one place.

Writes are atomic: a temporary file beside the target, then ``os.replace``, so a reader (a
notebook, the grid's progress line, a second command) sees the old complete file or the new one,
never a torn one. Reads of TOML and JSON turn every way a file can be wrong (missing, a folder,
not UTF-8, not parseable, the wrong shape) into one exception with a one-line message.
"""

from __future__ import annotations

import ctypes
import difflib
import errno
import json
import os
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
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def staging_folder_beside(target: str | os.PathLike) -> Path:
    """A new hidden folder next to ``target`` (same file system, so renaming it onto ``target`` is
    atomic), with the permissions a plain ``mkdir`` would give."""
    target = Path(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    return staging


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
