"""Where commands write: checked before the work, never clobbered, never left half-written.

One rule for every command that writes a named output (`--out`, `--json`, `train.ckpt_dir`, ...):

1. Before any long work, every output location is checked (`check_writable`): the nearest existing folder
   on its path must be a folder in which a file can be created. A read-only file system, a missing
   permission, a full disk or a regular file where a folder should be is a ConfigError naming the path, the
   reason and the flag to change; nothing is created by the check.
2. An existing output that is not empty is refused unless the command was given `--overwrite`
   (`claim_output`; `add_overwrite` declares the flag). An empty folder counts as absent. A folder output
   never replaces a file, nor a file output a folder, with or without `--overwrite`.
3. An output is written into a hidden sibling `.NAME.XXXXXX.partial` and renamed into place only when
   complete (`staged`): any failure or interruption (Ctrl-C included) removes the partial and the folders
   made for it, and a previous output stays in place until the new one is complete. A partial left by a
   killed process (kill -9, a power cut) is removed, with a warning, by the next command that writes the
   same output.

Training is the exception to 2 and 3 by design: `train.ckpt_dir` is a run folder that training resumes
into (`train.resume=auto`) and whose step folders count only with their completion marker
(train/checkpoint.py); `train` refuses a folder that holds checkpoints of the same stage only when it would
start afresh over them (`train.resume=never`), unless given `--overwrite` (train/stages.py).
"""

from __future__ import annotations

import argparse
import errno
import glob
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from scldm_scale.config import ConfigError

log = logging.getLogger(__name__)

PARTIAL = ".partial"
OWNER_FILE = "owner"  # inside a partial: "<host> <pid>" of the process writing it
# A partial without its owner file is someone's mkdtemp of a moment ago unless older than this.
UNOWNED_GRACE_S = 60.0
PROBE_PREFIX = ".scldm-write-check."


def add_overwrite(parser: argparse.ArgumentParser, what: str) -> None:
    """The `--overwrite` switch of a command whose output is `what` (e.g. "the .h5ad at --out")."""
    parser.add_argument("--overwrite", action="store_true", help=f"replace {what} if it exists")


def _absolute(path: str | Path) -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(path))))


def _exists(path: Path) -> bool:
    try:
        return path.exists() or path.is_symlink()
    except OSError:  # e.g. a permission error on a folder of the path
        return False


def _reason(err: OSError, folder: Path) -> str:
    if err.errno == errno.EROFS:
        return f"{folder} is on a read-only file system"
    if err.errno in (errno.EACCES, errno.EPERM):
        return f"no permission to create files in {folder}"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the device of {folder}"
    return f"{os.strerror(err.errno) if err.errno else err} in {folder}"


def _refusal(path: Path, what: str, flag: str, reason: str) -> ConfigError:
    return ConfigError(f"cannot write {what} at {path}: {reason}; choose another {flag}")


