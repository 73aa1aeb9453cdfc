"""Kernel-log sources: what is new in a log file, /dev/kmsg or the journal, now.

One module per source (file, kmsg, journal) and the parts they share (common).

Every source answers one question without blocking: "which lines appeared
since I last asked?", within a byte budget so a flood costs bounded memory and
CPU per poll. Classifying lines is someone else's job (kernel_rules).

Lessons this module is built around:
- node-problem-detector replayed old kmsg lines after a restart (PR #1259) and
  flagged nodes for faults a reboot had already cleared. Every source persists
  a cursor in state_dir and resumes after it; with no cursor it starts at "now"
  (files: end of file; kmsg/journal: records younger than max_age_seconds,
  Azure healthagent's one-hour rule).
- NPD's kmsg reader closed silently under a flood (#1168). Nothing here stops
  following on an error: I/O errors are logged once and retried on the next
  read(), a dead journalctl is restarted with backoff.
- A line is at most `max_line_bytes`; the rest of an over-long line is
  discarded, so a 1 MB line or a binary file never grows a buffer unbounded.
- Every line carries what the rules read (LogLine.kernel_line) with the time
  the kernel stamped it, never the time it was read (issue 9, defect 10), and
  is None where the line must not be classified: written by another program,
  or a file line without a date (issue 9, defect 9).
"""
from __future__ import annotations

import os
import stat

from .common import DEFAULT_MAX_BYTES, MAX_LINE_BYTES, LogLine, LogSource, LogSourceError
from .file import FileSource, file_kernel_line
from .journal import JournalSource, journal_lines
from .kmsg import KmsgRecord, KmsgSource, parse_kmsg_record


def open_source(spec: str, state_dir: os.PathLike) -> LogSource:
    """The source a configuration entry names: "kmsg", "journal" or an absolute file path."""
    text = spec.strip() if isinstance(spec, str) else ""
    if text in ("kmsg", "/dev/kmsg"):
        return KmsgSource(state_dir)
    if text == "journal":
        return JournalSource(state_dir)
    if not os.path.isabs(text):
        raise ValueError(f"kernel log source {spec!r}: expected 'kmsg', 'journal' or an absolute file path")
    try:
        mode = os.stat(text).st_mode
    except FileNotFoundError:
        mode = stat.S_IFREG  # followed from its start once it appears
    if not stat.S_ISREG(mode):
        raise ValueError(f"kernel log source {spec!r} is not a regular file")
    return FileSource(text, state_dir)


__all__ = ["DEFAULT_MAX_BYTES", "FileSource", "JournalSource", "KmsgRecord", "KmsgSource", "LogLine", "LogSource",
           "LogSourceError", "MAX_LINE_BYTES", "file_kernel_line", "journal_lines", "open_source",
           "parse_kmsg_record"]
