"""Runs an NvmlMonitor in its own process, driven line by line over stdin.

The fake NVML library is found through LD_LIBRARY_PATH, which the dynamic
loader reads only at process start, hence a separate process per test.

    python monitor_driver.py '{"startup_grace_seconds": 0}'

stdin commands, one per line, each answered by one JSON line on stdout:
  check  -> {"findings": [Finding.to_dict(), ...], "seconds": s}
            or {"error": "MonitorError", "message": ..., "seconds": s}
  status -> {"disabled_reason": ...}
  close  -> {"closed": true}
"""
from __future__ import annotations

import json
import sys
import time

from hpresilience import log
from hpresilience.agent.monitor import MonitorError
from hpresilience.agent.monitors.nvml import NvmlConfig, NvmlMonitor


def main() -> None:
    log.configure()  # JSON on stderr: stdout carries only the replies
    monitor = NvmlMonitor(NvmlConfig(**json.loads(sys.argv[1] if len(sys.argv) > 1 else "{}")))
    for line in sys.stdin:
        command = line.strip()
        started = time.monotonic()
        if command == "check":
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
