"""SQLite store of the catalog: access tokens (hashed), terms acceptances, refused requests and downloads.

Tokens are 256-bit random strings shown once. Only their sha256 is stored: with that much entropy a fast hash is
enough (nobody can brute-force 2^256 guesses; slow KDFs exist to protect low-entropy passwords), and a plain hash
lets a request's token be looked up by an indexed equality instead of trying every stored salt.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from synth.errors import InputError, where

DB_NAME = ".catalog.sqlite"
TOKEN_PREFIX = "sgt_"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    token_sha256 TEXT NOT NULL UNIQUE,
    created TEXT NOT NULL,
    expires TEXT NOT NULL,
    revoked TEXT
);
CREATE TABLE IF NOT EXISTS acceptances (
    token_id INTEGER NOT NULL REFERENCES tokens(id),
    release_id TEXT NOT NULL,
    terms_sha256 TEXT NOT NULL,
    time TEXT NOT NULL,
    PRIMARY KEY (token_id, release_id, terms_sha256)
);
CREATE TABLE IF NOT EXISTS downloads (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    token_id INTEGER NOT NULL REFERENCES tokens(id),
    release_id TEXT NOT NULL,
    started TEXT NOT NULL,
    finished TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    complete INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS refusals (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    status INTEGER NOT NULL,
    reason TEXT NOT NULL,
    token_id INTEGER,
    path TEXT NOT NULL,
    client TEXT
);
"""
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_DURATION_RE = re.compile(r"^(\d+)([hdw])$")


def now() -> datetime:
    return datetime.now(UTC)


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="seconds")


def hash_token(token: str) -> str:
    """sha256 hex of a token: the only form in which tokens are stored."""
    return hashlib.sha256(token.encode()).hexdigest()


def parse_expiry(text: str, *, start: datetime | None = None) -> datetime:
    """'30d', '12h', '2w' (from now) or an ISO date/datetime (a bare date means 00:00 UTC that day)."""
    start = start or now()
    m = _DURATION_RE.match(text.strip())
    if m:
        n, unit = int(m.group(1)), m.group(2)
        if n <= 0:
            raise InputError(f"--expires {text!r}: the duration must be positive")
        return start + {"h": timedelta(hours=n), "d": timedelta(days=n), "w": timedelta(weeks=n)}[unit]
    try:
        t = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InputError(f"--expires {text!r}: use a duration like 30d, 12h, 2w or a date like 2027-01-31") from None
    t = t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)
    if t <= start:
        raise InputError(f"--expires {text!r}: that time is already past")
    return t


@dataclass(frozen=True)
class Token:
    id: int
    name: str
    created: str
    expires: str
    revoked: str | None

    def state(self, at: datetime | None = None) -> str:
        """'active', 'expired' or 'revoked'."""
        if self.revoked:
            return "revoked"
        if datetime.fromisoformat(self.expires) <= (at or now()):
            return "expired"
        return "active"


