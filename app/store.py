"""What the live demos keep: the view counter and the shared documents, in SQLite.

gunicorn runs several worker processes, and any of them may answer any request, so this
state cannot live in a Python object: a counter in one worker's memory would count that
worker's views only, and a page change made in one worker would be unknown to the next.
It is kept in the demo's SQLite file in FLOW_RUN_DIR (the one demo.Tasks already uses):
SQLite serialises writers across processes by itself, an ``UPDATE ... RETURNING`` is one
atomic read-modify-write, and the values survive an app restart. A file with an fcntl
lock would do for the counter alone, but the documents need more than one value.

Every change is a single SQL statement, so no transaction reads and then writes: in WAL
mode such a transaction could fail at once (SQLITE_BUSY_SNAPSHOT) when another worker
wrote in between, instead of waiting for its turn.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .tsv import Table

# Documents kept at most; past it, the one changed longest ago is dropped. Each holds up
# to tsv.MAX_BYTES, so the demo's file stays bounded however many uploads it gets.
MAX_DOCUMENTS = 200
PAGE_ROWS = 20


def new_document_id() -> str:
    """An unguessable id (128 random bits), also valid inside a channel name (doc:<id>)."""
    return secrets.token_urlsafe(16)


class Store:
    def __init__(self, path: str, page_rows: int = PAGE_ROWS, max_documents: int = MAX_DOCUMENTS) -> None:
        self.path = path
        self.page_rows = page_rows
        self.max_documents = max_documents
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)")
            db.execute(
                "CREATE TABLE IF NOT EXISTS documents (id TEXT PRIMARY KEY, rev INTEGER NOT NULL,"
                " version INTEGER NOT NULL, page INTEGER NOT NULL, filename TEXT NOT NULL,"
                " uploaded_by TEXT NOT NULL, header TEXT NOT NULL, rows TEXT NOT NULL,"
                " row_count INTEGER NOT NULL, changed REAL NOT NULL)"
            )
            # Who may see a document: everyone who opened its URL while logged in.
            db.execute(
                "CREATE TABLE IF NOT EXISTS document_viewers (id TEXT NOT NULL, username TEXT NOT NULL,"
                " PRIMARY KEY (id, username))"
            )

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        # Autocommit: each statement is its own transaction (see the module's docstring).
        db = sqlite3.connect(self.path, timeout=10, isolation_level=None)
        try:
            yield db
        finally:
            db.close()

    # ---- the counter

    def count_view(self, name: str = "views") -> int:
        """Add one view and return the new total, atomically across every process."""
        with self._db() as db:
            (value,) = db.execute(
                "INSERT INTO counters VALUES (?, 1) ON CONFLICT (name) DO UPDATE SET value = value + 1"
                " RETURNING value", (name,)
            ).fetchone()
        return int(value)

    def counter(self, name: str = "views") -> int:
        with self._db() as db:
            row = db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    # ---- shared documents

    def create_document(self, username: str, filename: str, table: Table) -> str:
        """Keep a new document; its id. Its uploader may see it."""
        doc_id = new_document_id()
        with self._db() as db:
            db.execute(
                "INSERT INTO documents VALUES (?, 1, 1, 1, ?, ?, ?, ?, ?, ?)",
                (doc_id, filename, username, json.dumps(table.header), json.dumps(table.rows),
                 len(table.rows), time.time()),
            )
            db.execute("INSERT OR IGNORE INTO document_viewers VALUES (?, ?)", (doc_id, username))
            self._drop_oldest(db)
        return doc_id

    def _drop_oldest(self, db: sqlite3.Connection) -> None:
        db.execute(
            "DELETE FROM documents WHERE id IN (SELECT id FROM documents ORDER BY changed DESC"
            " LIMIT -1 OFFSET ?)", (self.max_documents,)
        )
        db.execute("DELETE FROM document_viewers WHERE id NOT IN (SELECT id FROM documents)")

    def replace_document(self, doc_id: str, username: str, filename: str, table: Table) -> dict[str, Any] | None:
        """A new file for the same document (its version goes up, back to page 1); the new
        state, or None when there is no such document."""
        with self._db() as db:
            row = db.execute(
                "UPDATE documents SET rev = rev + 1, version = version + 1, page = 1, filename = ?,"
                " uploaded_by = ?, header = ?, rows = ?, row_count = ?, changed = ? WHERE id = ?"
                " RETURNING *",
                (filename, username, json.dumps(table.header), json.dumps(table.rows),
                 len(table.rows), time.time(), doc_id),
            ).fetchone()
        return self._state(row)

    def set_page(self, doc_id: str, page: int) -> dict[str, Any] | None:
        """Show ``page`` (clamped to the document's pages) to every viewer; the new state,
        or None when there is no such document."""
        per = self.page_rows
        with self._db() as db:
            row = db.execute(
                "UPDATE documents SET rev = rev + 1, changed = ?,"
                " page = MAX(1, MIN(?, (row_count + ? - 1) / ?)) WHERE id = ? RETURNING *",
                (time.time(), page, per, per, doc_id),
            ).fetchone()
        return self._state(row)

    def state(self, doc_id: str) -> dict[str, Any] | None:
        with self._db() as db:
            row = db.execute("SELECT * FROM documents WHERE id = ?", (doc_id,)).fetchone()
        return self._state(row)

    def _state(self, row: tuple[Any, ...] | None) -> dict[str, Any] | None:
        """What a viewer shows: the document's current page and where it is."""
        if row is None:
            return None
        doc_id, rev, version, page, filename, uploaded_by, header, rows, row_count, _ = row
        pages = max(1, -(-row_count // self.page_rows))
        page = min(max(1, page), pages)
        first = (page - 1) * self.page_rows
        return {
            "id": doc_id, "rev": rev, "version": version, "page": page, "pages": pages,
            "page_rows": self.page_rows, "row_count": row_count, "first_row": first + 1,
            "filename": filename, "uploaded_by": uploaded_by, "header": json.loads(header),
            "rows": json.loads(rows)[first:first + self.page_rows],
        }

    def admit(self, doc_id: str, username: str) -> bool:
        """``username`` opened the document's URL: from now on they may see it. False when
        there is no such document."""
        with self._db() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO document_viewers SELECT id, ? FROM documents WHERE id = ?",
                (username, doc_id),
            )
            if cursor.rowcount:
                return True
            return db.execute("SELECT 1 FROM documents WHERE id = ?", (doc_id,)).fetchone() is not None

    def may_see(self, doc_id: str, username: str) -> bool:
        with self._db() as db:
            return db.execute(
                "SELECT 1 FROM document_viewers v JOIN documents d ON d.id = v.id"
                " WHERE v.id = ? AND v.username = ?", (doc_id, username)
            ).fetchone() is not None
