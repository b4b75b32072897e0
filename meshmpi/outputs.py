"""Output files: checked before a run, written whole.

Every file a command writes (traces, logits, exports, tables) goes to a temporary file beside
its real target (a symlink is followed, not replaced) that is renamed into place once it is
complete, with the permissions the umask gives a new file. SIGINT or SIGTERM arriving during
the write are held until the temporary file is closed, then it is removed and the signal is
delivered as usual. Only a kill that cannot be caught (SIGKILL, a crash) leaves a
``NAME.XXXX.tmp`` behind; :func:`leftovers` finds those.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import tempfile
import threading
from pathlib import Path

from .errors import UsageError
from .text import plural

_HELD = (signal.SIGINT, signal.SIGTERM)
_TEMPORARY = re.compile(r".+\.[^.]+\.[A-Za-z0-9_]+\.tmp\Z")   # NAME.EXT.XXXXXXXX.tmp


def real_target(path) -> Path:
    """Where writing ``path`` lands: symlinks resolved, even a dangling one."""
    return Path(os.path.realpath(os.fspath(path)))


def problem(path, option: str, force: bool = True) -> str | None:
    """Why ``path`` cannot be written as the output of ``option``, or None. Nothing is created."""
    given = Path(path)
    if given.is_dir():
        return f"{option} {path} is a folder, not a file"
    if not force and (given.exists() or given.is_symlink()):
        return f"{option} {path} exists: add --force to overwrite it"
    target = real_target(given)
    if target.is_dir():
        return f"{option} {path} points to a folder, not a file"
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return f"{option} {path}: {folder} is not a folder"
    try:   # the only sure test (permissions, read-only mounts, quotas): make a file there
        fd, probe = tempfile.mkstemp(prefix=".meshmpi-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"{option} {path}: cannot write in {folder} ({exc.strerror or exc})"
    return None


def check(outputs, force: bool = True) -> None:
    """Raise the same :class:`UsageError` on every rank when one of ``outputs`` (pairs of a
    path or None and the option that names it) cannot be written; rank 0 looks (it writes)."""
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    found = None
    if comm.Get_rank() == 0:
        found = next((p for p in (problem(path, option, force) for path, option in outputs if path)
                      if p), None)
    found = comm.bcast(found, root=0)
    if found:
        raise UsageError(found)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _signals_held():
    """Hold SIGINT and SIGTERM (main thread only): yields the list of those that arrived."""
    pending: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield pending
        return

    def hold(signum, frame):
        if signum in pending:         # asked twice: stop now
            raise KeyboardInterrupt
        pending.append(signum)

    previous = {sig: signal.signal(sig, hold) for sig in _HELD}
    try:
        yield pending
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def write_atomic(path, write) -> Path:
    """Call ``write(temporary_path)`` to fill a temporary file beside ``path``'s real target,
    then rename it into place; returns the target. On any failure or held signal the
    temporary file is removed (and the signal then delivered)."""
    target = real_target(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _signals_held() as pending:
        fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
        try:
            os.fchmod(fd, 0o666 & ~_umask())
            os.close(fd)
            write(tmp)
            if not pending:
                os.replace(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)
    for sig in pending[:1]:
        signal.raise_signal(sig)      # SIGINT: KeyboardInterrupt; SIGTERM: its usual end
    return target


def is_temporary(path) -> bool:
    """Whether ``path`` is named like a temporary file of :func:`write_atomic`."""
    return bool(_TEMPORARY.match(Path(path).name))


def leftovers(path) -> list[Path]:
    """Temporary files of interrupted writes of ``path`` (beside its real target)."""
    target = real_target(path)
    pattern = re.sub(r"([*?\[])", r"[\1]", target.name) + ".*.tmp"
    return sorted(p for p in target.parent.glob(pattern) if is_temporary(p))


def leftovers_line(found, where: str = "") -> str | None:
    """One line naming the temporary files ``found`` (None when there are none)."""
    if not found:
        return None
    names = ", ".join(str(p) for p in found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    return (f"note: ignoring {plural(len(found), 'leftover temporary file')} of an interrupted write"
            f"{where}: {names}")
