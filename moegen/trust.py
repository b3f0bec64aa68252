"""Ownership and permission checks for the kernel cache.

A kernel binary is code that this process will load and run, so a cache directory or entry file
that somebody else could have written is not used:

- a path that is a symlink is refused (it may point anywhere, and may be swapped later);
- a path owned by another user is refused (prebuilt layers may also be owned by root, since
  deployments install them as root into images);
- a path that is group- or world-writable is refused.

Each check returns ``None`` when the path is fine, else a sentence saying why, for the log.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def current_uid() -> int:
    """The effective uid entries must be owned by (a function so tests can pretend)."""
    return os.geteuid()


def check_stat(st: os.stat_result, path: Path | str, *, what: str = "path",
               allow_root: bool = False) -> str | None:
    """Why a file or directory with this ``lstat``/``fstat`` result must not be trusted, or None."""
    if stat.S_ISLNK(st.st_mode):
        return f"{what} {path} is a symlink"
    uid = current_uid()
    if st.st_uid != uid and not (allow_root and st.st_uid == 0):
        owners = "the current user or root" if allow_root else "the current user"
        return f"{what} {path} is owned by uid {st.st_uid}, not {owners} (uid {uid})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (f"{what} {path} is group- or world-writable (mode {stat.S_IMODE(st.st_mode):#o}); "
                f"run `chmod go-w {path}` if you trust its contents")
    return None


def check_path(path: Path | str, *, what: str = "path", allow_root: bool = False,
               kind: str | None = None) -> str | None:
    """Check ``path`` itself (not following a final symlink).

    ``kind`` is ``"dir"`` or ``"file"`` to also require that type.  A missing path is reported.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return f"{what} {path} does not exist"
    except OSError as exc:
        return f"{what} {path} cannot be inspected: {exc.strerror or exc}"
    reason = check_stat(st, path, what=what, allow_root=allow_root)
    if reason:
        return reason
    if kind == "dir" and not stat.S_ISDIR(st.st_mode):
        return f"{what} {path} is not a directory"
    if kind == "file" and not stat.S_ISREG(st.st_mode):
        return f"{what} {path} is not a regular file"
    return None


def check_open_file(fileobj, path: Path | str, *, what: str = "entry file",
                    allow_root: bool = False) -> str | None:
    """Check a file we have already opened: the path must not be a symlink now, and the opened
    file (``fstat``, so no swap between check and read) must be a regular file we trust."""
    try:
        if stat.S_ISLNK(os.lstat(path).st_mode):
            return f"{what} {path} is a symlink"
        st = os.fstat(fileobj.fileno())
    except OSError as exc:
        return f"{what} {path} cannot be inspected: {exc.strerror or exc}"
    if not stat.S_ISREG(st.st_mode):
        return f"{what} {path} is not a regular file"
    return check_stat(st, path, what=what, allow_root=allow_root)
