"""Deliverable 4 of issue 9 (defect 1): no user-controlled text causes an action.

Every shipped rule's trigger text is put in every place the kernel prints text a user controls
(process names, truncated to 15 bytes as the kernel does; file names, mount options and cgroup paths
whole), in each line format that carries it, and in user programs' own syslog and /dev/kmsg lines.
The line must classify exactly as it does with a harmless name there: a carrier that is itself a fault
(a system OOM, a hung task) keeps its own finding, any other gives none or an action-none finding.

The carriers are written from the kernel's own format strings (cited beside each), not from the masks
in kernel_line: a carrier the masks miss fails here. Hostile names are built from the kernel's own
delimiters (`[1]: `, ` (1): `, `, `, `:`) as well as from triggers, and FAULTS checks the other half of
defect 1: a real fault whose line holds a hostile name classifies as with a harmless one."""
from typing import Optional, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpresilience.agent.kernel_rules import load_rules
from hpresilience.finding import Finding, NodeAction

RULES = load_rules()
COMM_BYTES = 15  # TASK_COMM_LEN - 1

# One trigger per shipped rule: the message alone, as the kernel writes it.
TRIGGERS = {
    "gpu_xid_recovery": "NVRM: Xid (PCI:0000:b9:00): 154, GPU recovery action changed from 0x0 (None) to 0x2 "
                        "(Node Reboot Required)",
    "gpu_xid": "NVRM: Xid (PCI:0000:b9:00): 74, pid=<unknown>, name=<unknown>, NVLink: fatal error",
    "gpu_fallen_off_bus": "NVRM: GPU 0000:01:00.0: GPU has fallen off the bus.",
    "gpu_init_failed": "NVRM: GPU 0000:3b:00.0: RmInitAdapter failed! (0x26:0x56:1474)",
    "hung_task": "INFO: task python:1234 blocked for more than 120 seconds.",
    "soft_lockup": "watchdog: BUG: soft lockup - CPU#3 stuck for 23s! [python:1234]",
    "hard_lockup": "Watchdog detected hard LOCKUP on cpu 5",
    "rcu_stall": "rcu: INFO: rcu_sched detected stalls on CPUs/tasks:",
    "mce_uncorrected": "mce: [Hardware Error]: Machine check: Processor context corrupt",
    "edac_uncorrected": "EDAC MC0: UE page 0x0",
    "edac_corrected": "EDAC MC2: 3 CE memory read error",
    "pcie_fatal": "pcieport 0000:00:01.0: AER: Uncorrected (Fatal) error received: 0000:01:00.0",
    "ext4_error": "EXT4-fs error (device sda1): ext4_lookup:1855: inode #2",
    "ext4_readonly": "EXT4-fs (sda1): Remounting filesystem read-only",
    "xfs_error": "XFS (sdb): Filesystem has been shut down due to log error (0x2).",
    "nvme_controller_failed": "nvme nvme1: Device not ready; aborting reset, CSTS=0x1",
    "nvme_controller_down": "nvme nvme0: controller is down; will reset: CSTS=0x3",
    "nvme_io_timeout": "nvme nvme0: I/O 258 QID 5 timeout, aborting",
    "mlx5_device_error": "mlx5_core 0000:d2:00.0: poll_health:174:(pid 0): device's health compromised",
    "mlx5_command_error": "mlx5_core 0000:5e:00.0: mlx5_cmd_out_err:838:(pid 1): ACCESS_REG(0x805) op_mod(0x1) "
                          "failed, status bad operation(0x2), syndrome (0x305684), err(-22)",
    "mlx5_module_error": "mlx5_core 0000:5c:00.0: Port module event[error]: module 0, Cable error, High Temperature",
    "efa_device_error": "efa 0000:00:1e.0: Device isn't ready, abort com init 0x0",
    "efa_command_error": "efa 0000:10:1d.0: Failed to query device attributes",
    "ib_port_down": "ib_core mlx5_0: port 1 state changed to DOWN",
    "system_oom": "Out of memory: Killed process 1234 (python) total-vm:1kB",
    "cgroup_oom": "Memory cgroup out of memory: Killed process 1234 (python) total-vm:1kB",
}
# Short enough to be a whole process name.
SHORT_TRIGGERS = ["EDAC MC0: UE", "EDAC MC0: 1 UE", "EDAC x MC0: UE", "rcu: INFO: x", "XFS (sda): log I/O error"]
# The kernel's own delimiters, which a name may hold to end a mask early or start one too soon.
DELIMITERS = ["[1]: ", "[1] ", " (1): ", " (1) ", ", ", ": ", ":1", ")", "(", "]", "[", '"', "=", "name=", " in "]
HOSTILE_NAMES = ["x[1]: ", "x (1): ", "a, b", "a:1", "x)", "(x", "x]", 'a"b', "a, GPU x", "EDAC MC0: UE[1]: ",
                 "x[1]: , y", "name=x, ", "EDAC MC0: UE, ", "x (1) ", "[1] x"]