def check_writable(path: str | Path, what: str, flag: str) -> None:
    """Refuse (ConfigError) unless `path` (a file or a folder, existing or not) can be written: a file is
    created and removed in the nearest existing folder on its path, and an existing file must open for
    writing. `what` names the output ("the checkpoint folder"), `flag` how the user sets it ("--out")."""
    path = _absolute(path)
    folder = path if path.is_dir() else path.parent
    while not _exists(folder):
        folder = folder.parent
    if not folder.is_dir():
        raise _refusal(path, what, flag, f"{folder} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=folder)
        os.close(fd)
        os.unlink(probe)
        if path.is_file():
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
    except OSError as err:
        raise _refusal(path, what, flag, _reason(err, folder)) from None


def claim_output(
    path: str | Path, what: str, flag: str, overwrite: bool, folder: bool, marker: str | None = None, also: str = ""
) -> None:
    """Refuse (ConfigError) an output location that cannot be written (`check_writable`), that holds the
    other kind of thing (a file where a `folder` output goes, or a folder where a file goes), or that is
    not empty while `overwrite` is off (`also` adds to the fix, e.g. ", or --append to add to it").

    A folder output replaces an existing folder whole, so `overwrite` replaces only a folder that holds
    `marker` (a file every earlier output of the command holds, e.g. metrics.json): `--out . --overwrite`
    never deletes a folder of other files. Nothing is created or removed here."""
    path = _absolute(path)
    check_writable(path, what, flag)
    if folder and _exists(path) and not path.is_dir():
        raise _refusal(path, what, flag, "a file of that name exists (this output is a folder)")
    if not folder and path.is_dir():
        raise _refusal(path, what, flag, f"it is a folder; give {flag} a file path inside it or elsewhere")
    non_empty = path.is_file() or (path.is_dir() and any(path.iterdir()))
    if overwrite and non_empty and folder and marker is not None and not _exists(path / marker):
        raise ConfigError(
            f"{path} is not empty and is not {what} (it has no {marker}); --overwrite replaces only an earlier "
            f"{what}: choose another {flag}, or empty that folder first"
        )
    if non_empty and not overwrite:
        kind = "folder" if path.is_dir() else "file"
        raise ConfigError(
            f"{what} {path} already exists (a non-empty {kind}); choose another {flag}, pass --overwrite "
            f"to replace it{also}"
        )


def _make_parents(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; returns those created, outermost first."""
    missing = []
    while not _exists(folder):
        missing.append(folder)
        folder = folder.parent
    for made in reversed(missing):
        made.mkdir(exist_ok=True)
    return list(reversed(missing))


def _remove_if_empty(folders: list[Path]) -> None:
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            return  # not empty (someone else wrote there) or gone: leave it and its parents


def _is_stale(partial: Path) -> bool:
    """A partial whose writer is gone: its owner process is not alive on this host, or it has no owner
    file and is older than UNOWNED_GRACE_S. A partial owned by another host is left alone."""
    try:
        host, pid = (partial / OWNER_FILE).read_text().split()
    except (OSError, ValueError):
        try:
            return time.time() - partial.stat().st_mtime > UNOWNED_GRACE_S
        except OSError:
            return False
    if host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return False


def remove_stale_partials(path: str | Path) -> list[Path]:
    """Remove the partials of `path` left by interrupted writers (`_is_stale`), with a warning each."""
    path = _absolute(path)
    removed = []
    pattern = os.path.join(glob.escape(str(path.parent)), f".{glob.escape(path.name)}.*{PARTIAL}")
    for found in map(Path, sorted(glob.glob(pattern))):
        if found.is_dir() and _is_stale(found):
            shutil.rmtree(found, ignore_errors=True)
            log.warning("removed %s, left unfinished by an interrupted run writing %s", found, path)
            removed.append(found)
    return removed


@contextmanager
def staged(path: str | Path) -> Iterator[Path]:
    """Yield the path to write the output `path` (a file or a folder) to, inside a hidden sibling partial
    folder; when the block ends normally it replaces `path` (an existing output is moved aside first, then
    deleted). On any exception, Ctrl-C included, the partial and the parent folders made for it are
    removed, `path` is left as it was, and the exception goes on."""
    path = _absolute(path)
    made = _make_parents(path.parent)
    staging = None
    try:
        remove_stale_partials(path)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=PARTIAL, dir=path.parent))
        (staging / OWNER_FILE).write_text(f"{socket.gethostname()} {os.getpid()}\n")
        target = staging / path.name
        yield target
        if not _exists(target):
            raise RuntimeError(f"staged output {target} was never written")
        if _exists(path):
            previous = staging / f"{path.name}.previous"
            os.rename(path, previous)  # an existing folder cannot be renamed over; move it aside
            try:
                os.rename(target, path)
            except BaseException:
                os.rename(previous, path)
                raise
        else:
            os.rename(target, path)
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        _remove_if_empty(made)
        raise
    shutil.rmtree(staging, ignore_errors=True)
