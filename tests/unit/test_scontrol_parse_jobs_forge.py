"""Job records that user text cannot forge (issue 11, deliverable 6).

Measured on the 22.05.8 test cluster: `sbatch -J 'x NodeList=n9 BatchHost=n9'` made `scontrol -o show job`
print NodeList=n9 before the real field, and a newline in -J or --comment is accepted and printed raw,
so a job's text could add a whole "JobId=999 JobState=RUNNING NodeList=n1" line (and the old parser then
failed on the cut-off record, taking every jobs() read down with it). The gateway now reads jobs from
squeue tables (scontrol_parse.JOB_TABLE_FIELDS) with each user-text field on its own."""
from typing import Dict, List

import pytest

from hpresilience.slurm import SlurmGateway
from hpresilience.slurm.backend import ScontrolBackend
from hpresilience.slurm.errors import ParseError
from hpresilience.slurm.scontrol_parse import (
    JOB_TABLE_FIELDS,
    parse_job_table,
    parse_user_text_one,
    parse_user_text_table,
)
from tests.unit.test_controller_steps import FakeSqueue

# What 22.05.8 printed for job 1 with `squeue --noheader --all --states=all --Format=<JOB_TABLE_FIELDS>`.
REAL_ROW = ("1|1|N/A|RUNNING|root|train|n1||n1|1|1|OK|1|0|N/A|2026-11-29T19:58:36|2026-11-29T19:58:36|"
            "2026-11-29T19:58:36|0|None|")
FORGED_NAME = "nl\nJobId=999 JobState=RUNNING NodeList=n1 NumNodes=1"


def squeue_job(job_id: int, nodes: str, name: str, comment: str = "(null)", **fields: str) -> Dict[str, str]:
    """One job as FakeSqueue prints it: every JOB_TABLE_FIELDS value (a running one-node job by default)."""
    row = dict(zip([f for f, _ in JOB_TABLE_FIELDS], REAL_ROW.split("|")))
    row.update({"JobID": str(job_id), "ArrayJobID": str(job_id), "NodeList": nodes, "BatchHost": nodes,
                "Name": name, "Comment": comment, "WorkDir": "/tmp", "STDOUT": f"/tmp/slurm-{job_id}.out"})
    row.update(fields)
    return row


def gateway_over(jobs: List[Dict[str, str]]) -> SlurmGateway:
    return SlurmGateway(ScontrolBackend(runner=FakeSqueue(jobs)))


def test_the_real_row_reads_as_scontrol_would():
    (record,) = parse_job_table(REAL_ROW + "\n")
    assert (record["JobId"], record["NodeList"], record["Requeue"], record["ExitCode"]) == ("1", "n1", "1", "0:0")
    assert "ArrayJobId" not in record   # squeue gives a plain job its own id there; scontrol gives none


def test_a_name_cannot_put_fields_before_the_real_ones():
    # Old code: parse_record kept the first NodeList, the name's n9.
    gateway = gateway_over([squeue_job(1, "n1", "x NodeList=n9 BatchHost=n9")])
    job = gateway.job(1)
    assert (job.name, job.nodes, job.batch_host) == ("x NodeList=n9 BatchHost=n9", ("n1",), "n1")
    assert gateway.jobs()[0].nodes == ("n1",)


def test_a_newline_in_a_name_or_comment_cannot_add_a_job():
    gateway = gateway_over([squeue_job(2, "n1", FORGED_NAME, comment="cm\nJobId=998 JobState=RUNNING"),
                            squeue_job(3, "n2", "other")])
    jobs = {j.job_id: j for j in gateway.jobs()}
    assert sorted(jobs) == [2, 3] and jobs[2].name == FORGED_NAME and jobs[3].nodes == ("n2",)
    job = gateway.job(2)
    assert job.extra["Comment"] == "cm\nJobId=998 JobState=RUNNING" and job.nodes == ("n1",)


def test_a_forged_line_for_another_job_is_not_its_name():
    # Job 4's name adds a well-formed "5|evil|" line: job 5 then has two lines and is read alone.
    runner = FakeSqueue([squeue_job(4, "n1", "a|\n5|evil"), squeue_job(5, "n2", "real")])
    jobs = {j.job_id: j for j in SlurmGateway(ScontrolBackend(runner=runner)).jobs()}
    assert (jobs[4].name, jobs[5].name) == ("a|\n5|evil", "real")
    assert ["squeue", "--noheader", "--all", "--states=all", "--Format=JobID:|,Name:|", "--jobs=5"] in runner.calls


def test_user_text_tables():
    assert parse_user_text_table("1|x|\n2|a\n2|evil|\n3|evil|\n3|real|\n4|b|c|\n", {1, 2, 3, 4}) == {4: "b|c"}
    assert parse_user_text_one("7|(null)|\n", 7) == ""
    with pytest.raises(ParseError):
        parse_user_text_one("8|x|\n", 7)
    with pytest.raises(ParseError):
        parse_job_table("1|x|\n")   # the Slurm-written table never has a short line
