"""The score cache of `rerankd eval`: every (target, query, document) score, written as each query is scored, so an
interrupted evaluation continues where it stopped. SQLite (one file, safe against a kill mid-write); a target is
keyed by its fingerprint, so changing a target's options never reuses its old scores."""

from __future__ import annotations

import sqlite3
from pathlib import Path


class ScoreCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path)
        self.db.execute("CREATE TABLE IF NOT EXISTS scores (target TEXT, qid TEXT, docid TEXT, score REAL, "
                        "PRIMARY KEY (target, qid, docid))")  # fmt: skip
        self.db.commit()

    def get(self, target: str, qid: str) -> dict[str, float]:
        rows = self.db.execute("SELECT docid, score FROM scores WHERE target = ? AND qid = ?", (target, qid))
        return dict(rows.fetchall())

    def put(self, target: str, qid: str, scores: dict[str, float]) -> None:
        self.db.executemany("INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?)",
                            [(target, qid, d, s) for d, s in scores.items()])  # fmt: skip
        self.db.commit()

    def close(self) -> None:
        self.db.close()