class Store:
    """One SQLite file; a fresh connection per operation so the server's worker threads never share one."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise InputError(where(self.path.parent, "directory for the catalog database does not exist"))
        with self._db() as db:
            db.executescript(_SCHEMA)

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA busy_timeout = 30000")
            db.row_factory = sqlite3.Row
            yield db
        finally:
            db.close()

    # tokens ---------------------------------------------------------------------------------------------------
    def create_token(self, name: str, expires: datetime) -> tuple[Token, str]:
        """Create a token; return its record and the secret (shown once, never stored)."""
        if not _NAME_RE.match(name):
            raise InputError(f"token name {name!r}: use 1-64 letters, digits, '.', '_', '@', '-'")
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self._db() as db:
            try:
                cur = db.execute(
                    "INSERT INTO tokens (name, token_sha256, created, expires) VALUES (?, ?, ?, ?)",
                    (name, hash_token(secret), _iso(now()), _iso(expires)),
                )
            except sqlite3.IntegrityError:
                raise InputError(where(self.path, f"a token named {name!r} already exists")) from None
            token_id = cur.lastrowid
        return self.get_token(str(token_id)), secret

    def _token(self, row: sqlite3.Row | None) -> Token | None:
        if row is None:
            return None
        return Token(id=row["id"], name=row["name"], created=row["created"], expires=row["expires"],
                     revoked=row["revoked"])

    def get_token(self, name_or_id: str) -> Token:
        """Look a token up by name, or by numeric id."""
        with self._db() as db:
            row = db.execute("SELECT * FROM tokens WHERE name = ?", (name_or_id,)).fetchone()
            if row is None and name_or_id.isdigit():
                row = db.execute("SELECT * FROM tokens WHERE id = ?", (int(name_or_id),)).fetchone()
        token = self._token(row)
        if token is None:
            raise InputError(where(self.path, f"no token named or numbered {name_or_id!r}"))
        return token

    def find_token(self, secret: str) -> Token | None:
        """The token whose secret this is, in any state; None when unknown."""
        with self._db() as db:
            row = db.execute("SELECT * FROM tokens WHERE token_sha256 = ?", (hash_token(secret),)).fetchone()
        return self._token(row)

    def list_tokens(self) -> list[Token]:
        with self._db() as db:
            rows = db.execute("SELECT * FROM tokens ORDER BY id").fetchall()
        return [t for t in map(self._token, rows) if t is not None]

    def revoke_token(self, name_or_id: str) -> Token:
        """Revoke a token (idempotent: a revoked token keeps its first revocation time)."""
        token = self.get_token(name_or_id)
        with self._db() as db:
            db.execute("UPDATE tokens SET revoked = COALESCE(revoked, ?) WHERE id = ?", (_iso(now()), token.id))
        return self.get_token(str(token.id))

    # terms ----------------------------------------------------------------------------------------------------
    def accept(self, token_id: int, release_id: str, terms_sha256: str) -> str:
        """Record that a token's holder accepted a release's terms (this text of them); return the time."""
        t = _iso(now())
        with self._db() as db:
            db.execute("INSERT OR IGNORE INTO acceptances VALUES (?, ?, ?, ?)", (token_id, release_id, terms_sha256, t))
            row = db.execute(
                "SELECT time FROM acceptances WHERE token_id = ? AND release_id = ? AND terms_sha256 = ?",
                (token_id, release_id, terms_sha256)).fetchone()
        return str(row["time"])

    def has_accepted(self, token_id: int, release_id: str, terms_sha256: str) -> bool:
        with self._db() as db:
            row = db.execute(
                "SELECT 1 FROM acceptances WHERE token_id = ? AND release_id = ? AND terms_sha256 = ?",
                (token_id, release_id, terms_sha256)).fetchone()
        return row is not None

    def acceptances(self) -> list[dict[str, Any]]:
        with self._db() as db:
            rows = db.execute("SELECT a.*, t.name FROM acceptances a JOIN tokens t ON t.id = a.token_id "
                              "ORDER BY a.time").fetchall()
        return [dict(r) for r in rows]

    # logs -----------------------------------------------------------------------------------------------------
    def log_refusal(self, status: int, reason: str, path: str, *, token_id: int | None = None,
                    client: str | None = None) -> None:
        with self._db() as db:
            db.execute("INSERT INTO refusals (time, status, reason, token_id, path, client) VALUES (?, ?, ?, ?, ?, ?)",
                       (_iso(now()), status, reason, token_id, path, client))

    def refusals(self) -> list[dict[str, Any]]:
        with self._db() as db:
            return [dict(r) for r in db.execute("SELECT * FROM refusals ORDER BY id").fetchall()]

    def log_download(self, token_id: int, release_id: str, started: datetime, nbytes: int, complete: bool) -> None:
        with self._db() as db:
            db.execute(
                "INSERT INTO downloads (token_id, release_id, started, finished, bytes, complete) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (token_id, release_id, _iso(started), _iso(now()), nbytes, int(complete)))

    def downloads(self) -> list[dict[str, Any]]:
        with self._db() as db:
            rows = db.execute("SELECT d.*, t.name AS token_name FROM downloads d JOIN tokens t ON t.id = d.token_id "
                              "ORDER BY d.id").fetchall()
        return [dict(r) for r in rows]
