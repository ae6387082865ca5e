"""Local scratch files and folders named after their owner, and the removal of those whose owner
died without removing them.

A scratch entry is named ``t2i-<kind>-<owner>-<pid>-<random><suffix>``: ``owner`` is 8 hex
digits of a hash of the host name and PID namespace of the process that made it, then its PID and
``tempfile``'s 8 random characters. Names stay short: the download's folder is the TMPDIR of a
local Ray, whose socket paths under it must fit in 107 bytes (a 63-character pod name would not). A run killed by SIGKILL, the
OOM killer or a preemption leaves its entries behind; the next entry of a kind that a process
makes in a folder first removes, once per process, the stale siblings of that kind there (one
listing of the folder). An entry counts as stale only when all of these hold:

- its name matches the pattern exactly, with this kind and this owner: host and PID namespace (a
  ``/tmp`` shared across nodes, or with containers of the same host name, keeps the others'
  entries: their PIDs mean nothing here);
- its PID is not alive (``os.kill(pid, 0)`` raises ``ProcessLookupError``; a
  ``PermissionError`` means alive, under another user). A reused PID keeps an entry: a leak,
  never a loss. An entry of this process's own PID older than this process is a predecessor's
  (a container's job restarted as PID 1 again): stale too;
- it belongs to this user and was last modified before this process started (a leftover of a
  killed run always is; one that a process we cannot see, e.g. in another PID namespace, has
  changed since is kept. A folder's time changes only as its own entries come and go).

Kinds are ``[a-z0-9_]`` (no ``-``) and PIDs at most 7 digits (Linux's ``pid_max`` is at most
2**22), so a name parses one way only.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import socket
import stat
import tempfile
import threading
import time

log = logging.getLogger(__name__)  # stdlib only: storage imports this module

# a stand-in for the process start (the module is imported early): entries modified later are
# kept whatever their PID says; a forked child keeps its parent's, which is earlier still
_STARTED = time.time()
_KIND_RE = re.compile(r"[a-z0-9_]+")
_swept: set[tuple[int, str, str]] = set()  # (pid, kind, folder) already swept
_swept_lock = threading.Lock()


def _new_lock_in_child() -> None:
    """A fork while another thread holds the lock would leave the child's copy held for ever."""
    global _swept_lock
    _swept_lock = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_in_child)


def _host() -> str:
    """This host's name, kept to characters safe in a file name."""
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"


def _check_kind(kind: str) -> str:
    if not _KIND_RE.fullmatch(kind):
        raise ValueError(f"scratch kind must be [a-z0-9_]+, got {kind!r}")
    return kind


def _pid_namespace() -> str:
    """This process's PID namespace (the inode of /proc/self/ns/pid; "0" where unreadable)."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "0"


def _owner() -> str:
    """8 hex digits naming this host and PID namespace (whose PIDs mean something here)."""
    key = f"{_host()}\0{_pid_namespace()}".encode()
    return hashlib.blake2s(key, digest_size=4).hexdigest()


def prefix(kind: str) -> str:
    """The name prefix of this process's ``kind`` entries: ``t2i-<kind>-<owner>-<pid>-``."""
    return f"t2i-{_check_kind(kind)}-{_owner()}-{os.getpid()}-"


def _pattern(kind: str) -> re.Pattern[str]:
    """Names of ``kind`` entries of the processes of this host and PID namespace; group 1 is the
    PID."""
    head = re.escape(f"t2i-{_check_kind(kind)}-{_owner()}-")
    return re.compile(head + r"([1-9][0-9]{0,6})-[a-z0-9_]{8}.*", re.DOTALL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, under another user
        return True
    return True


def _size(path: str, st: os.stat_result) -> int:
    """Bytes of a file, or of the files under a folder (links not followed)."""
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def remove_stale(kind: str, dir: str | None = None) -> tuple[int, int]:
    """Remove the stale ``kind`` entries in ``dir`` (default: the temp folder) left by dead
    processes of this host (see the module docstring); returns (entries, bytes) removed."""
    folder = dir or tempfile.gettempdir()
    pattern = _pattern(kind)
    me, uid = os.getpid(), os.getuid()
    removed = n_bytes = 0
    try:
        entries = list(os.scandir(folder))
    except OSError as e:  # making the entry will say what is wrong with the folder
        log.debug("scratch: cannot list %s: %s", folder, e)
        return 0, 0
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        pid = None if match is None else int(match.group(1))
        # this PID's own entries are this process's, but for those from before it started
        if pid is None or (pid != me and _alive(pid)):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if st.st_uid != uid or st.st_mtime >= _STARTED:
                continue
            size = _size(entry.path, st)
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(entry.path)
            else:
                os.remove(entry.path)
        except OSError as e:  # gone meanwhile (another process swept it), or not ours to remove
            log.debug("scratch: cannot remove %s: %s", entry.path, e)
            continue
        removed += 1
        n_bytes += size
    if removed:
        log.info(
            "scratch: removed %d stale %s entries (%d bytes) of dead processes of this host in %s",
            removed, kind, n_bytes, folder,
        )  # fmt: skip
    return removed, n_bytes


def _sweep_once(kind: str, dir: str | None) -> None:
    """``remove_stale`` the first time this process makes a ``kind`` entry in this folder."""
    key = (os.getpid(), kind, os.path.realpath(dir or tempfile.gettempdir()))
    with _swept_lock:
        if key in _swept:
            return
        _swept.add(key)
    remove_stale(kind, dir)


def mkstemp(kind: str, suffix: str = "", dir: str | None = None) -> tuple[int, str]:
    """``tempfile.mkstemp`` with an owner-named ``kind`` prefix; the caller removes the file."""
    _sweep_once(kind, dir)
    return tempfile.mkstemp(suffix=suffix, prefix=prefix(kind), dir=dir)


def mkdtemp(kind: str, suffix: str = "", dir: str | None = None) -> str:
    """``tempfile.mkdtemp`` with an owner-named ``kind`` prefix; the caller removes the folder."""
    _sweep_once(kind, dir)
    return tempfile.mkdtemp(suffix=suffix, prefix=prefix(kind), dir=dir)


def temporary_directory(kind: str, dir: str | None = None) -> tempfile.TemporaryDirectory[str]:
    """``tempfile.TemporaryDirectory`` with an owner-named ``kind`` prefix."""
    _sweep_once(kind, dir)
    return tempfile.TemporaryDirectory(prefix=prefix(kind), dir=dir)
