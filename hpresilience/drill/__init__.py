"""`hpresilience drill`: injects faults into a live cluster under a canary training job and
measures what is recovered, how fast, and that nothing was lost (issue 13)."""
