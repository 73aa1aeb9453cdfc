"""Crash-safe checkpoint directories for training scripts.

A checkpoint is a directory ``<prefix><step:09d>`` (``step-000001200``) under one
checkpoint directory, holding whatever files the training script writes (``torch.save``
output, optimizer state, a data-loader cursor) and a ``COMPLETE`` marker written last:

    ckpt/
      step-000001100/   model.pt  optim.pt  COMPLETE
      step-000001200/   model.pt  optim.pt  COMPLETE
      .tmp-step-000001300-4711-k2j9x/          <- being written (or left by a crash)

`CheckpointDir.save` writes into a temporary directory, fsyncs every file, writes and
fsyncs the marker, renames the directory to its final name and fsyncs the parent, so a
checkpoint name only ever appears with all its data on disk. `CheckpointDir.latest`
returns the newest checkpoint whose marker is valid and whose files all have the sizes
the marker lists; partial, unmarked, corrupt or truncated ones are skipped and logged.

The module needs neither torch nor Slurm; it does not coordinate ranks: in a
DistributedDataParallel job only rank 0 should call `save` (see docs/checkpoints.md).

`heartbeat(step)`, called every training step, tells `srun --auto-resume` the step is
still advancing (its hang detection, issue 11); outside `srun --auto-resume` it does nothing.

>>> CheckpointDir("/ckpt").name_for(1200)
'step-000001200'
>>> CheckpointDir("/ckpt", prefix="").parse_name("000000042")
42
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import operator
import os
import re
import shutil
import socket
import stat
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import structlog

from .statefile import fsync_dir

log = structlog.get_logger("hpresilience.checkpoint")

MARKER = "COMPLETE"
FORMAT_VERSION = 1
TMP_PREFIX = ".tmp-"            # a save in progress, or one whose writer died
REPLACED_PREFIX = ".replaced-"  # the old copy of a step being saved again, for the moment between two renames
TRASH_PREFIX = ".trash-"        # a checkpoint being removed (pruned or replaced)

PathLike = Union[str, "os.PathLike[str]"]

PROGRESS_FILE_ENV = "HPR_PROGRESS_FILE"   # set by `srun --auto-resume` for each attempt (issue 11)
HEARTBEAT_MIN_INTERVAL = 1.0              # seconds between two heartbeat writes of one process


class CheckpointError(Exception):
    """A checkpoint could not be saved as asked (bad step, reserved file name, unsupported file type)."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One complete checkpoint: its step, its directory and when it was written (epoch seconds)."""

    step: int
    path: Path
    time: float


