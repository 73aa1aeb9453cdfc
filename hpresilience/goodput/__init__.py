"""`hpresilience goodput`: what goodput a training run gets under failures, which checkpoint
interval maximises it, and how many spare nodes keep it at full size (issue 13; docs/goodput.md)."""
