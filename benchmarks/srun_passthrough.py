"""Pass-through overhead of the srun shim (scripts/srun) without --auto-resume.

On a 2-node test cluster, inside one allocation (`salloc`-like: an sbatch job that
runs this measurement's srun calls would add noise, so the calls are made from here
with SLURM_JOB_ID of a held allocation): `srun -N1 true` through the shim and through
Slurm's srun directly, interleaved (ABAB...) so machine noise hits both alike.
Reports median and mean wall time of each and their ratio.

    /work/main/.venv/bin/python benchmarks/srun_passthrough.py [--calls 200]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

from _bench import REPO, BenchCluster, install_sigterm_handler, print_header, run_on_cluster


def measure(cluster: BenchCluster, calls: int) -> dict:
    env = dict(cluster.env, PATH=f"{REPO / 'scripts'}:{os.environ['PATH']}")
    real = shutil.which("srun", path=os.environ["PATH"])
    job = int(subprocess.run(["sbatch", "--parsable", "-N1", "--exclusive", "--wrap", "sleep 3600"],
                             capture_output=True, text=True, env=env, check=True).stdout.strip())
    try:
        deadline = time.monotonic() + 30
        while "JobState=RUNNING" not in cluster.scontrol("-o", "show", "job", str(job)):
            if time.monotonic() > deadline:
                raise RuntimeError("the allocation did not start")
            time.sleep(0.2)
        env.update(SLURM_JOB_ID=str(job))
        commands = {"shim": [str(REPO / "scripts" / "srun"), "-N1", "--overlap", "true"],
                    "direct": [real, "-N1", "--overlap", "true"]}
        times = {k: [] for k in commands}
        for argv in commands.values():  # warm-up
            subprocess.run(argv, env=env, check=True, capture_output=True)
        for _ in range(calls):
            for name, argv in commands.items():
                started = time.perf_counter()
                subprocess.run(argv, env=env, check=True, capture_output=True)
                times[name].append(time.perf_counter() - started)
        out = {k: {"median_ms": statistics.median(v) * 1000, "mean_ms": statistics.fmean(v) * 1000}
               for k, v in times.items()}
        out["ratio_median"] = out["shim"]["median_ms"] / out["direct"]["median_ms"]
        out["ratio_mean"] = out["shim"]["mean_ms"] / out["direct"]["mean_ms"]
        return out
    finally:
        subprocess.run(["scancel", str(job)], env=env)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    install_sigterm_handler()
    print_header(f"srun shim pass-through, {args.calls} calls each, interleaved")
    r = run_on_cluster("srun", 2, lambda c: measure(c, args.calls), up_args=())
    for k in ("shim", "direct"):
        print(f"{k:6}: median {r[k]['median_ms']:.1f} ms, mean {r[k]['mean_ms']:.1f} ms")
    print(f"shim / direct: median {r['ratio_median']:.3f}, mean {r['ratio_mean']:.3f}")
    print(json.dumps(r))
    ok = r["ratio_median"] <= 1.05
    print(f"goal pass-through within 5% (median): {'MET' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
