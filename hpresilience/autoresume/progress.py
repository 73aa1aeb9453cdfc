"""Hang detection for `srun --auto-resume` (issue 11): is the training step still advancing?

Two progress signals, either one is enough:

- the heartbeat: the file a training script writes through `hpresilience.checkpoint.heartbeat(step)`,
  named by $HPR_PROGRESS_FILE in the step's environment; progress = its step increases.
- the checkpoints: progress = the newest complete checkpoint of `CheckpointDir(checkpoint_dir)`
  has a higher step than any seen before (the one the attempt started from is not progress).

Before the first progress signal of an attempt the step gets `startup_seconds` (interpreter,
torch import, rendezvous, loading the checkpoint) plus `stall_seconds` (the first signal may be a
whole interval away); afterwards `stall_seconds` since the last advance.

What the runner must do for each attempt (the contract of `attempt_heartbeat_file`):
give the attempt a fresh heartbeat path (`attempt_heartbeat_file`, which also removes a
leftover at that path), export it as $HPR_PROGRESS_FILE in the attempt's environment, and
create the `ProgressWatch` just before launching the attempt. A fresh path per attempt,
rather than one file removed between attempts, because a task of the stopped attempt that
is still dying (a hung collective ignores SIGTERM for a while) keeps beating into *its*
path, which nobody watches any more; with one shared file, that beat would pass for the new
attempt's progress. The directory must be one every node of the step sees and the runner
reads (the runner's state directory), since rank 0 may run on any node.

Reading the checkpoint directory: `CheckpointDir.latest` lists the directory and reads the
newest marker and stats its files; on Lustre or NFS that is several metadata round trips, and
it logs every skipped checkpoint, so at a 1 s poll it would load the file system and flood the
log. A new checkpoint appears by a rename into the directory, which changes the directory's
mtime: each poll does one stat(2) and re-reads only when (inode, mtime) changed, or
`CHECKPOINT_RECHECK_SECONDS` after the last read (an NFS client's cached attributes or a
coarse mtime can hide a change for a while; stall times are minutes, so 30 s late is fine).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from ..checkpoint import CheckpointDir

CHECKPOINT_RECHECK_SECONDS = 30.0


def attempt_heartbeat_file(directory: Path, job_id: int, step: str, attempt: int) -> Path:
    """The heartbeat path of one attempt of one step, with any file already there removed
    (an earlier run of the same step, after its attempt count started over)."""
    path = directory / f"progress-{job_id}-{step}-{attempt}.json"
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    return path


@dataclass(frozen=True)
class Progress:
    """How far the step got: the highest heartbeat step of the attempt and the newest
    checkpoint step (the attempt's starting checkpoint included); None = no such signal."""
    heartbeat_step: Optional[int] = None
    checkpoint_step: Optional[int] = None

    @classmethod
    def from_dict(cls, data: dict) -> Progress:
        """From a state file: unknown keys (a newer version's) are left out, not a crash."""
        return cls(**{k: v for k, v in data.items() if k in ("heartbeat_step", "checkpoint_step")})

    def beyond(self, earlier: Progress) -> bool:
        """True when a signal is higher than in `earlier` (the runner asks this at a stall
        about the previous stall: no progress in between ends the job)."""
        return any(now is not None and (then is None or now > then)
                   for now, then in ((self.heartbeat_step, earlier.heartbeat_step),
                                     (self.checkpoint_step, earlier.checkpoint_step)))


@dataclass
class _Signal:
    """One progress signal: the highest step seen, and when (watch clock) it last went up."""
    name: str
    step: Optional[int] = None
    advanced_at: Optional[float] = None

    def offer(self, step: Optional[int], now: float, counts: bool = True) -> None:
        if step is not None and (self.step is None or step > self.step):
            self.step = step
            if counts:
                self.advanced_at = now

    def describe(self, now: float) -> str:
        if self.step is None:
            return f"no {self.name} yet"
        if self.advanced_at is None:
            return f"{self.name} step {self.step} (from before this attempt)"
        return f"{self.name} step {self.step}, {now - self.advanced_at:.0f}s ago"


class ProgressWatch:
    """Watches one attempt's progress signals; `poll()` says when the step stalled."""

    def __init__(self, heartbeat_file: Optional[Path], checkpoint_dir: Optional[Path], prefix: str = "step-",
                 stall_seconds: float = 600.0, startup_seconds: float = 600.0,
                 clock: Callable[[], float] = time.monotonic):
        if heartbeat_file is None and checkpoint_dir is None:
            raise ValueError("a progress watch needs a heartbeat file or a checkpoint directory")
        self.heartbeat_file = heartbeat_file
        self.checkpoints = CheckpointDir(checkpoint_dir, keep=None, prefix=prefix) if checkpoint_dir else None
        self.stall_seconds = stall_seconds
        self.startup_seconds = startup_seconds
        self.clock = clock
        self.started = clock()
        self.heartbeat = _Signal("heartbeat")
        self.checkpoint = _Signal("checkpoint")
        self._dir_seen: Optional[Tuple[int, int]] = None   # (inode, mtime_ns) at the last read
        self._dir_read_at: Optional[float] = None
        self._dir_lost = False                             # the directory was there and is not now
        self._bad_heartbeat = False
        self._warnings: List[str] = []
        # The checkpoint the attempt resumes from sets the bar; it is not progress of this attempt.
        self.checkpoint.offer(self._read_checkpoint(self.started), self.started, counts=False)

    @property
    def progress(self) -> Progress:
        return Progress(self.heartbeat.step, self.checkpoint.step)

    def warnings(self) -> List[str]:
        """What went wrong with the signals since the last call (each problem once)."""
        out, self._warnings = self._warnings, []
        return out

    def poll(self) -> Optional[str]:
        """Why the step counts as stalled now, or None while it is advancing (or starting)."""
        now = self.clock()
        self.heartbeat.offer(self._read_heartbeat(), now)
        self.checkpoint.offer(self._read_checkpoint(now), now)
        advanced = [s.advanced_at for s in (self.heartbeat, self.checkpoint) if s.advanced_at is not None]
        if not advanced:
            # Startup, then a whole stall interval: with checkpoints as the only signal the first
            # one comes a checkpoint interval after startup (issue 11 review: 600 s stopped every
            # attempt of an hourly-checkpointing job).
            allowed = self.startup_seconds + self.stall_seconds
            if now - self.started <= allowed:
                return None
            return (f"no progress since the attempt started {now - self.started:.0f}s ago (startup allowance "
                    f"{self.startup_seconds:g}s + {self.stall_seconds:g}s): {self._signals(now)}")
        if now - max(advanced) <= self.stall_seconds:
            return None
        return f"no progress for {now - max(advanced):.0f}s (limit {self.stall_seconds:g}s): {self._signals(now)}"

    def _signals(self, now: float) -> str:
        parts = []
        if self.heartbeat_file is not None:
            parts.append(f"{self.heartbeat.describe(now)} in {self.heartbeat_file}")
        if self.checkpoints is not None:
            parts.append(f"{self.checkpoint.describe(now)} in {self.checkpoints.path}")
        return "; ".join(parts)

    def _read_heartbeat(self) -> Optional[int]:
        if self.heartbeat_file is None:
            return None
        try:
            data = json.loads(self.heartbeat_file.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            return self._not_a_heartbeat(str(e))
        step = data.get("step") if isinstance(data, dict) else None
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            return self._not_a_heartbeat(f"no non-negative integer step in {data!r:.80}")
        return step

    def _not_a_heartbeat(self, why: str) -> None:
        if not self._bad_heartbeat:
            self._bad_heartbeat = True
            self._warnings.append(f"heartbeat file {self.heartbeat_file} is unreadable ({why}); not counted "
                                  "as progress (said once)")
        return None

    def _read_checkpoint(self, now: float) -> Optional[int]:
        """The newest complete checkpoint's step when the directory changed (or the recheck
        time passed); None otherwise, or when it is missing or unreadable."""
        if self.checkpoints is None:
            return None
        try:
            st = os.stat(self.checkpoints.path)
            seen = (st.st_ino, st.st_mtime_ns)
            if (seen == self._dir_seen and self._dir_read_at is not None
                    and now - self._dir_read_at < CHECKPOINT_RECHECK_SECONDS):
                return None
            latest = self.checkpoints.latest()
        except OSError as e:
            return self._checkpoints_lost(self.checkpoints.path, e)
        self._dir_seen, self._dir_read_at, self._dir_lost = seen, now, False
        return latest.step if latest else None

    def _checkpoints_lost(self, path: Path, error: OSError) -> None:
        """A directory not there yet is normal (the first save creates it); one that was
        there and vanished (issue 11 bad input), or that cannot be read, is said once per
        loss, and the heartbeat goes on."""
        if (self._dir_seen is not None or not isinstance(error, FileNotFoundError)) and not self._dir_lost:
            self._dir_lost = True
            self._warnings.append(f"checkpoint directory {path} is gone or unreadable "
                                  f"({error.strerror or error}); watching "
                                  + ("the heartbeat only" if self.heartbeat_file else "nothing that can advance"))
        self._dir_seen = None
        return None
