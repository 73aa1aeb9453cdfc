"""The node agent: monitors → findings → policy → one Slurm node decision."""
