"""Runs an NvmlMonitor in its own process, driven line by line over stdin.

The fake NVML library is found through LD_LIBRARY_PATH, which the dynamic
loader reads only at process start, hence a separate process per test.

    python monitor_driver.py '{"startup_grace_seconds": 0}' [--manual-clock]

With --manual-clock the monitor's clock (snapshot times, the grace period) stands
still until `advance` moves it, so windows are tested without sleeping.

stdin commands, one per line, each answered by one JSON line on stdout:
  check     -> {"findings": [Finding.to_dict(), ...], "seconds": s}
               or {"error": "MonitorError", "message": ..., "seconds": s}
  advance S -> {"now": t}: the manual clock moves S seconds on
  status    -> {"disabled_reason": ...}
  close     -> {"closed": true}
"""
from __future__ import annotations

import json
import sys
import time

from hpresilience import log
from hpresilience.agent.monitor import MonitorError
from hpresilience.agent.monitors.nvml import NvmlConfig, NvmlMonitor


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def main() -> None:
    log.configure()  # JSON on stderr: stdout carries only the replies
    config = NvmlConfig(**json.loads(sys.argv[1] if len(sys.argv) > 1 else "{}"))
    manual = ManualClock() if "--manual-clock" in sys.argv[2:] else None
    monitor = NvmlMonitor(config, manual) if manual else NvmlMonitor(config)
    for line in sys.stdin:
        command, _, argument = line.strip().partition(" ")
        started = time.monotonic()
        if command == "advance" and manual:
            manual.now += float(argument)
            reply = {"now": manual.now}
        elif command == "check":
            try:
                reply = {"findings": [f.to_dict() for f in monitor.check()]}
            except MonitorError as e:
                reply = {"error": type(e).__name__, "message": str(e)}
            reply["seconds"] = time.monotonic() - started
        elif command == "status":
            reply = {"disabled_reason": monitor.disabled_reason}
        elif command == "close":
            monitor.close()
            reply = {"closed": True}
        else:
            reply = {"error": "unknown command", "message": command}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