class CheckpointDir:
    """The checkpoints of one training run, in directory `path`.

    `keep`: how many complete checkpoints `save` leaves behind (the newest ones); None keeps all.
    `prefix`: the checkpoint name before the zero-padded step; two runs may share one directory
    with different prefixes.
    """

    def __init__(self, path: PathLike, keep: Optional[int] = 3, prefix: str = "step-"):
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be at least 1 (or None to keep every checkpoint), not {keep}")
        if "/" in prefix or prefix.startswith("."):
            raise ValueError(f"prefix {prefix!r} must not contain '/' or start with '.'")
        self.path = Path(path)
        self.keep = keep
        self.prefix = prefix
        self._name_re = re.compile(re.escape(prefix) + r"(\d+)")
        # the helper's own names: ".tmp-<name>-<pid>-<random>" and the same with .replaced- / .trash-
        self._own_re = re.compile(r"\.(tmp|replaced|trash)-" + re.escape(prefix) + r"(\d+)-.+")

    def __repr__(self) -> str:
        return f"CheckpointDir({str(self.path)!r}, keep={self.keep!r}, prefix={self.prefix!r})"

    # ------------------------------------------------------------------ names
    def name_for(self, step: int) -> str:
        return f"{self.prefix}{_check_step(step):09d}"

    def parse_name(self, name: str) -> Optional[int]:
        """The step a checkpoint name stands for, or None (only the canonical spelling counts).

        >>> d = CheckpointDir("/ckpt")
        >>> [d.parse_name(n) for n in ("step-000000007", "step-7", "step-000000007.old", "other")]
        [7, None, None, None]
        """
        m = self._name_re.fullmatch(name)
        if m is None:
            return None
        step = int(m.group(1))
        return step if self.name_for(step) == name else None

    # ------------------------------------------------------------------ writing
    @contextlib.contextmanager
    def save(self, step: int) -> Iterator[Path]:
        """Write checkpoint `step`: yields an empty temporary directory to write the files into.

        On a clean exit of the ``with`` block the checkpoint is made durable and visible
        (fsync files, ``COMPLETE`` marker, rename, fsync `path`) and older ones are pruned
        to `keep`; on an exception the temporary directory is removed and the exception
        propagates. Saving a step that already exists replaces it (see `_publish`).

        Call it from one process only (rank 0); nothing here coordinates writers.
        """
        name = self.name_for(step)
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{name}-{os.getpid()}-", dir=self.path))
        try:
            yield tmp
            files = _sync_tree(tmp)
            marker = {
                "format": FORMAT_VERSION,
                "step": step,
                "time": time.time(),
                "files": files,
                "writer": {"host": socket.gethostname(), "pid": os.getpid()},
            }
            _write_synced(tmp / MARKER, json.dumps(marker, indent=1, sort_keys=True).encode())
            fsync_dir(tmp)
            final = self._publish(tmp, name)
        except BaseException:
            _remove(tmp)
            raise
        log.info("checkpoint.saved", path=str(final), step=step, files=len(files),
                 bytes=sum(files.values()))
        self.prune()

    def save_file(self, step: int, name: str, data: bytes) -> Checkpoint:
        """Save checkpoint `step` made of one file `name` holding `data`; returns it."""
        with self.save(step) as tmp:
            (tmp / name).write_bytes(data)
        found = self._check(self.path / self.name_for(step), step)
        if isinstance(found, str):  # only if someone else removed or broke it just now
            raise CheckpointError(f"checkpoint {step} vanished right after it was saved: {found}")
        return found

    def _publish(self, tmp: Path, name: str) -> Path:
        """Rename the finished `tmp` to `name`, atomically, replacing an existing `name`.

        A directory cannot be renamed over a non-empty one, so an existing checkpoint of the
        same step (a restarted job saving the step it resumed from again) is first renamed
        aside to ``.replaced-<name>-...``, then `tmp` takes its name, then the old copy is
        removed. A writer killed between the two renames leaves the old, complete copy under
        the ``.replaced-`` name; `latest`/`list` count it as that step while `name` is
        missing, and `cleanup_partial` renames it back.
        """
        final = self.path / name
        aside: Optional[Path] = None
        if os.path.lexists(final):
            aside = self.path / f"{REPLACED_PREFIX}{name}-{os.getpid()}-{_random_suffix()}"
            os.rename(final, aside)
            log.info("checkpoint.replacing", path=str(final))
        os.rename(tmp, final)
        fsync_dir(self.path)
        if aside is not None:
            self._discard(aside, name)
        return final

    def prune(self) -> List[Path]:
        """Remove the complete checkpoints older than the newest `keep`; returns what was removed.

        Only complete checkpoints are counted and removed: a directory without a valid marker
        is not ours to delete (it may be another tool's, or evidence of a problem)."""
        if self.keep is None:
            return []
        removed = []
        for old in self._complete(newest_first=False, first_only=False, log_skips=False)[:-self.keep]:
            self._discard(old.path, self.name_for(old.step))
            removed.append(old.path)
            log.info("checkpoint.pruned", path=str(old.path), step=old.step)
        return removed

    def _discard(self, path: Path, name: str) -> None:
        """Remove a checkpoint directory so that no half-deleted one is ever seen under a checkpoint name."""
        trash = self.path / f"{TRASH_PREFIX}{name}-{os.getpid()}-{_random_suffix()}"
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return
        _remove(trash)

    # ------------------------------------------------------------------ reading
    def latest(self) -> Optional[Checkpoint]:
        """The newest complete checkpoint, or None. What it skips on the way is logged."""
        found = self._complete(newest_first=True, first_only=True)
        return found[0] if found else None

    def list(self) -> List[Checkpoint]:
        """Every complete checkpoint, oldest first (one per step). What it skips is logged."""
        return self._complete(newest_first=False, first_only=False)

    def _complete(self, newest_first: bool, first_only: bool, log_skips: bool = True) -> List[Checkpoint]:
        complete = []
        for step, paths in self._candidates(newest_first):
            for path in paths:
                found = self._check(path, step)
                if isinstance(found, Checkpoint):
                    complete.append(found)
                    if first_only:
                        return complete
                    break
                if log_skips:
                    log.warning("checkpoint.skipped", path=str(path), step=step, reason=found)
        return complete

    def _candidates(self, newest_first: bool) -> List[Tuple[int, List[Path]]]:
        """(step, [paths to try, in order]) for every step with a directory that may be a checkpoint.

        The final name comes first; a ``.replaced-`` copy (left between the two renames of a
        re-save) is tried only after it."""
        by_step: Dict[int, List[Path]] = {}
        replaced: Dict[int, List[Tuple[float, Path]]] = {}
        try:
            entries = list(os.scandir(self.path))
        except FileNotFoundError:
            log.debug("checkpoint.no_directory", path=str(self.path))
            return []
        for entry in entries:
            step = self.parse_name(entry.name)
            if step is not None:
                by_step.setdefault(step, []).append(Path(entry.path))
                continue
            own = self._own_re.fullmatch(entry.name)
            if own is not None and own.group(1) == "replaced":
                with contextlib.suppress(OSError):
                    replaced.setdefault(int(own.group(2)), []).append((entry.stat().st_ctime, Path(entry.path)))
            elif own is not None:
                reason = "being written or left by a crashed writer" if own.group(1) == "tmp" else "being removed"
                log.debug("checkpoint.skipped", path=entry.path, reason=reason)
            else:
                log.debug("checkpoint.skipped", path=entry.path, reason="name is not a checkpoint name")
        for step, copies in replaced.items():
            by_step.setdefault(step, []).extend(p for _, p in sorted(copies, reverse=True))
        return sorted(by_step.items(), reverse=newest_first)

    def _check(self, path: Path, step: int) -> Union[Checkpoint, str]:
        """The checkpoint at `path`, or why it is not a complete one."""
        if not path.is_dir():
            return "not a directory"
        try:
            raw = (path / MARKER).read_bytes()
        except FileNotFoundError:
            return f"no {MARKER} marker (incomplete, or not written by hpresilience.checkpoint)"
        except OSError as e:
            return f"{MARKER} marker unreadable: {e}"
        try:
            marker = json.loads(raw)
        except ValueError as e:
            return f"{MARKER} marker is not valid JSON: {e}"
        if not isinstance(marker, dict):
            return f"{MARKER} marker is not a JSON object"
        if marker.get("format") != FORMAT_VERSION:
            return f"{MARKER} marker format {marker.get('format')!r} is not {FORMAT_VERSION}"
        if marker.get("step") != step:
            return f"{MARKER} marker says step {marker.get('step')!r}"
        written, files = marker.get("time"), marker.get("files")
        if not isinstance(written, (int, float)) or isinstance(written, bool) or not isinstance(files, dict):
            return f"{MARKER} marker lacks a time or a file list"
        for rel, size in files.items():
            if not isinstance(rel, str) or not _is_inside(rel) or not isinstance(size, int):
                return f"{MARKER} marker lists a bad entry {rel!r}: {size!r}"
            try:
                st = os.stat(path / rel)
            except OSError:
                return f"file {rel} is missing"
            if not stat.S_ISREG(st.st_mode):
                return f"{rel} is not a regular file"
            if st.st_size != size:
                return f"file {rel} has {st.st_size} bytes, the marker says {size} (truncated or changed)"
        return Checkpoint(step=step, path=path, time=float(written))

    # ------------------------------------------------------------------ cleaning
    def cleanup_partial(self, older_than_seconds: float) -> List[Path]:
        """Clear what crashed writers left: temporary directories in which nothing changed for
        `older_than_seconds` are removed; an old copy left aside by an interrupted re-save is
        renamed back when its step has no checkpoint, removed otherwise. Returns the paths handled.

        Meant for the start of a job, before it saves; with a threshold shorter than one save
        takes, it could remove a save in progress (of this job or another writer)."""
        handled = []
        now = time.time()
        try:
            entries = sorted(os.scandir(self.path), key=lambda e: e.name)
        except FileNotFoundError:
            return []
        for entry in entries:
            own = self._own_re.fullmatch(entry.name)
            if own is None:
                continue
            path = Path(entry.path)
            age = now - _newest_change(path)
            if age < older_than_seconds:
                log.debug("checkpoint.partial_kept", path=str(path), age_seconds=round(age, 1))
                continue
            if own.group(1) == "replaced":
                step = int(own.group(2))
                final = self.path / self.name_for(step)
                if not os.path.lexists(final) and isinstance(self._check(path, step), Checkpoint):
                    os.rename(path, final)
                    fsync_dir(self.path)
                    log.warning("checkpoint.restored", path=str(final), step=step, was=str(path))
                    handled.append(path)
                    continue
            _remove(path)
            log.warning("checkpoint.partial_removed", path=str(path), age_seconds=round(age, 1))
            handled.append(path)
        return handled


