"""The durable feedback store: preference pairs in SQLite, from acknowledgement to training.

Contract (what makes training at-least-once and nothing acknowledged lost):
- ``add`` commits before it returns (WAL, ``synchronous=FULL``): once the HTTP answer is sent, the
  pairs survive a crash of the process or the machine.
- A pair leaves ``pending`` only when the trainer says so (``mark_trained`` after its optimizer
  step, ``set_aside`` after too many bad tries). Whatever is still ``pending`` at a restart comes
  back from ``pending()``, so a pair may be trained twice but never skipped.
- Reference log-probs (``set_reference``) are computed once per pair and kept across restarts.

The methods are synchronous and cheap; async callers use ``asyncio.to_thread``. One thread at a
time uses the connection (a lock), but any thread may (``check_same_thread=False``).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

PairState = Literal["pending", "trained", "set_aside"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pairs (
    id TEXT PRIMARY KEY,
    prompt TEXT NOT NULL,
    chosen TEXT NOT NULL,
    rejected TEXT NOT NULL,
    created_s REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'trained', 'set_aside')),
    attempts INTEGER NOT NULL DEFAULT 0,
    ref_chosen REAL,
    ref_rejected REAL,
    last_loss REAL,
    is_chat INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS pairs_by_state ON pairs (state, created_s);
"""
_COLUMNS = "id, prompt, chosen, rejected, created_s, state, attempts, ref_chosen, ref_rejected, last_loss, is_chat"


@dataclass(frozen=True, slots=True)
class NewPair:
    """A pair as received: ``prompt`` is the text the model sees (a chat already rendered)."""

    prompt: str
    chosen: str
    rejected: str
    id: str | None = None  # the client's; None: the store makes a uuid4 hex
    # A rendered chat template carries its own special tokens; a plain prompt is encoded the way
    # /v1/completions encodes it (with the tokenizer's own, e.g. BOS).
    is_chat: bool = False


@dataclass(frozen=True, slots=True)
class FeedbackPair:
    """A stored pair, as the trainer reads it."""

    id: str
    prompt: str
    chosen: str
    rejected: str
    created_s: float  # unix seconds it was stored
    state: PairState
    attempts: int  # training tries recorded so far
    ref_chosen: float | None  # reference log-probs of the responses (None: not computed yet)
    ref_rejected: float | None
    last_loss: float | None  # DPO loss of the latest try (NaN is stored as None)
    is_chat: bool = False  # encode the prompt without adding special tokens

    @property
    def has_reference(self) -> bool:
        return self.ref_chosen is not None and self.ref_rejected is not None


class StoreUnavailable(RuntimeError):
    """The store cannot be reached now (a coordinator restarting): nothing was stored; retry."""


class FeedbackStore:
    """Preference pairs in one SQLite table; see the module docstring for the contract."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        # isolation_level=None: no implicit transactions; each write below is one explicit one
        self._db: sqlite3.Connection | None = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # fsync the WAL at every commit
        self._db.execute("PRAGMA busy_timeout=5000")
        with self._transaction() as db:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)

    @contextlib.contextmanager
    def _transaction(self, is_write: bool = True) -> Iterator[sqlite3.Connection]:
        """The connection inside one transaction, committed on exit (rolled back on error)."""
        with self._lock:
            if self._db is None:
                raise RuntimeError("the feedback store is closed")
            db = self._db
            db.execute("BEGIN IMMEDIATE" if is_write else "BEGIN")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def add(self, pairs: Sequence[NewPair]) -> list[tuple[str, bool]]:
        """Store ``pairs`` in one transaction, committed before returning; for each, in order,
        (its id, whether it is new). An id already stored (or repeated earlier in ``pairs``) is
        kept as first stored and reported False."""
        now = time.time()
        out = []
        with self._transaction() as db:
            for p in pairs:
                pair_id = p.id if p.id is not None else uuid.uuid4().hex
                cur = db.execute(
                    "INSERT OR IGNORE INTO pairs (id, prompt, chosen, rejected, created_s, is_chat) VALUES (?, ?, ?, ?, ?, ?)",
                    (pair_id, p.prompt, p.chosen, p.rejected, now, int(p.is_chat)),
                )
                out.append((pair_id, cur.rowcount == 1))
        return out

    def pending(self, limit: int, exclude: Iterable[str] = ()) -> list[FeedbackPair]:
        """Up to ``limit`` pending pairs, oldest first, skipping ids in ``exclude`` (in flight)."""
        skip = frozenset(exclude)
        with self._transaction(is_write=False) as db:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM pairs WHERE state = 'pending' ORDER BY created_s, rowid LIMIT ?",
                (limit + len(skip),),
            ).fetchall()
        return [_pair(row) for row in rows if row[0] not in skip][:limit]

    def get(self, pair_id: str) -> FeedbackPair | None:
        with self._transaction(is_write=False) as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM pairs WHERE id = ?", (pair_id,)).fetchone()
        return None if row is None else _pair(row)

    def set_reference(self, pair_id: str, ref_chosen: float, ref_rejected: float) -> None:
        """Keep the reference model's log-probs of the pair's responses."""
        with self._transaction() as db:
            db.execute("UPDATE pairs SET ref_chosen = ?, ref_rejected = ? WHERE id = ?", (ref_chosen, ref_rejected, pair_id))

    def record_attempt(self, pair_id: str, loss: float) -> int:
        """Count one training try with its loss; the pair's attempts so far (0: no such pair)."""
        with self._transaction() as db:
            row = db.execute(
                "UPDATE pairs SET attempts = attempts + 1, last_loss = ? WHERE id = ? RETURNING attempts",
                (loss, pair_id),
            ).fetchone()
        return 0 if row is None else row[0]

    def mark_trained(self, pair_ids: Iterable[str]) -> int:
        """Pending pairs -> trained (after the step that used them); how many changed."""
        with self._transaction() as db:
            cur = db.executemany("UPDATE pairs SET state = 'trained' WHERE id = ? AND state = 'pending'",
                                 [(i,) for i in pair_ids])
        return cur.rowcount

    def set_aside(self, pair_id: str) -> bool:
        """A pending pair -> set aside (never retried); whether it changed."""
        with self._transaction() as db:
            cur = db.execute("UPDATE pairs SET state = 'set_aside' WHERE id = ? AND state = 'pending'", (pair_id,))
        return cur.rowcount == 1

    def ids(self, state: str) -> set[str]:
        """Ids of the pairs in ``state`` (pending, trained, set_aside)."""
        with self._transaction(is_write=False) as db:
            return {row[0] for row in db.execute("SELECT id FROM pairs WHERE state = ?", (state,))}

    def stats(self) -> dict[str, int]:
        """Counts: ``received`` (all stored), ``trained``, ``pending``, ``set_aside``."""
        with self._transaction(is_write=False) as db:
            rows = db.execute("SELECT state, COUNT(*) FROM pairs GROUP BY state").fetchall()
        counts = {"trained": 0, "pending": 0, "set_aside": 0, **dict(rows)}
        return {"received": sum(counts.values()), **counts}

    def close(self) -> None:
        """Close the connection (idempotent); later calls raise RuntimeError."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


def _pair(row: tuple) -> FeedbackPair:
    return FeedbackPair(*row[:-1], is_chat=bool(row[-1]))