# Where the kernel prints a process name ({comm}), a file name or path ({path}), a mount option
# ({opt}) or a cgroup path ({cg}). Each is a line of the kernel's, as dmesg shows it.
CARRIERS = [
    "Memory cgroup out of memory: Killed process 4242 ({comm}) total-vm:123456kB, anon-rss:120000kB, "
    "file-rss:0kB, shmem-rss:0kB, UID:1000 pgtables:512kB oom_score_adj:0",
    "Out of memory: Killed process 4242 ({comm}) total-vm:123456kB, anon-rss:120000kB, file-rss:0kB",
    "{comm} invoked oom-killer: gfp_mask=0xcc0(GFP_KERNEL), order=0, oom_score_adj=0",
    "oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset={cg},mems_allowed=0,oom_memcg=/slurm/{cg},"
    "task_memcg=/slurm/{cg}/step_0,task={comm},pid=4242,uid=1000",
    "Memory cgroup stats for /slurm/uid_1000/{cg}:",
    "[   4242]  1000  4242   123456     1234   102400        0             0 {comm}",
    "cgroup: fork rejected by pids controller in /user.slice/{cg}",
    "{comm}[4242]: segfault at 0 ip 00007f0000001000 sp 00007ffd00000000 error 4 in {path}[7f0000000000+1000]",
    "{comm}[4242]: segfault at 0 ip 00007f0000001000 sp 00007ffd00000000 error 4 likely on CPU 3 (core 3, "
    "socket 0)",
    "traps: {comm}[4242] general protection fault ip:401000 sp:7ffd00000000 error:0 in {path}[400000+1000]",
    "traps: {comm}[4242] trap divide error ip:401000 sp:7ffd00000000 error:0 in {path}[400000+1000]",
    "{comm}[4242]: unhandled signal 11 code 0x1 at 0x0000000000000000 in {path}[400000+1000]",
    "{comm} (4242): drop_caches: 3",                                      # fs/drop_caches.c
    # arch/x86/kernel/signal.c signal_fault: "%s[%d] bad frame in %s frame:%p ip:%lx sp:%lx orax:%lx".
    "{comm}[4242] bad frame in rt_sigreturn frame:00007ffd00000000 ip:401000 sp:7ffd00000000 orax:ffffffff",
    # arch/x86/entry/vsyscall/vsyscall_64.c warn_bad_vsyscall: "%s%s[%d] %s ip:%lx cs:%lx sp:%lx ...".
    "{comm}[4242] misaligned vsyscall (exploit attempt or buggy program) -- look up the vsyscall kernel "
    "parameter if you need a workaround ip:ffffffffff600001 cs:33 sp:7ffd00000000 ax:0 si:0 di:0",
    "{comm}[4242] vsyscall attempted with vsyscall=none ip:ffffffffff600000 cs:33 sp:7ffd00000000 ax:0",
    # mm/page_alloc.c warn_alloc: "%s: %pV, mode:%#x(%pGg), nodemask=%*pbl" (current->comm); mm/vmalloc.c.
    "{comm}: page allocation failure: order:4, mode:0x40cc0(GFP_KERNEL|__GFP_COMP), nodemask=(null),"
    "cpuset={cg},mems_allowed=0-1",
    "{comm}: vmalloc error: size 8192, vm_struct allocation failed, mode:0xcc0(GFP_KERNEL), nodemask=(null)",
    # kernel/exit.c check_stack_usage: "%s (%d) used greatest stack depth: %lu bytes left".
    "{comm} (4242) used greatest stack depth: 11920 bytes left",
    # arch/x86/mm/fault.c pgtable_bad: "%s: Corrupted page table at address %lx".
    "{comm}: Corrupted page table at address 7f0000001000",
    # ipc/shm.c: "%s (%d): Using mlock ulimits for SHM_HUGETLB is obsolete".
    "{comm} (4242): Using mlock ulimits for SHM_HUGETLB is obsolete",
    # mm/oom_kill.c __oom_reap_task_mm: "oom_reaper: reaped process %d (%s), now anon-rss:%lukB, ...".
    "oom_reaper: reaped process 4242 ({comm}), now anon-rss:0kB, file-rss:0kB, shmem-rss:0kB",
    "INFO: task {comm}:4242 blocked for more than 120 seconds.",
    "watchdog: BUG: soft lockup - CPU#3 stuck for 23s! [{comm}:4242]",
    "process '{path}' started with executable stack",
    'audit: type=1400 audit(1700000000.123:456): apparmor="DENIED" operation="open" profile="{path}" '
    'name="{path}" pid=4242 comm="{comm}" requested_mask="r" denied_mask="r" fsuid=1000 ouid=0',
    'audit: type=1326 audit(1700000000.123:457): auid=1000 uid=1000 gid=1000 ses=3 pid=4242 comm="{comm}" '
    'exe="{path}" sig=31 arch=c000003e syscall=59 compat=0 ip=0x7f00 code=0x0',
    "audit: type=1326 audit(1700000000.123:458): pid=4242 comm={comm} exe={path} sig=31",
    "NVRM: Xid (PCI:0000:b9:00): 13, pid=4242, name={comm}, Graphics Exception: ESR 0x504648=0x0",
    "NVRM: Xid (PCI:0000:b9:00): 154, pid=4242, name={comm}, GPU recovery action changed from 0x0 (None) to "
    "0x0 (None)",
    "EXT4-fs error (device loop0): ext4_lookup:1855: inode #2: comm {comm}: deleted inode referenced: 1234",
    "EXT4-fs warning (device sda1): ext4_dirblock_csum_verify:376: inode #2: comm {comm}: No space for "
    "directory leaf checksum.",
    'EXT4-fs (sda1): Unrecognized mount option "{opt}" or missing value',
    "EXT4-fs (sda1): mounted filesystem with ordered data mode. Opts: {opt}. Quota mode: none.",
    "XFS (sda1): unknown mount option [{opt}].",
    'overlayfs: unrecognized mount option "{opt}" or missing value',
    "fuse: Unknown parameter '{opt}'",
    'VFS: Can\'t find ext4 filesystem on dev {path}.',
]
# How the line reaches the agent: the kernel's own, in every form it is read in.
KERNEL_FORMS = ["{}", "[12345.678901] {}", "[12345.678901][ T4242] {}", "Nov 22 11:20:21 n1 kernel: {}",
                "6,1234,5678901,-;{}"]
