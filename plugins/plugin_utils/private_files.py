# Copyright: hwledger-fleet developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""Files only this user may touch: private directories, atomic writes and advisory locks.

The one home of these three for everything hwledger writes: the app (the store's directory, results,
run dirs, ssh control sockets, known_hosts, the agents file, the server lock), the action plugins (a
published job result) and the remote job runner (its result file). Standard library only and Python
3.8 compatible, because the job runner carries it to the GPU hosts.

Why so careful: hwledger writes where other local users may also write (a shared /tmp, a results
directory on a multi-user controller). A directory another user can write to lets them plant a symlink
or a file under a name we are about to write, or swap one we just checked; so a directory of ours must
be a real directory, ours, and writable by nobody else, and files are created with O_EXCL|O_NOFOLLOW
and renamed into place.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import secrets
import stat

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


class PrivatePathError(ValueError):
    """A directory or file that is not safe to use (or cannot be made); the message says why and how to fix it."""


class LockHeld(PrivatePathError):
    """A non-blocking lock is held by another process; ``holder`` is what it wrote into the lock file."""

    def __init__(self, message, holder=""):
        super().__init__(message)
        self.holder = holder


# --------------------------------------------------------------------------------------------------
# Private directories


def make_dirs(path):
    """Create ``path`` and every missing parent with mode 0700, whatever the umask (XDG asks this of its
    base directories; ``os.makedirs`` would give the parents the umask's mode). True when ``path`` itself
    was created here, False when it existed (or another process made it meanwhile)."""
    path = os.path.abspath(os.fspath(path))
    missing = []
    candidate = path
    while not os.path.lexists(candidate):
        missing.append(candidate)
        parent = os.path.dirname(candidate)
        if parent == candidate:
            break
        candidate = parent
    created = False
    for directory in reversed(missing):
        try:
            os.mkdir(directory, PRIVATE_DIR_MODE)
            os.chmod(directory, PRIVATE_DIR_MODE)  # mkdir's mode is filtered by the umask
            created = directory == path
        except FileExistsError:
            created = False
        except OSError as exc:
            raise PrivatePathError("cannot create the directory %s: %s" % (directory, exc.strerror or exc)) from None
    return created


def _who_can_write(mode):
    if mode & 0o022 == 0o022:
        return "group and others"
    return "its group" if mode & 0o020 else "others"


def private_dir_problem(path, what="the directory", harm="plant or swap files there"):
    """Why ``path`` is not a safe private directory, or None when it is: a real directory (not a symlink),
    owned by the effective user, writable by nobody else (readable by others is fine: what we keep there
    is 0600). ``what`` names it in the message; ``harm`` says what another user could do there."""
    path = os.fspath(path)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return "%s %s does not exist" % (what, path)
    except OSError as exc:
        return "cannot inspect %s %s: %s" % (what, path, exc.strerror or exc)
    if stat.S_ISLNK(info.st_mode):
        return ("%s %s is a symlink (to %s), not a plain directory; give the real directory instead, so nobody "
                "can re-point it" % (what, path, os.path.realpath(path)))
    if not stat.S_ISDIR(info.st_mode):
        return ("%s %s is not a plain directory: it exists and is not a directory; remove it or choose another "
                "path" % (what, path))
    if info.st_uid != os.geteuid():
        return ("%s %s is owned by uid %d, not by you (uid %d); use a directory of your own"
                % (what, path, info.st_uid, os.geteuid()))
    if info.st_mode & 0o022:
        return ("%s %s is writable by %s (mode %04o); a directory writable by group or others lets another user "
                "%s. It must belong to you and not be writable by others: run chmod go-w %s (or chmod 700), or "
                "use a private directory (a missing one is created 0700)"
                % (what, path, _who_can_write(info.st_mode), stat.S_IMODE(info.st_mode), harm, path))
    return None


def ensure_private_dir(path, what="the directory", *, tighten=False, harm="plant or swap files there"):
    """A private directory at ``path``: created 0700 (with missing parents) when absent, checked otherwise.

    ``tighten``: the directory is hwledger's own by name (``results/``, ``runs/``, a control socket dir),
    so a looser mode is set back to 0700 rather than refused. Without it (a directory the user chose,
    e.g. the store's, which may be one they share on purpose) a writable-by-others directory is refused
    and never chmod-ed. Raises PrivatePathError. Returns ``path``.
    """
    if make_dirs(path):
        return path
    if tighten:
        try:
            info = os.lstat(path)
        except OSError:
            info = None
        if (info is not None and stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid()
                and info.st_mode & 0o077):
            os.chmod(path, PRIVATE_DIR_MODE)
    problem = private_dir_problem(path, what, harm)
    if problem is not None:
        raise PrivatePathError(problem)
    return path


