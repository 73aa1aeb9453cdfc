"""Small JSON state files that survive crashes: written atomically (temp file,
fsync, rename, fsync of the directory), so a reader sees the old or the new content, never half."""
from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        # The rename is durable only once the directory is: without this a crash can bring
        # back the old file, losing pending events the agent promised to keep (issue 9, defect 14).
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync_dir(path: Path) -> None:
    """Make the directory's entries (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:  # some network file systems refuse fsync on a directory
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        log.debug("statefile.dir_fsync_unsupported", path=str(path), error=str(e))
    finally:
        os.close(fd)


def read_json(path: Path, default: Any) -> Any:
    """The file's content, or `default` when it is missing or unreadable.

    A corrupt state file (disk full, manual edit) is logged and ignored: the
    daemon must start, not crash-loop on its own leftovers."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default
    except (OSError, ValueError) as e:
        log.warning("statefile.unreadable", path=str(path), error=str(e))
        return default
