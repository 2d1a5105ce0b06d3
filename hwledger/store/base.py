"""The store's connection: opening the SQLite file (modes, WAL, migrations), write transactions, and the
append-only event log (see the package's notes for why each is the way it is)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ansible_collections.hwledger.fleet.plugins.plugin_utils import private_files

from hwledger.errors import UserError
from hwledger.store.records import EventRow, utc_now
from hwledger.store.records import where as where_clause
from hwledger.store.schema import MIGRATIONS, SCHEMA_VERSION, split_sql

log = logging.getLogger("hwledger.store")

DEFAULT_BUSY_TIMEOUT_S = 15.0
DEFAULT_SNAPSHOTS_KEPT = 12  # per agent; the latest good snapshot is kept besides these

# Set when a WAL checkpoint owed after removing a secret could not finish (a reader held an old snapshot
# too long); the server's next tick tries again (`truncate_wal_if_owed`). Process-wide: whichever
# connection removed the secret, the -wal file is the same.
_WAL_TRUNCATE_OWED = threading.Event()


class StoreError(UserError):
    """The store cannot be used (newer schema, unreadable file, read-only, full disk, gone, locked too
    long). `transient`: it may work again in a moment (another process held the lock too long)."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


# ---------------------------------------------------------------------------------------------


_UMASK_LOCK = threading.Lock()


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    # The umask is the process's: two threads opening stores at once (the server's job workers) would
    # otherwise restore each other's value and leave 077 behind for the rest of the process.
    with _UMASK_LOCK:
        old = os.umask(mask)
        try:
            yield
        finally:
            os.umask(old)


def _private_files(db: Path) -> list[Path]:
    return [db, Path(f"{db}-wal"), Path(f"{db}-shm")]


def _file_identity(path: Path) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _open_problem(path: Path, exc: sqlite3.Error) -> str:
    """Why a store could not be opened. SQLite says "unable to open database file" for a read-only file
    system too (it cannot create the -wal/-shm files beside the store): tell that case apart."""
    if "unable to open" in str(exc).lower() or "readonly" in str(exc).lower():
        for candidate in (path.parent, path):
            if candidate.exists() and not os.access(candidate, os.W_OK):
                return (f"{exc}: {candidate} is read-only for this user (or on a read-only file system); make the "
                        "store's directory and file writable, or point --db / HWLEDGER_DB at a writable store")
    return _what_went_wrong(exc, path)


def _no_room_beside(path: Path) -> bool:
    """Whether the store's file system is (nearly) full. SQLite reports a full disk as "disk I/O error"
    when it is the -shm/-wal file that cannot grow, so the message alone does not tell."""
    try:
        info = os.statvfs(path.parent)
    except OSError:
        return False
    return info.f_bavail * info.f_frsize < _NEARLY_FULL_BYTES


_NEARLY_FULL_BYTES = 64 * 1024


def _what_went_wrong(exc: sqlite3.Error, path: Path | None = None) -> str:
    """SQLite's complaint with what a person can do about it."""
    text = str(exc)
    lowered = text.lower()
    if path is not None and "disk i/o" in lowered and _no_room_beside(path):
        lowered = "disk is full"
    if "readonly" in lowered or "read-only" in lowered:
        return (f"{text}: the file or its directory is read-only for this user; make both writable (the file "
                "0600, the directory 0700, owned by you), or point --db / HWLEDGER_DB at a writable store")
    if "disk is full" in lowered or "database or disk is full" in lowered:
        return f"{text}: free some space on the store's file system and try again"
    if "locked" in lowered or "busy" in lowered:
        return f"{text}: the store is busy, another hwledger process holds it too long; try again"
    if "not a database" in lowered or "malformed" in lowered:
        return (f"{text}: the file is not an intact hwledger store; restore it from a backup or move it away "
                "(hwledger then starts a new store there)")
    if "unable to open" in lowered or "disk i/o" in lowered:
        return f"{text}: the store's file or directory cannot be used; check that it exists and that you can write it"
    return text


