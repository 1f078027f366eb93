"""The ZVM's SQLite store: schema migrations and a small document API.

Every object the ZVM owns (peer sites, VRAs, VPG settings, VPGs, tasks, alerts, events,
recovery reports) is a JSON document in a table of its own, keyed by its identifier, with the
few columns queries filter on. Schema changes are appended to ``MIGRATIONS`` and never edited:
``PRAGMA user_version`` says how many have run, and opening a store runs the rest in one
transaction each.

One connection per thread (gunicorn's threads, background jobs); WAL mode so readers never
wait for the writer; ``transaction()`` serializes read-modify-write sequences.
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path

DOC_TABLES = ("peers", "vras", "vpg_settings", "vpgs", "tasks", "alerts", "events", "reports")

MIGRATIONS: list[str] = [
    # 1: the first schema
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE users (name TEXT PRIMARY KEY, pw_hash TEXT NOT NULL, role TEXT NOT NULL,
                        created REAL NOT NULL);
    CREATE TABLE clients (client_id TEXT PRIMARY KEY, secret_hash TEXT NOT NULL,
                          role TEXT NOT NULL, description TEXT NOT NULL DEFAULT '',
                          created REAL NOT NULL);
    CREATE TABLE tokens (token_hash TEXT PRIMARY KEY, subject TEXT NOT NULL, role TEXT NOT NULL,
                         expires REAL NOT NULL);
    CREATE TABLE pairing_tokens (token_hash TEXT PRIMARY KEY, expires REAL NOT NULL);
    CREATE TABLE peers (id TEXT PRIMARY KEY, doc TEXT NOT NULL);
    CREATE TABLE vras (id TEXT PRIMARY KEY, doc TEXT NOT NULL);
    CREATE TABLE vpg_settings (id TEXT PRIMARY KEY, doc TEXT NOT NULL);
    CREATE TABLE vpgs (id TEXT PRIMARY KEY, doc TEXT NOT NULL);
    CREATE TABLE tasks (id TEXT PRIMARY KEY, doc TEXT NOT NULL, created REAL NOT NULL DEFAULT 0);
    CREATE TABLE alerts (id TEXT PRIMARY KEY, doc TEXT NOT NULL, created REAL NOT NULL DEFAULT 0);
    CREATE TABLE events (id TEXT PRIMARY KEY, doc TEXT NOT NULL, created REAL NOT NULL DEFAULT 0);
    CREATE TABLE reports (id TEXT PRIMARY KEY, doc TEXT NOT NULL, created REAL NOT NULL DEFAULT 0);
    CREATE INDEX tasks_created ON tasks (created);
    CREATE INDEX alerts_created ON alerts (created);
    CREATE INDEX events_created ON events (created);
    CREATE INDEX reports_created ON reports (created);
    """,
]


class Store:
    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._write_lock = threading.RLock()
        fresh = not os.path.exists(self.path)
        self.migrate()
        if fresh:
            os.chmod(self.path, 0o600)      # holds password and secret hashes

    # -- connections and schema
    def conn(self) -> sqlite3.Connection:
        c = getattr(self._local, "conn", None)
        if c is None:
            c = sqlite3.connect(self.path, timeout=30, isolation_level=None,
                                check_same_thread=False)
            c.execute("PRAGMA journal_mode=WAL")
            c.execute("PRAGMA synchronous=NORMAL")
            c.execute("PRAGMA busy_timeout=30000")
            c.row_factory = sqlite3.Row
            self._local.conn = c
        return c

    def migrate(self) -> int:
        c = self.conn()
        with self._write_lock:
            version = c.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise RuntimeError(f"the store {self.path} has schema {version}, newer than this "
                                   f"ZVM knows ({len(MIGRATIONS)}): upgrade the ZVM")
            for n in range(version, len(MIGRATIONS)):
                c.execute("BEGIN IMMEDIATE")
                try:
                    for stmt in MIGRATIONS[n].split(";"):
                        if stmt.strip():
                            c.execute(stmt)
                    c.execute(f"PRAGMA user_version={n + 1}")
                    c.execute("COMMIT")
                except BaseException:
                    c.execute("ROLLBACK")
                    raise
        return len(MIGRATIONS)

    def schema_version(self) -> int:
        return self.conn().execute("PRAGMA user_version").fetchone()[0]

    @contextmanager
    def transaction(self):
        """A write transaction: read-modify-write sequences inside it are atomic."""
        with self._write_lock:
            c = self.conn()
            if c.in_transaction:            # nested: the outer one commits
                yield c
                return
            c.execute("BEGIN IMMEDIATE")
            try:
                yield c
            except BaseException:
                c.execute("ROLLBACK")
                raise
            c.execute("COMMIT")

    def execute(self, sql: str, args=()) -> sqlite3.Cursor:
        with self.transaction() as c:
            return c.execute(sql, args)

    def query(self, sql: str, args=()) -> list[sqlite3.Row]:
        return self.conn().execute(sql, args).fetchall()

    def close(self):
        c = getattr(self._local, "conn", None)
        if c is not None:
            c.close()
            self._local.conn = None

    # -- meta
    def meta(self, key: str, default: str | None = None) -> str | None:
        row = self.conn().execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, key: str, value: str) -> None:
        self.execute("INSERT INTO meta (key, value) VALUES (?, ?) "
                     "ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, value))

    # -- documents
    def put(self, table: str, id: str, doc: dict) -> dict:
        _check(table)
        created = doc.get("_created", time.time())
        self.execute(f"INSERT INTO {table} (id, doc{', created' if _timed(table) else ''}) "
                     f"VALUES (?, ?{', ?' if _timed(table) else ''}) "
                     "ON CONFLICT(id) DO UPDATE SET doc=excluded.doc",
                     (id, json.dumps(doc), created) if _timed(table) else (id, json.dumps(doc)))
        return doc

    def get(self, table: str, id: str) -> dict | None:
        _check(table)
        row = self.conn().execute(f"SELECT doc FROM {table} WHERE id=?", (id,)).fetchone()
        return json.loads(row[0]) if row else None

    def delete(self, table: str, id: str) -> bool:
        _check(table)
        return self.execute(f"DELETE FROM {table} WHERE id=?", (id,)).rowcount > 0

    def all(self, table: str, limit: int | None = None) -> list[dict]:
        _check(table)
        order = " ORDER BY created DESC" if _timed(table) else " ORDER BY rowid"
        sql = f"SELECT doc FROM {table}{order}" + (f" LIMIT {int(limit)}" if limit else "")
        return [json.loads(r[0]) for r in self.conn().execute(sql).fetchall()]

    @contextmanager
    def update(self, table: str, id: str):
        """Read, change and write one document atomically: ``with store.update(t, id) as doc:``."""
        with self.transaction():
            doc = self.get(table, id)
            if doc is None:
                raise KeyError(f"{table}/{id}")
            yield doc
            self.put(table, id, doc)


def _check(table: str) -> None:
    if table not in DOC_TABLES:
        raise ValueError(f"no document table {table!r}")


def _timed(table: str) -> bool:
    return table in ("tasks", "alerts", "events", "reports")
