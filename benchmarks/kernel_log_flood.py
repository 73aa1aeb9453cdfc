"""Kernel-log flood: 10,000 noise lines/s for 30 s into one node's kern.log, one XID 74 in the middle.

A separate writer process appends one batch of 1,000 lines every 100 ms (one write() per
batch, paced against the start time, so a late batch is caught up rather than dropped) and
records when each batch landed. Noise is what a busy GPU node logs: 30% XID 13/31/43
(application errors, action none, on all 8 GPUs with varying pids) and 70% unrelated
kernel messages; every template is checked against the agent's rules first (none may ask
for an action). At the middle of batch 150 the XID 74 seed line is written on its own.

Reported: whether the node went FAIL with `Action: Replace`, and how long after the XID
line's write() (agent `slurm.set_state` log event, and our 100 ms scontrol poll); the
agent's lag (the `hpr_agent_kernel_log_lag_bytes` gauge converted to seconds at the
measured write rate, and lines written minus `hpr_agent_kernel_log_lines_total`, in
seconds at 10,000 lines/s), scraped every 250 ms; the agent's CPU over the flood; its
RSS before, at peak and after.

    /work/main/.venv/bin/python benchmarks/kernel_log_flood.py [--rate 10000] [--seconds 30]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from _bench import (
    CLK_TCK,
    XID74,
    BenchCluster,
    LogFollower,
    cpu_ticks,
    install_sigterm_handler,
    is_replace_fail,
    iso_time,
    metric,
    print_header,
    rss_mb,
    run_on_cluster,
    scrape,
    syslog_line,
    timeline_value,
)

BATCH_SECONDS = 0.1
LAG_GOAL_SECONDS = 2.0
RSS_GOAL_MB = 80.0  # the steady-state budget (agent_overhead.py) holds during a flood too
GPU_BUSES = ["53", "64", "75", "86", "97", "a8", "b9", "ca"]   # the fake GPUs' p5.48xlarge bus ids
PROCS = ["python", "pt_main_thread", "torchrun", "nccl-proxy", "python3.10"]


def noise_pool(rng: random.Random, size: int) -> List[str]:
    """`size` noise messages (without the syslog prefix)."""
    def hx(bits: int, width: int = 0) -> str:
        return f"{rng.getrandbits(bits):0{width}x}"

    def xid() -> str:
        bus, pid, name = rng.choice(GPU_BUSES), rng.randint(1000, 4_000_000), rng.choice(PROCS)
        head = f"NVRM: Xid (PCI:0000:{bus}:00): "
        return rng.choice([
            f"{head}13, pid={pid}, name={name}, Graphics SM Warp Exception on (GPC {rng.randint(0, 7)}, "
            f"TPC {rng.randint(0, 8)}, SM {rng.randint(0, 1)}): Out Of Range Address",
            f"{head}13, pid={pid}, name={name}, Graphics Exception: ESR 0x{hx(20)}=0x{hx(32)}",
            f"{head}31, pid={pid}, name={name}, Ch 0000000{rng.randint(1, 9)}, intr 00000000. "
            f"MMU Fault: ENGINE GRAPHICS GPCCLIENT_T1_{rng.randint(0, 9)} faulted @ 0x7f{hx(32, 8)}_{hx(16, 4)}0000. "
            "Fault is of type FAULT_PDE ACCESS_TYPE_VIRT_READ",
            f"{head}43, pid={pid}, name={name}, Ch 000000{rng.randint(10, 99)}",
        ])

    def other() -> str:
        a, b, c = rng.randint(0, 255), rng.randint(0, 255), rng.randint(1, 65535)
        veth = f"veth{hx(28, 7)}"
        pid = rng.randint(1000, 4_000_000)
        return rng.choice([
            f"IPv4: martian source 10.1.{a}.{b} from 10.1.{b}.{a}, on dev eth0",
            f'audit: type=1400 audit({time.time():.3f}:{c}): apparmor="DENIED" operation="open" '
            f'profile="docker-default" name="/proc/{pid}/mounts" pid={pid} comm="python" requested_mask="r" '
            'denied_mask="r" fsuid=0 ouid=0',
            f"[UFW BLOCK] IN=eth0 OUT= MAC=0a:1b:2c:3d:4e:5f:0a:1b:2c:3d:4e:60:08:00 SRC=10.0.{a}.{b} DST=10.0.0.5 "
            f"LEN=60 TOS=0x00 PREC=0x00 TTL=64 ID={c} DF PROTO=TCP SPT={c} DPT=22 WINDOW=64240 RES=0x00 SYN URGP=0",
            f"docker0: port {rng.randint(1, 32)}({veth}) entered forwarding state",
            f"device {veth} entered promiscuous mode",
            f"eth0: renamed from {veth}",
            f"IPv6: ADDRCONF(NETDEV_CHANGE): {veth}: link becomes ready",
            "TCP: request_sock_TCP: Possible SYN flooding on port 8080. Sending cookies.  Check SNMP counters.",
            f"perf: interrupt took too long ({2500 + c % 900} > 2500), lowering kernel.perf_event_max_sample_rate "
            f"to {79000 - c % 5000}",
            f"EXT4-fs (nvme{a % 8}n1): mounted filesystem with ordered data mode. Quota mode: none.",
            f"nfs: server fsx-{a}.example.com OK",
            f"python[{pid}]: segfault at {c:x} ip 00007f{hx(32, 8)} sp 00007ff{hx(28, 7)} "
            f"error 4 in libcuda.so.1[7f{hx(24, 6)}+{hx(20)}]",
            f"NVRM: GPU at PCI:0000:{rng.choice(GPU_BUSES)}:00: GPU-fa4e0000-0000-4000-8000-00000000000{a % 8}",
            f"EFA: efa 0000:{rng.choice(GPU_BUSES)}:00.0: Setup irq:{c % 300} name:efa-mgmnt@pci:0000:{a:02x}:00.0",
            f"nvidia-peermem nv_get_p2p_free_callback:{c}: ERROR detected invalid context, skipping further processing",
        ])

    return [xid() if rng.random() < 0.3 else other() for _ in range(size)]


def check_noise(pool: List[str]) -> Dict[str, int]:
    """Every noise line must be noise to the agent: no rule may ask for an action."""
    from hpresilience.agent.kernel_rules import load_rules

    rules = load_rules(None)
    codes: Dict[str, int] = {}
    for text in pool:
        finding = rules.classify(syslog_line("n1", text))
        if finding is not None:
            if finding.action.value != "none":
                raise SystemExit(f"noise line maps to {finding.action.value}: {text}")
            codes[finding.code] = codes.get(finding.code, 0) + 1
    if rules.classify(syslog_line("n1", XID74)).action.value != "replace":
        raise SystemExit("the XID 74 line does not map to replace")
    return codes


# ----------------------------------------------------------------------- writer
def writer(path: str, node: str, rate: int, seconds: float, out: str, seed: int) -> None:
    """Runs in its own process (this file with --writer) so the pacing never waits on the monitor."""
    rng = random.Random(seed)
    pool = noise_pool(rng, 20_000)
    per_batch = int(rate * BATCH_SECONDS)
    batches = int(round(seconds / BATCH_SECONDS))
    xid_batch = batches // 2
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    timeline = []
    written_lines = written_bytes = 0
    xid_at = None
    start = time.time() + 0.2
    lateness = 0.0
    for k in range(batches):
        due = start + k * BATCH_SECONDS
        delay = due - time.time()
        if delay > 0:
            time.sleep(delay)
        else:
            lateness = max(lateness, -delay)
        now = time.time()
        prefix = syslog_line(node, "", now)[:-1]
        lines = [prefix + pool[rng.randrange(len(pool))] + "\n" for _ in range(per_batch)]
        if k == xid_batch:
            half = per_batch // 2
            first = "".join(lines[:half]).encode()
            os.write(fd, first)
            xid_line = (prefix + XID74 + "\n").encode()
            xid_at = time.time()
            os.write(fd, xid_line)
            rest = "".join(lines[half:]).encode()
            os.write(fd, rest)
            written_bytes += len(first) + len(xid_line) + len(rest)
            written_lines += per_batch + 1
        else:
            data = "".join(lines).encode()
            os.write(fd, data)
            written_bytes += len(data)
            written_lines += per_batch
        timeline.append((time.time(), written_lines, written_bytes))
    os.close(fd)
    with open(out, "w") as f:
        json.dump({"timeline": timeline, "xid_at": xid_at, "start": start, "lines": written_lines,
                   "bytes": written_bytes, "max_lateness": lateness}, f)


# ---------------------------------------------------------------------- monitor
def measure(cluster: BenchCluster, args: argparse.Namespace) -> Dict[str, Any]:
    node = cluster.nodes[0]
    pid = cluster.agent_pid(node)
    port = cluster.metrics_port(node)
    lag_key = f'hpr_agent_kernel_log_lag_bytes{{source="file:{cluster.kern_log(node)}"}}'
    time.sleep(args.warmup)
    follower = LogFollower(cluster.agent_log(node))
    base = scrape(port)
    lines_before = metric(base, "hpr_agent_kernel_log_lines_total")
    rss_before = rss_mb(pid)
    out = tempfile.NamedTemporaryFile(prefix="hpr-flood-", suffix=".json", delete=False).name
    proc = subprocess.Popen([sys.executable, __file__, "--writer", str(cluster.kern_log(node)), node, str(args.rate),
                             str(args.seconds), out, str(args.seed)])
    ticks0, t0 = cpu_ticks(pid), time.time()
    scrapes: List[Dict[str, float]] = []
    rss: List[float] = []
    observed: Optional[float] = None
    flood_end: Optional[float] = None
    caught_up: Optional[float] = None
    ticks_flood = 0
    tick = 0
    try:
        # Until the writer is done and the agent has read everything (bounded: 60 s after the flood).
        while True:
            time.sleep(0.05)
            tick += 1
            if observed is None and tick % 2 == 0 and is_replace_fail(cluster.node_line(node)):
                observed = time.time()
            if tick % 5:
                continue
            cluster.check_agents_alive()
            samples = scrape(port)
            now = time.time()
            scrapes.append({"t": now, "lag": samples.get(lag_key, 0.0),
                            "read": metric(samples, "hpr_agent_kernel_log_lines_total") - lines_before})
            rss.append(rss_mb(pid))
            if proc.poll() is not None:
                if flood_end is None:
                    flood_end, ticks_flood = now, cpu_ticks(pid)
                written = json.loads(Path(out).read_text())["lines"]
                if scrapes[-1]["read"] >= written and scrapes[-1]["lag"] == 0:
                    caught_up = now
                    break
                if now - flood_end > 60:
                    break
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"writer exited with {proc.returncode}")
    w = json.loads(Path(out).read_text())
    os.unlink(out)
    event = follower.wait_for(lambda e: e.get("event") == "slurm.set_state" and e.get("state") == "FAIL", timeout=5)
    if observed is None and is_replace_fail(cluster.node_line(node)):
        observed = time.time()
    time.sleep(5)  # let a flood's garbage be collected before the "after" RSS
    return {"writer": w, "scrapes": scrapes, "rss": rss, "rss_before": rss_before, "rss_after": rss_mb(pid),
            "t0": t0, "flood_end": flood_end, "cpu_ticks": ticks_flood - ticks0, "caught_up": caught_up,
            "observed": observed, "event": event, "findings": metric(scrape(port), "hpr_agent_findings_total")
            - metric(base, "hpr_agent_findings_total")}


def report(m: Dict[str, Any], args: argparse.Namespace, codes: Dict[str, int]) -> bool:
    w = m["writer"]
    duration = w["timeline"][-1][0] - w["start"]
    byte_rate = w["bytes"] / duration
    print(f"writer: {w['lines']} lines, {w['bytes'] / 1e6:.1f} MB in {duration:.1f}s "
          f"({w['lines'] / duration:.0f} lines/s, {byte_rate / 1e6:.2f} MB/s); batch lateness max "
          f"{w['max_lateness'] * 1000:.0f}ms")
    print(f"noise mix (pool of 20000, as the agent's rules classify it): {codes} + unmatched lines")
    detected_agent = iso_time(m["event"]["timestamp"]) - w["xid_at"] if m["event"] else None
    detected_obs = m["observed"] - w["xid_at"] if m["observed"] else None
    print("XID 74: " + (f"detected, slurm.set_state {detected_agent * 1000:.0f}ms after its write; "
                        f"scontrol (100 ms poll) saw FAIL after {detected_obs * 1000:.0f}ms"
                        if detected_agent is not None and detected_obs is not None else "NOT DETECTED"))
    timeline = [(t, lines) for t, lines, _ in w["timeline"]]
    lag_gauge = [s["lag"] / byte_rate for s in m["scrapes"]]
    lag_lines = [max(0.0, timeline_value(timeline, s["t"]) - s["read"]) / args.rate for s in m["scrapes"]]
    print(f"lag (gauge / {byte_rate / 1e6:.2f} MB/s): max {max(lag_gauge):.3f}s; "
          f"lag (lines written - lines read, / {args.rate}/s): max {max(lag_lines):.3f}s; "
          f"{len(m['scrapes'])} scrapes every 250 ms")
    caught = f"{m['caught_up'] - m['flood_end']:.2f}s" if m["caught_up"] else "NOT within 60 s"
    print(f"caught up (all {w['lines']} lines read, lag 0) {caught} after the writer finished; "
          f"findings counted during the flood: {m['findings']:.0f}")
    flood_seconds = m["flood_end"] - m["t0"]
    cpu = m["cpu_ticks"] / CLK_TCK / flood_seconds * 100
    print(f"agent CPU during the flood: {cpu:.1f}% of one core ({flood_seconds:.1f}s)")
    print(f"agent RSS: before {m['rss_before']:.1f} MB, peak {max(m['rss']):.1f} MB, "
          f"5 s after {m['rss_after']:.1f} MB")
    detected = detected_agent is not None
    lag_ok = max(max(lag_gauge), max(lag_lines)) <= LAG_GOAL_SECONDS
    memory_ok = max(m["rss"]) < RSS_GOAL_MB
    print(f"goals: detected {'MET' if detected else 'MISSED'}; lag <= {LAG_GOAL_SECONDS:g}s "
          f"{'MET' if lag_ok else 'MISSED'}; memory bounded (peak < {RSS_GOAL_MB:g} MB) "
          f"{'MET' if memory_ok else 'MISSED'}")
    return detected and lag_ok and memory_ok


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--writer":
        path, node, rate, seconds, out, seed = sys.argv[2:8]
        writer(path, node, int(rate), float(seconds), out, int(seed))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=int, default=10_000, help="noise lines per second")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=8.0, help="seconds after start before the flood")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    install_sigterm_handler()
    print_header(f"kernel-log flood: {args.rate} lines/s for {args.seconds:g}s, one XID 74 in the middle")
    codes = check_noise(noise_pool(random.Random(args.seed), 20_000))
    m = run_on_cluster("flood", 1, lambda cluster: measure(cluster, args))
    return 0 if report(m, args, codes) else 1


if __name__ == "__main__":
    sys.exit(main())