class StoreBase:
    """One connection to the store: opening it (migrations), write transactions, the event log. The table
    methods live in the mixins (`agents.AgentTables`, `jobs.JobTables`); `hwledger.store.Store` is them all."""

    def __init__(self, conn: sqlite3.Connection, path: Path, snapshots_kept: int):
        self._conn = conn
        self.path = path
        self.snapshots_kept = snapshots_kept
        self._identity: tuple[int, int] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
        snapshots_kept: int = DEFAULT_SNAPSHOTS_KEPT,
        read_only: bool = False,
    ):
        """Open (and create or migrate) the store. `read_only` makes this connection refuse every write
        (`PRAGMA query_only`): what `serve --http` serves can never change the store."""
        path = Path(path)
        try:
            # The user's choice of directory: created 0700 when missing, never chmod-ed, refused when others
            # can write to it (they could plant files or symlinks where the store lives).
            private_files.ensure_private_dir(path.parent, "the store's directory")
        except private_files.PrivatePathError as exc:
            raise StoreError(f"{exc}; keep the store in a private directory (hwledger creates a missing one "
                             "0700)") from None
        if path.is_symlink():
            raise StoreError(f"store {path} is a symlink; point HWLEDGER_DB/--db at the real file")
        fresh = not path.exists() or path.stat().st_size == 0
        try:
            with _umask(0o077):
                # isolation_level=None: autocommit; transactions are explicit (BEGIN IMMEDIATE).
                conn = sqlite3.connect(str(path), timeout=busy_timeout_s, isolation_level=None)
                conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
                if fresh:
                    # Pruned pages go back to the filesystem (`hwledger fleet prune`). The mode is fixed when the
                    # file is initialised, which switching to WAL does: so it comes first. An existing file
                    # keeps its mode (only a VACUUM can switch it; see retention.py).
                    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise StoreError(f"store {path}: cannot switch to WAL mode (got {mode}); "
                                     "is it on a network filesystem? Put the store on a local disk")
                conn.execute("PRAGMA synchronous = FULL")
                conn.execute("PRAGMA foreign_keys = ON")
                # Deleted and overwritten content is zeroed, not left in free pages: a job's env values,
                # removed once it runs, must not linger in the file.
                conn.execute("PRAGMA secure_delete = ON")
                store = cls(conn, path, snapshots_kept)
                store._migrate()
                # Reading once creates the -shm file under our umask before we fix modes.
                conn.execute("SELECT count(*) FROM agents").fetchone()
                if read_only:
                    conn.execute("PRAGMA query_only = ON")
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot open store {path}: {_open_problem(path, exc)}") from exc
        for file in _private_files(path):
            with contextlib.suppress(FileNotFoundError):
                if file.stat().st_mode & 0o077:
                    os.chmod(file, 0o600)
        store._identity = _file_identity(path)
        return store

    def check_file(self) -> None:
        """Raise StoreError when the store's file is gone or was replaced since it was opened.

        SQLite keeps writing to the file it opened, deleted or not: without this check a server whose store
        was removed would record into a file nobody can see, and `fleet status` would read a new, empty one.
        """
        identity = _file_identity(self.path)
        if identity is None:
            raise StoreError(f"the store {self.path} was deleted while hwledger had it open; nothing written since "
                             "can be read back. Restore it, or restart hwledger to start a new store there")
        if identity != self._identity:
            raise StoreError(f"the store {self.path} was replaced by another file while hwledger had it open; "
                             "restart hwledger to use the new file")

    def close(self) -> None:
        self._conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """An immediate write transaction; commits on success, rolls back on any exception. What SQLite
        refuses (busy too long, a read-only file, a full disk, a damaged file) becomes a StoreError that
        says what to do."""
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise self._write_error(exc) from exc
        try:
            yield self._conn
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise self._write_error(exc) from exc
            raise
        try:
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")
            raise self._write_error(exc) from exc

    def _write_error(self, exc: sqlite3.Error) -> StoreError:
        lowered = str(exc).lower()
        return StoreError(f"cannot write to the store {self.path}: {_what_went_wrong(exc, self.path)}",
                          transient="locked" in lowered or "busy" in lowered)

    def _migrate(self) -> None:
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"store {self.path} has schema version {version}, newer than this hwledger understands "
                f"({SCHEMA_VERSION}); upgrade hwledger or use another --db"
            )
        while version < SCHEMA_VERSION:
            with self._write() as conn:
                # Re-read under the write lock: another process may have migrated meanwhile.
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version >= SCHEMA_VERSION:
                    break
                for statement in split_sql(MIGRATIONS[version]):
                    conn.execute(statement)
                version += 1
                conn.execute(f"PRAGMA user_version = {version}")

    def truncate_wal(self) -> bool:
        """Checkpoint the whole WAL into the database and truncate the -wal file to zero bytes.

        Why: a row rewritten to remove a secret (a job's env values) leaves its old image in the -wal file
        until the log is checkpointed and reset; with `secure_delete` the database file itself keeps no
        copy. False (and retried by the server's next tick) when a reader kept the log busy."""
        try:
            busy = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        except sqlite3.Error:
            busy = 1
        if busy:
            log.warning("the store's WAL could not be truncated yet (another connection reads an old snapshot); "
                        "trying again at the next tick")
            _WAL_TRUNCATE_OWED.set()
            return False
        _WAL_TRUNCATE_OWED.clear()
        return True

    def truncate_wal_if_owed(self) -> bool:
        """Retry a WAL truncation that could not finish earlier. True when none is owed any more."""
        return self.truncate_wal() if _WAL_TRUNCATE_OWED.is_set() else True

    @property
    def schema_version(self) -> int:
        return self._conn.execute("PRAGMA user_version").fetchone()[0]

    # -- events ----------------------------------------------------------------------------

    @staticmethod
    def _event(conn: sqlite3.Connection, kind: str, *, agent: str | None = None, job_id: str | None = None,
               at: str | None = None, **detail: Any) -> None:
        conn.execute(
            "INSERT INTO events (at, kind, agent, job_id, detail) VALUES (?, ?, ?, ?, ?)",
            (at or utc_now(), kind, agent, job_id, json.dumps(detail, sort_keys=True)),
        )

    def add_event(self, kind: str, *, agent: str | None = None, job_id: str | None = None, **detail: Any) -> None:
        with self._write() as conn:
            self._event(conn, kind, agent=agent, job_id=job_id, **detail)

    def list_events(self, *, agent: str | None = None, job_id: str | None = None, kind: str | None = None,
                    limit: int | None = None) -> list[EventRow]:
        where, params = where_clause(agent=agent, job_id=job_id, kind=kind)
        sql = f"SELECT id, at, kind, agent, job_id, detail FROM events{where} ORDER BY id"
        if limit:
            sql = f"SELECT * FROM ({sql.replace('ORDER BY id', 'ORDER BY id DESC')} LIMIT {int(limit)}) ORDER BY id"
        return [EventRow(r[0], r[1], r[2], r[3], r[4], json.loads(r[5] or "{}"))
                for r in self._conn.execute(sql, params)]