# ---------------------------------------------------------------------- heartbeat
class Heartbeat:
    """Writes ``{"step", "at", "host", "pid"}`` to `path`, at most once per `min_interval`
    seconds (the first beat always writes): cheap enough to call at every training step.

    The file is replaced atomically (a temporary file renamed over it), so a reader never
    sees half a heartbeat; nothing is fsynced: it is a liveness hint read while the job
    runs, and one lost to a power cut is worth nothing anyway. A write that fails (the
    directory is gone, the disk is full) is logged once and otherwise ignored: a heartbeat
    must never kill the training it reports on."""

    def __init__(self, path: PathLike, min_interval: float = HEARTBEAT_MIN_INTERVAL,
                 clock: Callable[[], float] = time.monotonic):
        self.path = Path(path)
        self.min_interval = min_interval
        self.clock = clock
        self._last: Optional[float] = None
        self._warned = False
        self._host = socket.gethostname()
        # Unique per host and process: ranks on several nodes may beat into one shared file.
        self._tmp = self.path.with_name(f".{self.path.name}.{self._host}.{os.getpid()}.tmp")

    def beat(self, step: int) -> bool:
        """Record `step`; True when the file was written now, False when skipped or failed."""
        step = _heartbeat_step(step)
        now = self.clock()
        if self._last is not None and now - self._last < self.min_interval:
            return False
        self._last = now
        data = json.dumps({"step": step, "at": round(time.time(), 3), "host": self._host, "pid": os.getpid()})
        try:
            self._tmp.write_text(data)
            os.replace(self._tmp, self.path)
        except OSError as e:
            with contextlib.suppress(OSError):
                self._tmp.unlink()      # half written (disk full): no litter next to the heartbeat
            if not self._warned:
                self._warned = True
                log.warning("checkpoint.heartbeat_failed", path=str(self.path), error=str(e),
                            note="training goes on; hang detection sees no heartbeat (logged once)")
            return False
        return True


