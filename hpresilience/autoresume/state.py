"""The attempt count of a job, kept in a file so it survives a requeue (the
batch script starts again from the top, on other nodes): with
SLURM_RESTART_COUNT it tells attempt k of N after any number of requeues."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional

from ..statefile import write_json


@dataclass
class AttemptState:
    job_id: int
    submit_time: Optional[float] = None      # tells this job from an older one with the same id
    attempts: int = 0                        # attempts started so far
    requeues: int = 0
    last_checkpoint_step: Optional[int] = None   # newest checkpoint when the last attempt started
    history: List[dict] = field(default_factory=list)

    @staticmethod
    def path(directory: Path, job_id: int) -> Path:
        return directory / f"auto-resume-{job_id}.json"

    @classmethod
    def load(cls, directory: Path, job_id: int) -> AttemptState:
        try:
            data = json.loads(cls.path(directory, job_id).read_text())
            return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
        except FileNotFoundError:
            return cls(job_id)
        except (ValueError, TypeError) as e:
            raise ValueError(f"unreadable auto-resume state {cls.path(directory, job_id)}: {e}") from None

    def save(self, directory: Path) -> None:
        write_json(self.path(directory, self.job_id), asdict(self))

    def note(self, event: str, **detail: object) -> None:
        self.history.append({"at": round(time.time(), 3), "event": event, **detail})
