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

import contextlib
import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Set, Tuple

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
CREATE TABLE IF NOT EXISTS control (     -- operator switches that must survive restarts
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    at REAL NOT NULL
);
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
class Breaker:
    """The circuit breaker as journaled: tripped until an admin resets it."""
    tripped: bool
    tripped_at: Optional[float] = None
    detail: str = ""
    reset_at: Optional[float] = None        # the last `hpresilience controller resume`
    reset_by: str = ""


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
        # The controller's worker threads share one connection, serialised by a lock.
        self.db = sqlite3.connect(str(path), timeout=10, isolation_level=None, check_same_thread=False)
        self.lock = threading.RLock()
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a step acknowledged is a step on disk
        self.db.execute("PRAGMA busy_timeout=10000")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        with self.lock:
            self.db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    # ------------------------------------------------------------------ writes
    def open_workflow(self, node: str, action: str, reason: str, step: str, detected_at: float,
                      data: Optional[Dict[str, Any]] = None) -> Workflow:
        """Start a workflow for `node`, or return the one already active (idempotent:
        a controller restarted mid-pass must not start a second one)."""
        now = self.clock()
        with self._transaction():
            existing = self._active(node)
            if existing is not None:
                return existing
            cur = self.db.execute(
                "INSERT INTO workflows (node, action, reason, step, status, detected_at, created_at, updated_at, data)"
                " VALUES (?, ?, ?, ?, 'active', ?, ?, ?, ?)",
                (node, action, reason, step, detected_at, now, now, json.dumps(data or {})))
            self._event(cur.lastrowid, node, "started", {"action": action, "step": step, "reason": reason})
        return self.workflow(cur.lastrowid)

    def advance(self, workflow_id: int, expected_step: str, new_step: str,
                data: Optional[Dict[str, Any]] = None, status: str = ACTIVE,
                action: Optional[str] = None) -> Optional[Workflow]:
        """Move a workflow from `expected_step` to `new_step` (merging `data` into its
        facts; `action` changes the workflow's action, e.g. an escalation to replace).

        Returns the updated workflow, or None when it is no longer in `expected_step`
        (another controller, or this one before a crash, already moved it): the caller
        must then re-read and not perform the step's side effect."""
        if status not in (ACTIVE, *FINISHED):
            raise JournalError(f"unknown status {status!r}")
        now = self.clock()
        with self._transaction():
            row = self.db.execute("SELECT * FROM workflows WHERE id = ?", (workflow_id,)).fetchone()
            if row is None or row["status"] != ACTIVE or row["step"] != expected_step:
                return None
            facts = json.loads(row["data"])
            facts.update(data or {})
            self.db.execute(
                "UPDATE workflows SET step = ?, status = ?, updated_at = ?, data = ?, finished_at = ?, action = ?"
                " WHERE id = ?",
                (new_step, status, now, json.dumps(facts), now if status in FINISHED else None,
                 action or row["action"], workflow_id))
            detail = {"from": expected_step, "to": new_step, "status": status, **(data or {})}
            if action and action != row["action"]:
                detail["action"] = action
            if new_step == expected_step and status == ACTIVE:
                self._event(workflow_id, row["node"], "note", {"step": new_step, **(data or {})})
            else:
                self._event(workflow_id, row["node"], "step", detail)
        return self.workflow(workflow_id)

    def note(self, workflow_id: int, step: str, data: Dict[str, Any]) -> Optional[Workflow]:
        """Record facts of the current step (e.g. "provider started") without moving it;
        None when the workflow is no longer in `step`."""
        return self.advance(workflow_id, step, step, data)

    def record(self, node: str, kind: str, detail: Optional[Dict[str, Any]] = None,
               workflow_id: Optional[int] = None) -> None:
        with self.lock:
            self._event(workflow_id, node, kind, detail or {})

    def _event(self, workflow_id: Optional[int], node: str, kind: str, detail: Dict[str, Any]) -> None:
        self.db.execute("INSERT INTO events (workflow_id, node, at, kind, detail) VALUES (?, ?, ?, ?, ?)",
                        (workflow_id, node, self.clock(), kind, json.dumps(detail, default=str)))

    # ------------------------------------------------------------ the breaker
    def trip_breaker(self, detail: str) -> None:
        """Pause automatic action (kept across restarts until reset_breaker)."""
        with self._transaction():
            if self._control("breaker_tripped_at") is None:
                self._set_control("breaker_tripped_at", str(self.clock()))
                self._set_control("breaker_detail", detail)
                self._event(None, "-", "breaker_tripped", {"detail": detail})

    def reset_breaker(self, by: str) -> bool:
        """Resume automatic action; returns False when the breaker was not tripped."""
        with self._transaction():
            tripped = self._control("breaker_tripped_at") is not None
            self.db.execute("DELETE FROM control WHERE key IN ('breaker_tripped_at', 'breaker_detail')")
            self._set_control("breaker_reset_at", str(self.clock()))
            self._set_control("breaker_reset_by", by)
            self._event(None, "-", "breaker_reset", {"by": by, "was_tripped": tripped})
        return tripped

    def breaker(self) -> Breaker:
        with self.lock:
            tripped_at = self._control("breaker_tripped_at")
            reset_at = self._control("breaker_reset_at")
            return Breaker(tripped=tripped_at is not None,
                           tripped_at=float(tripped_at) if tripped_at else None,
                           detail=self._control("breaker_detail") or "",
                           reset_at=float(reset_at) if reset_at else None,
                           reset_by=self._control("breaker_reset_by") or "")

    def _control(self, key: str) -> Optional[str]:
        row = self.db.execute("SELECT value FROM control WHERE key = ?", (key,)).fetchone()
        return row["value"] if row else None

    def _set_control(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO control (key, value, at) VALUES (?, ?, ?)", (key, value, self.clock()))

    # ------------------------------------------------------- admission (issue 10)
    def admitted(self) -> Optional[Set[str]]:
        """Nodes admitted to service (passed an admission, or present when `hold_new_nodes`
        was first switched on); None before that."""
        with self.lock:
            value = self._control("admitted_nodes")
        return set(json.loads(value)) if value is not None else None

    def start_admission(self, nodes: Iterable[str]) -> None:
        """`hold_new_nodes` switched on: the nodes Slurm has now are in service already."""
        with self._transaction():
            if self._control("admitted_nodes") is None:
                known = sorted(set(nodes))
                self._set_control("admitted_nodes", json.dumps(known))
                self._event(None, "-", "admission_baseline", {"nodes": len(known)})

    def admit(self, nodes: Iterable[str], why: str) -> None:
        """Nodes now in service for good; nothing happens while admission is off (no baseline)."""
        with self._transaction():
            value = self._control("admitted_nodes")
            if value is None:
                return
            known = set(json.loads(value))
            for node in sorted(set(nodes) - known):
                self._event(None, node, "admitted", {"why": why})
            self._set_control("admitted_nodes", json.dumps(sorted(known | set(nodes))))

    def stop_admission(self) -> None:
        """`hold_new_nodes` switched off: the baseline goes; switched on again, the nodes Slurm
        has then are the new baseline (nodes added meanwhile already serve: never drained at once)."""
        with self._transaction():
            if self._control("admitted_nodes") is not None:
                self.db.execute("DELETE FROM control WHERE key = 'admitted_nodes'")
                self._event(None, "-", "admission_stopped", {})

    def forget(self, nodes: Iterable[str]) -> None:
        """Nodes gone from Slurm's configuration: if they come back, they are new."""
        with self._transaction():
            known = set(json.loads(self._control("admitted_nodes") or "[]"))
            gone = known & set(nodes)
            if not gone:
                return
            self._set_control("admitted_nodes", json.dumps(sorted(known - gone)))
            for node in sorted(gone):
                self._event(None, node, "forgotten", {"why": "no longer in Slurm's configuration"})

    # ------------------------------------------------------------------- reads
    def workflow(self, workflow_id: int) -> Workflow:
        with self.lock:
            row = self.db.execute("SELECT * FROM workflows WHERE id = ?", (workflow_id,)).fetchone()
        if row is None:
            raise JournalError(f"no workflow {workflow_id}")
        return _workflow(row)

    def _active(self, node: str) -> Optional[Workflow]:
        row = self.db.execute("SELECT * FROM workflows WHERE node = ? AND status = 'active'", (node,)).fetchone()
        return _workflow(row) if row else None

    def active(self) -> List[Workflow]:
        with self.lock:
            rows = self.db.execute("SELECT * FROM workflows WHERE status = 'active' ORDER BY id").fetchall()
        return [_workflow(r) for r in rows]

    def history(self, node: Optional[str] = None, since: Optional[float] = None) -> List[Workflow]:
        return [_workflow(r) for r in self._select("workflows", [("node = ?", node), ("created_at >= ?", since)])]

    def events(self, workflow_id: Optional[int] = None, node: Optional[str] = None,
               since: Optional[float] = None) -> List[Event]:
        return [Event(r["id"], r["workflow_id"], r["node"], r["at"], r["kind"], json.loads(r["detail"]))
                for r in self._select("events", [("workflow_id = ?", workflow_id), ("node = ?", node),
                                                 ("at >= ?", since)])]

    def last_events(self, kind: str) -> Dict[str, Event]:
        """The newest event of `kind` per node (e.g. each node's last deep-check result, issue 10)."""
        with self.lock:
            rows = self.db.execute("SELECT * FROM events WHERE id IN (SELECT MAX(id) FROM events WHERE kind = ? "
                                   "GROUP BY node)", (kind,)).fetchall()
        return {r["node"]: Event(r["id"], r["workflow_id"], r["node"], r["at"], r["kind"], json.loads(r["detail"]))
                for r in rows}

    def _select(self, table: str, filters: List[Tuple[str, Any]]) -> List[sqlite3.Row]:
        """Rows of `table` matching every filter whose value is not None, oldest first."""
        given = [(clause, value) for clause, value in filters if value is not None]
        where = " AND ".join(clause for clause, _ in given) or "1=1"
        with self.lock:
            return self.db.execute(f"SELECT * FROM {table} WHERE {where} ORDER BY id",
                                   [v for _, v in given]).fetchall()


def _workflow(row: sqlite3.Row) -> Workflow:
    return Workflow(id=row["id"], node=row["node"], action=row["action"], reason=row["reason"], step=row["step"],
                    status=row["status"], detected_at=row["detected_at"], created_at=row["created_at"],
                    updated_at=row["updated_at"], finished_at=row["finished_at"], data=json.loads(row["data"]))