_heartbeats: Dict[str, Heartbeat] = {}   # by $HPR_PROGRESS_FILE's text: one per process in practice


def heartbeat(step: int) -> None:
    """Tell `srun --auto-resume` that training reached `step` (a non-negative int); call it
    every step, from rank 0 (any rank may: they all write the same file).

    Writes to the file named by $HPR_PROGRESS_FILE, at most once a second per process;
    with the variable unset (not under `srun --auto-resume`) it only checks `step`.
    Never raises for an unwritable file (see `Heartbeat`)."""
    step = _heartbeat_step(step)
    path = os.environ.get(PROGRESS_FILE_ENV)
    if not path:
        return
    beats = _heartbeats.get(path)
    if beats is None:
        beats = _heartbeats[path] = Heartbeat(path)
    beats.beat(step)


def _heartbeat_step(step: object) -> int:
    """`step` as an int: numpy and torch integers are fine, bools, floats and negatives are not."""
    if isinstance(step, bool):
        raise TypeError(f"step must be a non-negative integer, not {step!r}")
    try:
        value = operator.index(step)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"step must be a non-negative integer, not {type(step).__name__} {step!r}") from None
    if value < 0:
        raise ValueError(f"step must be a non-negative integer, not {value}")
    return value


# ---------------------------------------------------------------------- helpers
def _check_step(step: int) -> int:
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"step must be a non-negative integer, not {step!r}")
    return step


def _random_suffix() -> str:
    return os.urandom(4).hex()


def _is_inside(rel: str) -> bool:
    parts = Path(rel).parts
    return bool(parts) and not os.path.isabs(rel) and ".." not in parts


def _sync_tree(root: Path) -> Dict[str, int]:
    """fsync every file and directory under `root` (children first); returns {relative path: size}."""
    files: Dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        here = Path(dirpath)
        for name in sorted(filenames) + sorted(dirnames):
            st = os.lstat(here / name)
            rel = (here / name).relative_to(root).as_posix()
            if rel == MARKER:
                raise CheckpointError(f"{MARKER} is reserved for the completion marker; name the file otherwise")
            if stat.S_ISDIR(st.st_mode):
                continue
            if not stat.S_ISREG(st.st_mode):
                raise CheckpointError(f"{rel}: only regular files and directories can be saved (no symlinks)")
            fd = os.open(here / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            files[rel] = st.st_size
        if here != root:
            fsync_dir(here)
    return dict(sorted(files.items()))


def _write_synced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)



def _remove(path: Path) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _newest_change(path: Path) -> float:
    """The latest mtime/ctime of `path` and anything under it (a rename updates ctime)."""
    st = os.lstat(path)
    newest = max(st.st_mtime, st.st_ctime)
    if stat.S_ISDIR(st.st_mode):
        for dirpath, dirnames, filenames in os.walk(path):
            for name in dirnames + filenames:
                with contextlib.suppress(OSError):
                    st = os.lstat(os.path.join(dirpath, name))
                    newest = max(newest, st.st_mtime, st.st_ctime)
    return newest
