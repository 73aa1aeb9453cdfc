"""The controller's journal: workflows and their events in SQLite (WAL).

Crash safety rests on two rules the workflow code follows:
- a step is *entered* in the journal before its side effect (an intent), and
  the transition is compare-and-set on the step we believe we are in, so two
  controller instances, or one restarted after SIGKILL, never both take it;
- a step whose side effect must not be repeated (a reboot, a replacement)
  records the fact it needs to recognise completion (e.g. the BootTime before
  the reboot) in the same transaction, so a restart checks instead of redoing.

At most one active workflow per node is enforced by the schema.
"""
from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

SCHEMA = """
CREATE TABLE IF NOT EXISTS workflows (
    id INTEGER PRIMARY KEY,
    node TEXT NOT NULL,
    action TEXT NOT NULL,              -- reboot | replace | power_cycle
    reason TEXT NOT NULL,              -- the Slurm reason that started it
    step TEXT NOT NULL,
    status TEXT NOT NULL,              -- active | done | failed | abandoned
    detected_at REAL NOT NULL,         -- when Slurm's reason was set (detection)
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    finished_at REAL,
    data TEXT NOT NULL DEFAULT '{}'    -- step facts (boot time before reboot, spare chosen, ...)
);
CREATE UNIQUE INDEX IF NOT EXISTS one_active_workflow_per_node ON workflows(node) WHERE status = 'active';
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    workflow_id INTEGER REFERENCES workflows(id),
    node TEXT NOT NULL,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS events_by_node ON events(node, at);
"""

ACTIVE = "active"
FINISHED = ("done", "failed", "abandoned")


class JournalError(Exception):
    pass


@dataclass(frozen=True)
class Workflow:
    id: int
    node: str
    action: str
    reason: str
    step: str
    status: str
    detected_at: float
    created_at: float
    updated_at: float
    finished_at: Optional[float] = None
    data: Dict[str, Any] = field(default_factory=dict)

    @property
    def time_to_service(self) -> Optional[float]:
        """Detection to back in service, for `hpresilience history`."""
        if self.status != "done" or self.finished_at is None:
            return None
        return self.finished_at - self.detected_at


@dataclass(frozen=True)
class Event:
    id: int
    workflow_id: Optional[int]
    node: str
    at: float
    kind: str
    detail: Dict[str, Any]


class Journal:
    def __init__(self, path: Path, clock=time.time):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.clock = clock
        # isolation_level=None: we open transactions ourselves (BEGIN IMMEDIATE), so a
        # transition is one atomic read-check-write even with two controllers on one file.
        self.db = sqlite3.connect(str(path), timeout=10, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a step acknowledged is a step on disk
        self.db.execute("PRAGMA busy_timeout=10000")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------------ writes
    def open_workflow(self, node: str, action: str, reason: str, step: str, detected_at: float,
                      data: Optional[Dict[str, Any]] = None) -> Workflow:
        """Start a workflow for `node`, or return the one already active (idempotent:
        a controller restarted mid-pass must not start a second one)."""
        now = self.clock()
        self.db.execute("BEGIN IMMEDIATE")
        try:
            existing = self._active(node)
            if existing is not None:
                self.db.execute("COMMIT")
                return existing
            cur = self.db.execute(
                "INSERT INTO workflows (node, action, reason, step, status, detected_at, created_at, updated_at, data)"
                " VALUES (?, ?, ?, ?, 'active', ?, ?, ?, ?)",
                (node, action, reason, step, detected_at, now, now, json.dumps(data or {})))
            self._event(cur.lastrowid, node, "started", {"action": action, "step": step, "reason": reason})
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return self.workflow(cur.lastrowid)

    def advance(self, workflow_id: int, expected_step: str, new_step: str,
                data: Optional[Dict[str, Any]] = None, status: str = ACTIVE) -> Optional[Workflow]:
        """Move a workflow from `expected_step` to `new_step` (merging `data` into its facts).

        Returns the updated workflow, or None when it is no longer in `expected_step`
        (another controller, or this one before a crash, already moved it): the caller
        must then re-read and not perform the step's side effect."""
        if status not in (ACTIVE, *FINISHED):
            raise JournalError(f"unknown status {status!r}")
        now = self.clock()
        self.db.execute("BEGIN IMMEDIATE")
        try:
            row = self.db.execute("SELECT * FROM workflows WHERE id = ?", (workflow_id,)).fetchone()
            if row is None or row["status"] != ACTIVE or row["step"] != expected_step:
                self.db.execute("COMMIT")
                return None
            facts = json.loads(row["data"])
            facts.update(data or {})
            self.db.execute(
                "UPDATE workflows SET step = ?, status = ?, updated_at = ?, data = ?, finished_at = ? WHERE id = ?",
                (new_step, status, now, json.dumps(facts), now if status in FINISHED else None, workflow_id))
            self._event(workflow_id, row["node"], "step",
                        {"from": expected_step, "to": new_step, "status": status, **(data or {})})
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return self.workflow(workflow_id)

    def record(self, node: str, kind: str, detail: Optional[Dict[str, Any]] = None,
               workflow_id: Optional[int] = None) -> None:
        self._event(workflow_id, node, kind, detail or {})

    def _event(self, workflow_id: Optional[int], node: str, kind: str, detail: Dict[str, Any]) -> None:
        self.db.execute("INSERT INTO events (workflow_id, node, at, kind, detail) VALUES (?, ?, ?, ?, ?)",
                        (workflow_id, node, self.clock(), kind, json.dumps(detail, default=str)))

    # ------------------------------------------------------------------- reads
    def workflow(self, workflow_id: int) -> Workflow:
        row = self.db.execute("SELECT * FROM workflows WHERE id = ?", (workflow_id,)).fetchone()
        if row is None:
            raise JournalError(f"no workflow {workflow_id}")
        return _workflow(row)

    def _active(self, node: str) -> Optional[Workflow]:
        row = self.db.execute("SELECT * FROM workflows WHERE node = ? AND status = 'active'", (node,)).fetchone()
        return _workflow(row) if row else None

    def active(self) -> List[Workflow]:
        return [_workflow(r) for r in self.db.execute("SELECT * FROM workflows WHERE status = 'active' ORDER BY id")]

    def history(self, node: Optional[str] = None, since: Optional[float] = None) -> List[Workflow]:
        return [_workflow(r) for r in self._select("workflows", [("node = ?", node), ("created_at >= ?", since)])]

    def events(self, workflow_id: Optional[int] = None, node: Optional[str] = None) -> List[Event]:
        return [Event(r["id"], r["workflow_id"], r["node"], r["at"], r["kind"], json.loads(r["detail"]))
                for r in self._select("events", [("workflow_id = ?", workflow_id), ("node = ?", node)])]

    def _select(self, table: str, filters: List[Tuple[str, Any]]) -> List[sqlite3.Row]:
        """Rows of `table` matching every filter whose value is not None, oldest first."""
        given = [(clause, value) for clause, value in filters if value is not None]
        where = " AND ".join(clause for clause, _ in given) or "1=1"
        return self.db.execute(f"SELECT * FROM {table} WHERE {where} ORDER BY id", [v for _, v in given]).fetchall()


def _workflow(row: sqlite3.Row) -> Workflow:
    return Workflow(id=row["id"], node=row["node"], action=row["action"], reason=row["reason"], step=row["step"],
                    status=row["status"], detected_at=row["detected_at"], created_at=row["created_at"],
                    updated_at=row["updated_at"], finished_at=row["finished_at"], data=json.loads(row["data"]))