# Lines users write themselves: syslog (`logger`, a program's own syslog), /dev/kmsg with a user facility.
USER_LINES = ["Nov 22 11:20:21 n1 myprog: {}", "Nov 22 11:20:21 n1 myprog[4242]: {}",
              "2026-11-22T11:20:21+00:00 n1 myprog: {}", "12,1234,5678901,-;myprog: {}", "14,1235,5678902,-;{}",
              "<12>Nov 22 11:20:21 n1 myprog: {}", "user  :notice: [12345.678901] {}"]
HARMLESS = {"comm": "python", "path": "/home/alice/a.out", "opt": "noatime", "cg": "job_42"}


def comm(text: str) -> str:
    """A process name as the kernel keeps it: at most 15 bytes."""
    return text.encode()[:COMM_BYTES].decode(errors="ignore")


def fill(carrier: str, user: str) -> str:
    return carrier.format(comm=comm(user), path=f"/tmp/{user}", opt=user, cg=f"{user}.scope")


def outcome(line: str) -> Optional[Tuple[str, NodeAction, Optional[str], str]]:
    finding: Optional[Finding] = RULES.classify(line)
    if finding is None or finding.action is NodeAction.NONE:
        return None
    return finding.code, finding.action, finding.entity, finding.message


def test_every_shipped_rule_has_a_trigger_that_fires():
    """The positive sign: each trigger is its rule's, so the cases below test what they claim."""
    assert set(TRIGGERS) == set(RULES.rules)
    for rule, trigger in TRIGGERS.items():
        for form in KERNEL_FORMS:
            finding = RULES.classify(form.format(trigger))
            assert finding is not None and finding.rule == rule, (rule, form)


