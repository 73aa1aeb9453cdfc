"""statefile: atomic JSON state that survives a crash."""
import os
import stat

from hpresilience.statefile import read_json, write_json


def test_write_json_makes_the_rename_durable(tmp_path, monkeypatch):
    """Issue 9, defect 14: the directory is fsynced after the rename, else a crash can
    bring back the old file (pending events the agent promised to keep)."""
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    write_json(tmp_path / "state" / "events.json", [1, 2])
    assert synced == [False, True]            # the file's data, then the directory entry
    assert read_json(tmp_path / "state" / "events.json", None) == [1, 2]


def test_unreadable_state_gives_the_default(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    assert read_json(tmp_path / "x.json", []) == []
