"""The `moe-grok` command (`moe-grok --help`): the package's jobs from the command line."""
from moe_grok.cli.command import main, run_job

__all__ = ["main", "run_job"]