@pytest.mark.parametrize("carrier", CARRIERS)
@pytest.mark.parametrize("form", KERNEL_FORMS)
def test_a_trigger_in_a_user_field_changes_nothing(carrier, form):
    baseline = outcome(form.format(fill(carrier, "python")))
    for trigger in [*TRIGGERS.values(), *SHORT_TRIGGERS]:
        for user in (trigger, trigger.encode()[COMM_BYTES // 2:].decode(errors="ignore"),
                     *(d + trigger for d in DELIMITERS), *(trigger + d for d in DELIMITERS)):
            line = form.format(fill(carrier, user))
            assert outcome(line) == baseline, line


@pytest.mark.parametrize("user_line", USER_LINES)
def test_lines_users_write_never_act(user_line):
    assert RULES.classify("Nov 22 11:20:21 n1 kernel: " + TRIGGERS["edac_uncorrected"]) is not None
    for trigger in TRIGGERS.values():
        assert RULES.classify(user_line.format(trigger)) is None, user_line.format(trigger)


def test_the_defect_1_reproduction():
    """A process named `EDAC MC0: UE` (prctl PR_SET_NAME) hitting its cgroup limit, segfaulting,
    failing an allocation: no action at all. Its hung task is a hung task, not a memory error."""
    assert outcome("EDAC MC0: UE page 0x0") is not None  # the positive sign: the trigger alone acts
    for line in ["Memory cgroup out of memory: Killed process 4242 (EDAC MC0: UE) total-vm:1kB",
                 "oom-kill:constraint=CONSTRAINT_MEMCG,task_memcg=/slurm/job_42,task=EDAC MC0: UE,pid=4242,uid=1",
                 "EDAC MC0: UE[4242]: segfault at 0 ip 0000000000401000 sp 00007ffd00000000 error 4",
                 "EDAC MC0: UE[4242] bad frame in rt_sigreturn frame:0 ip:401000 sp:7ffd00000000 orax:0",
                 "EDAC MC0: UE: page allocation failure: order:4, mode:0x40cc0(GFP_KERNEL|__GFP_COMP)"]:
        assert outcome(line) is None, line
    hung = RULES.classify("INFO: task EDAC MC0: UE:4242 blocked for more than 120 seconds.")
    assert (hung.code, hung.entity) == ("HUNG_TASK", "pid 4242") and "EDAC" not in hung.message


# Real faults whose line holds a process name: the name must not hide them (issue 9, defect 1).
FAULTS = [
    # NVIDIA driver: "NVRM: Xid (PCI:%s): %d, pid=%s, name=%s, %s".
    "NVRM: Xid (PCI:0000:b9:00): 48, pid=4242, name={comm}, An uncorrectable double bit error (DBE) has "
    "been detected on GPU in the framebuffer at partition 0, subpartition 0.",
    "NVRM: Xid (PCI:0000:b9:00): 79, pid=4242, name={comm}, GPU has fallen off the bus.",
    "NVRM: Xid (PCI:0000:b9:00): 95, pid=4242, name={comm}, Uncontained: FBHUB. RST: Yes, D-RST: No",
    "NVRM: Xid (PCI:0000:b9:00): 154, pid=4242, name={comm}, GPU recovery action changed from 0x0 (None) to "
    "0x2 (Node Reboot Required)",
    # mm/oom_kill.c: "%s: Killed process %d (%s) total-vm:%lukB, ..." (the system OOM killer).
    "Out of memory: Killed process 4242 ({comm}) total-vm:123456kB, anon-rss:120000kB, file-rss:0kB",
    # kernel/watchdog.c: "BUG: soft lockup - CPU#%d stuck for %us! [%s:%d]".
    "watchdog: BUG: soft lockup - CPU#3 stuck for 23s! [{comm}:4242]",
    # kernel/hung_task.c: "INFO: task %s:%d blocked for more than %ld seconds.".
    "INFO: task {comm}:4242 blocked for more than 120 seconds.",
]


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("form", KERNEL_FORMS)
def test_a_hostile_name_never_hides_a_real_fault(fault, form):
    baseline = outcome(form.format(fill(fault, "python")))
    assert baseline is not None  # the positive sign: with a harmless name it is a fault
    for user in [*HOSTILE_NAMES, *SHORT_TRIGGERS, *DELIMITERS]:
        line = form.format(fill(fault, user))
        assert outcome(line) == baseline, line


@settings(max_examples=300, deadline=None)
@given(fault=st.sampled_from(FAULTS), form=st.sampled_from(KERNEL_FORMS),
       pieces=st.lists(st.sampled_from([*DELIMITERS, *SHORT_TRIGGERS, "x", " "]), min_size=1, max_size=6))
def test_no_name_made_of_kernel_delimiters_hides_a_fault(fault, form, pieces):
    baseline = outcome(form.format(fill(fault, "python")))
    assert outcome(form.format(fill(fault, "".join(pieces)))) == baseline


@settings(max_examples=300, deadline=None)
@given(carrier=st.sampled_from(CARRIERS), form=st.sampled_from(KERNEL_FORMS),
       trigger=st.sampled_from([*TRIGGERS.values(), *SHORT_TRIGGERS]),
       start=st.integers(0, 40), prefix=st.lists(st.sampled_from(DELIMITERS), max_size=3),
       suffix=st.lists(st.sampled_from(DELIMITERS), max_size=3))
def test_any_slice_of_a_trigger_anywhere_in_a_user_field(carrier, form, trigger, start, prefix, suffix):
    user = "".join(prefix) + trigger[start:] + "".join(suffix)
    baseline = outcome(form.format(fill(carrier, "python")))
    assert outcome(form.format(fill(carrier, user))) == baseline
