"""The score cache of `rerankd eval`: every (target, query, document) score, written as each query is scored, so an
interrupted evaluation continues where it stopped, with the time they took (so a rerun still reports each target's
pairs/s). SQLite (one file, safe against a kill mid-write); a target is
keyed by its fingerprint, so changing a target's options never reuses its old scores, and each score carries a digest of
the query and document it was computed from, so an edited dataset, or another one with the same ids, never reuses
them either."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from pathlib import Path


class ScoreCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path)
        self.db.execute("CREATE TABLE IF NOT EXISTS scores (target TEXT, qid TEXT, docid TEXT, digest TEXT, score REAL, "
                        "PRIMARY KEY (target, qid, docid))")  # fmt: skip
        self.db.execute("CREATE TABLE IF NOT EXISTS timings (target TEXT PRIMARY KEY, pairs INTEGER, seconds REAL)")
        self.db.commit()

    def get(self, target: str, qid: str, digests: dict[str, str]) -> dict[str, float]:
        """The cached scores of the query's documents whose digest (of query and document) is still the same."""
        rows = self.db.execute("SELECT docid, digest, score FROM scores WHERE target = ? AND qid = ?", (target, qid))
        return {d: score for d, digest, score in rows.fetchall() if digests.get(d) == digest}

    def put(self, target: str, qid: str, scores: dict[str, float], digests: dict[str, str], seconds: float) -> None:
        """The query's new scores and the seconds they took, in one transaction."""
        self.db.executemany("INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?, ?)",
                            [(target, qid, d, digests[d], s) for d, s in scores.items()])  # fmt: skip
        self.db.execute("INSERT INTO timings VALUES (?, ?, ?) ON CONFLICT (target) DO UPDATE SET "
                        "pairs = pairs + excluded.pairs, seconds = seconds + excluded.seconds",
                        (target, len(scores), seconds))  # fmt: skip
        self.db.commit()

    def timing(self, target: str) -> tuple[int, float]:
        """Pairs the target scored into this cache, over all runs, and the seconds they took."""
        row = self.db.execute("SELECT pairs, seconds FROM timings WHERE target = ?", (target,)).fetchone()
        return (row[0], row[1]) if row else (0, 0.0)

    def close(self) -> None:
        self.db.close()


def digest(query: object, document: object) -> str:
    """What a cached score was computed from: the query and document items as the target is given them (a local
    image file by its path, size and modification time)."""
    return hashlib.sha1(json.dumps([_identity(query), _identity(document)], sort_keys=True).encode()).hexdigest()


def _identity(item: object) -> object:
    image = item.get("image") if isinstance(item, dict) else None
    if isinstance(image, str) and not image.startswith(("http://", "https://", "data:")):
        try:
            stat = os.stat(image)
        except OSError:
            return item
        return {**item, "file": [stat.st_size, stat.st_mtime_ns]}  # type: ignore[dict-item]
    return item
