"""The command-line commands; each orchestrates the stages and owns nothing else."""