# --------------------------------------------------------------------------------------------------
# Atomic writes


def _dir_fd_supported():
    return all(func in os.supports_dir_fd for func in (os.open, os.rename, os.stat, os.unlink))


def _refuse_unsafe_target(name, dir_fd, display):
    try:
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False) if dir_fd is not None else os.lstat(name)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode):
        raise PrivatePathError("refusing to write %s: it is a symlink" % display)
    if not stat.S_ISREG(info.st_mode):
        raise PrivatePathError("refusing to write %s: it exists and is not a regular file" % display)


def write_atomically(path, data):
    """Write ``data`` (bytes) to ``path`` atomically, mode 0600; return the sha256 hex digest of the bytes.

    A temp file is created next to the target with O_CREAT|O_EXCL|O_NOFOLLOW (mode 0600), written,
    fsync'ed and renamed over the target, and the directory is fsync'ed. A target that is a symlink or
    not a regular file is refused, before and again just before the rename. Readers see the old file
    or the new one, never half of one. Raises PrivatePathError.
    """
    display = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(display))
    if not name:
        raise PrivatePathError("output path %r names a directory, not a file" % display)
    use_dir_fd = _dir_fd_supported()
    try:
        dir_fd = (os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
                  if use_dir_fd else None)
    except OSError as exc:
        raise PrivatePathError("cannot open the directory %s: %s" % (directory, exc.strerror or exc)) from None
    try:
        at = (lambda leaf: leaf) if use_dir_fd else (lambda leaf: os.path.join(directory, leaf))
        _refuse_unsafe_target(at(name), dir_fd, display)
        tmp = _create_temp(directory, name, dir_fd, at, data)
        try:
            _refuse_unsafe_target(at(name), dir_fd, display)
            os.rename(at(tmp), at(name), src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            _unlink_quietly(at(tmp), dir_fd)
            raise
        if dir_fd is not None:
            try:
                os.fsync(dir_fd)
            except OSError:
                pass  # some file systems cannot fsync a directory; the rename is still atomic
    except OSError as exc:
        raise PrivatePathError("cannot write %s: %s" % (display, exc.strerror or exc)) from None
    finally:
        if dir_fd is not None:
            os.close(dir_fd)
    return hashlib.sha256(data).hexdigest()


def _create_temp(directory, name, dir_fd, at, data):
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for _attempt in range(5):
        tmp = ".%s.%s.tmp" % (name, secrets.token_hex(8))
        try:
            fd = os.open(at(tmp), flags, PRIVATE_FILE_MODE, dir_fd=dir_fd)
        except FileExistsError:
            continue  # someone planted that name: pick another, never reuse it
        try:
            os.fchmod(fd, PRIVATE_FILE_MODE)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            _unlink_quietly(at(tmp), dir_fd)
            raise
        os.close(fd)
        return tmp
    raise PrivatePathError("could not create a temp file in %s: every name tried already existed" % directory)


def _unlink_quietly(path, dir_fd):
    try:
        os.unlink(path, dir_fd=dir_fd)
    except OSError:
        pass


# --------------------------------------------------------------------------------------------------
# Locks


def acquire_lock(path, *, blocking=True, note=None):
    """An exclusive flock on ``path`` (created 0600, never through a symlink); returns its descriptor, which
    holds the lock until it is closed. The kernel drops the lock when the process dies, however it dies,
    so a stale lock never blocks anyone; O_CLOEXEC keeps children (an ssh master that outlives us) from
    holding it. ``note``, written into the file once the lock is held, tells the next comer who holds it
    (a pid). Non-blocking and held elsewhere: LockHeld with the holder's note."""
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0),
                     PRIVATE_FILE_MODE)
    except OSError as exc:
        raise PrivatePathError("cannot open the lock file %s: %s" % (path, exc.strerror or exc)) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        os.close(fd)
        raise LockHeld("%s is locked by another process" % path, holder) from None
    except BaseException:
        os.close(fd)
        raise
    if note is not None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, note.encode("utf-8"), 0)
    return fd


@contextlib.contextmanager
def locked_beside(target):
    """Hold an exclusive lock on ``.<name>.lock`` next to ``target`` while the block runs, so that
    concurrent read-modify-write edits of ``target`` (known_hosts, the agents file) serialise."""
    directory, name = os.path.split(os.path.abspath(os.fspath(target)))
    make_dirs(directory)
    fd = acquire_lock(os.path.join(directory, ".%s.lock" % name))
    try:
        yield
    finally:
        os.close(fd)
