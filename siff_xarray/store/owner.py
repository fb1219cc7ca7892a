"""Which conversion owns a store being written: one writer at a time, stale owners taken over.

A conversion claims its destination before it writes anything
(``.siff-progress/owner.json``: a run id, host, process id and start time, and a
heartbeat refreshed after every batch). Another conversion of the same store
(``--overwrite``, ``--resume``, or a second copy of a batch job) refuses to start
while that owner is alive, instead of deleting or mixing a store that is being
written; every batch and the final publishing step check that their run still
owns the store, so a run that lost it stops before it publishes anything.

An owner is alive when it runs on this host and its process (same id *and* start
time, so a reused process id does not count) exists, or when it runs on another
host and its heartbeat is younger than :data:`STALE_AFTER_S`. A dead owner (a
killed conversion) is taken over by ``resume`` or ``overwrite``.

On local disks the claim is an exclusive create (two conversions started at the
same instant cannot both claim); on object storage, which has no such operation
here, the later claim wins and the other run stops at its next check.

Import rule: the leaves (``errors``) and ``layout`` only.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from typing import Any

from .._paths import is_remote, local_path
from ..errors import ConversionError
from .layout import PROGRESS, Target

__all__ = ["OWNER_KEY", "STALE_AFTER_S", "check", "claim", "describe", "heartbeat",
           "live_owner", "new_run_id", "refuse_if_owned", "release"]

OWNER_KEY = f"{PROGRESS}/owner.json"
#: seconds without a heartbeat after which an owner on another host counts as gone
STALE_AFTER_S = 15 * 60.0


def new_run_id() -> str:
    """Return a fresh, unique id for one conversion run."""
    return uuid.uuid4().hex


def _process_start(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot (Linux), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode(errors="replace")
    except OSError:
        return None
    try:  # the command name (field 2) may hold spaces and parentheses: split after it
        return int(stat[stat.rindex(")") + 2 :].split()[19])
    except (ValueError, IndexError):
        return None


def _record(run_id: str) -> dict[str, Any]:
    pid = os.getpid()
    return {"run": run_id, "host": socket.gethostname(), "pid": pid,
            "pid_start": _process_start(pid), "heartbeat": time.time()}


def _read(target: Target) -> dict[str, Any] | None:
    target.fs.invalidate_cache()
    try:
        rec = json.loads(target.read_text(OWNER_KEY))
    except (OSError, ValueError):  # none, or half-written by a killed claim
        return None
    return rec if isinstance(rec, dict) else None


def _alive(rec: dict[str, Any]) -> bool:
    if rec.get("host") == socket.gethostname():
        pid = int(rec.get("pid", -1))
        if pid <= 0:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, owned by another user
            pass
        start = rec.get("pid_start")
        return start is None or _process_start(pid) in (None, start)
    return time.time() - float(rec.get("heartbeat", 0.0)) < STALE_AFTER_S


def describe(rec: dict[str, Any]) -> str:
    """Say who an owner record names, for messages."""
    age = time.time() - float(rec.get("heartbeat", 0.0))
    return (f"process {rec.get('pid')} on host {rec.get('host')}, last active "
            f"{age:.0f} s ago")


def live_owner(target: Target, run_id: str | None = None) -> dict[str, Any] | None:
    """Return the record of a living conversion other than ``run_id`` that owns the store."""
    rec = _read(target)
    if rec is None or rec.get("run") == run_id or not _alive(rec):
        return None
    return rec


def _busy(target: Target, rec: dict[str, Any]) -> ConversionError:
    return ConversionError(
        f"{target.destination}: another conversion is writing this store ({describe(rec)}); "
        "wait for it to finish, or stop it and resume (--resume). If it is gone (killed on "
        f"another machine), delete {target.key(OWNER_KEY)} and resume")


def refuse_if_owned(target: Target) -> None:
    """Raise ConversionError if a living conversion owns the store."""
    rec = live_owner(target)
    if rec is not None:
        raise _busy(target, rec)


def claim(target: Target, run_id: str) -> None:
    """Make run ``run_id`` the owner of the store, unless a living conversion is.

    Raises
    ------
    ConversionError
        If another conversion that is alive owns the store (or claimed it first).

    """
    text = json.dumps(_record(run_id))
    if not is_remote(target.destination):
        path = os.path.join(local_path(target.destination), *OWNER_KEY.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                rec = _read(target)
                if rec is not None and rec.get("run") == run_id:
                    break  # ours already (claimed again after a restart of the layout)
                if rec is not None and _alive(rec):
                    raise _busy(target, rec) from None
                # a dead owner: move its record aside (only one taker succeeds)
                with contextlib.suppress(FileNotFoundError):
                    os.rename(path, f"{path}.{uuid.uuid4().hex}.stale")
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
            break
        else:  # pragma: no cover - three takers raced for one dead owner
            raise ConversionError(f"{target.destination}: could not claim the store")
    else:
        rec = live_owner(target, run_id)
        if rec is not None:
            raise _busy(target, rec)
        target.write_text(OWNER_KEY, text)
    check(target, run_id)


def check(target: Target, run_id: str) -> None:
    """Raise ConversionError unless run ``run_id`` still owns the store."""
    rec = _read(target)
    if rec is None or rec.get("run") != run_id:
        who = f" ({describe(rec)})" if rec else ""
        raise ConversionError(
            f"{target.destination}: another conversion took this store over{who}; this one "
            "stops without publishing anything")


def release(target: Target, run_id: str) -> None:
    """Give the store up (a conversion that stopped with an error): resume may take it."""
    rec = _read(target)
    if rec is not None and rec.get("run") == run_id:
        with contextlib.suppress(OSError):
            target.fs.rm(target.key(OWNER_KEY))


def heartbeat(target: Target, run_id: str) -> None:
    """Refresh the owner's heartbeat (after each batch); raise if the store was taken over."""
    check(target, run_id)
    if is_remote(target.destination):
        target.write_text(OWNER_KEY, json.dumps(_record(run_id)))
    else:  # atomically: a reader never sees a half-written record
        target.write_text(OWNER_KEY, json.dumps(_record(run_id)), atomic=True)
