"""The controller journal: real SQLite files, real processes killed with SIGKILL."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from hpresilience.controller.journal import Journal, JournalError


@pytest.fixture
def journal(tmp_path):
    j = Journal(tmp_path / "journal.db")
    yield j
    j.close()


def test_open_is_idempotent_one_active_workflow_per_node(journal):
    a = journal.open_workflow("n1", "reboot", "Action: Reboot", "drain", detected_at=100.0)
    b = journal.open_workflow("n1", "replace", "Action: Replace", "drain", detected_at=200.0)
    assert a.id == b.id and b.action == "reboot"
    other = journal.open_workflow("n2", "replace", "Action: Replace", "drain", detected_at=200.0)
    assert other.id != a.id
    assert [w.node for w in journal.active()] == ["n1", "n2"]


def test_advance_is_compare_and_set(journal):
    wf = journal.open_workflow("n1", "reboot", "Action: Reboot", "drain", detected_at=1.0)
    moved = journal.advance(wf.id, "drain", "reboot", {"boot_before": 1234.0})
    assert moved.step == "reboot" and moved.data == {"boot_before": 1234.0}
    # Whoever still believes the workflow is in drain must not reboot the node again.
    assert journal.advance(wf.id, "drain", "reboot") is None
    done = journal.advance(wf.id, "reboot", "done", status="done")
    assert done.status == "done" and done.finished_at is not None
    assert journal.advance(wf.id, "done", "anything") is None   # finished is final
    # A finished workflow frees the node for the next one.
    assert journal.open_workflow("n1", "replace", "r", "drain", detected_at=5.0).id != wf.id


def test_events_and_history(tmp_path):
    clock = iter(range(1000, 2000)).__next__
    j = Journal(tmp_path / "j.db", clock=lambda: float(clock()))
    wf = j.open_workflow("n3", "reboot", "Action: Reboot; XID 73", "drain", detected_at=990.0)
    j.advance(wf.id, "drain", "reboot")
    j.record("n3", "note", {"text": "slurmctld slow"}, workflow_id=wf.id)
    j.advance(wf.id, "reboot", "done", status="done")
    kinds = [e.kind for e in j.events(workflow_id=wf.id)]
    assert kinds == ["started", "step", "note", "step"]
    (done,) = j.history(node="n3")
    assert done.time_to_service == done.finished_at - 990.0 > 0
    assert j.history(node="n9") == [] and j.history(since=10**9) == []
    with pytest.raises(JournalError):
        j.advance(wf.id, "x", "y", status="bogus")
    j.close()


def test_two_controllers_on_one_journal_only_one_takes_a_step(tmp_path):
    path = tmp_path / "shared.db"
    first, second = Journal(path), Journal(path)
    wf = first.open_workflow("n1", "reboot", "r", "drain", detected_at=1.0)
    assert second.open_workflow("n1", "reboot", "r", "drain", detected_at=1.0).id == wf.id
    results = [first.advance(wf.id, "drain", "reboot"), second.advance(wf.id, "drain", "reboot")]
    assert sum(r is not None for r in results) == 1
    first.close()
    second.close()


def test_a_step_survives_sigkill(tmp_path):
    """The step is on disk once advance() returns, even if the process dies the next instant."""
    path = tmp_path / "crash.db"
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from hpresilience.controller.journal import Journal
        j = Journal(Path({str(path)!r}))
        wf = j.open_workflow("n1", "reboot", "Action: Reboot", "drain", detected_at=1.0)
        j.advance(wf.id, "drain", "reboot", {{"boot_before": 42.0}})
        print("advanced", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "advanced"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    reopened = Journal(path)
    (wf,) = reopened.active()
    assert wf.step == "reboot" and wf.data["boot_before"] == 42.0
    # The restarted controller sees it is past the reboot request: it must not reboot again.
    assert reopened.advance(wf.id, "drain", "reboot") is None
    reopened.close()
