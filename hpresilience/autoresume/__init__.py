"""`srun --auto-resume`: re-run a job step on healthy nodes when a node of it fails."""
