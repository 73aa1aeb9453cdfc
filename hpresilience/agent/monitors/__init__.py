"""Monitors: one module each (kernel log, NVML, system)."""
