"""The `moe-grok` command: `moe-grok COMMAND [flags]`, one subcommand per job of cli/jobs.py.

Each subcommand parses its own absl flags (a fresh `FlagValues` per call, so `main` can run many
times in one process); what it does not know goes to absl's global flags (`--verbosity`, ...).
"""
from __future__ import annotations

import ast
import sys
import textwrap

from absl import flags

from moe_grok import configs
from moe_grok.cli.jobs import JOBS, Job
from moe_grok.studies import launch

HELP_FLAGS = ("-h", "--help", "-help", "--helpfull", "-?")
_WIDTH = 100


class UsageError(Exception):
    """A command line that names no job, an unknown flag, a missing flag or argument."""


def overview(prog: str = "moe-grok") -> str:
    """`moe-grok --help`: every subcommand with a line each."""
    width = max(map(len, JOBS))
    lines = [f"usage: {prog} COMMAND [flags]        ({prog} COMMAND --help: its flags)", "",
             "moe_grok: find grokking inside Mixture-of-Experts models by watching their routing pathways.", "",
             "commands:"]
    lines += [f"  {job.name:<{width}}  {job.summary}" for job in JOBS.values()]
    lines += ["", "Every command also takes absl's logging flags, e.g. --verbosity=0 (INFO; by default warnings only).",
              f"Shipped configs (--config=NAME): {', '.join(configs.names())}."]
    return "\n".join(lines)


def _flag_lines(flag_values: flags.FlagValues) -> list[str]:
    lines = []
    for name in flag_values:
        flag = flag_values[name]
        if name.startswith("config."):  # overrides given on this command line
            continue
        shown = f"--[no]{name}" if flag.boolean else f"--{name}"
        text = flag.help + ("" if name == "config" or flag.default is None else f" (default: {flag.default_as_str})")
        lines.append(f"  {shown}:")
        lines += textwrap.wrap(text, _WIDTH, initial_indent="    ", subsequent_indent="    ")
    return lines


def job_help(job: Job, prog: str, flag_values: flags.FlagValues) -> str:
    """A subcommand's --help: usage, what it does, its flags."""
    positional = f" {job.positional}" if job.positional else ""
    lines = [f"usage: {prog} [flags]{positional}", "", job.description]
    flag_lines = _flag_lines(flag_values)
    if flag_lines:
        lines += ["", "flags:", *flag_lines]
    return "\n".join(lines)


def _with_config_paths(argv: list[str]) -> list[str]:
    """argv with `--config=NAME` (or `--config NAME`) of a shipped config replaced by its file's path."""
    resolved, value_follows = [], False
    for arg in argv:
        if value_follows:
            arg, value_follows = _config_path(arg), False
        elif arg.startswith(("--config=", "-config=")):
            flag, value = arg.split("=", 1)
            arg = f"{flag}={_config_path(value)}"
        elif arg in ("--config", "-config"):
            value_follows = True
        resolved.append(arg)
    return resolved


def _config_path(value: str) -> str:
    name, colon, argument = value.partition(":")  # ml_collections: path:argument for get_config(argument)
    try:
        return configs.path(name) + colon + argument
    except ValueError as error:
        raise UsageError(str(error)) from None


def _unquoted(error: Exception) -> str:
    """ml_collections' missing-key message, without the quoting that KeyError's str() adds (twice, at times)."""
    text = str(error.args[0]) if error.args else str(error)
    while len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        try:
            text = ast.literal_eval(text)
        except (SyntaxError, ValueError):
            break
    return " ".join(text.split())


def run_job(name: str, argv: list[str], prog: str) -> None:
    """Runs job `name` with the command line `argv` (flags and arguments after the job's name); `prog` is
    how the command line starts in messages and records (e.g. "moe-grok toy").
    SystemExit(0) after --help; SystemExit(2) on a usage error (message on stderr)."""
    job = JOBS[name]
    try:
        resolved = _with_config_paths(argv)
        flag_values = flags.FlagValues()
        try:  # ml_collections reads the --config.<key> overrides while it defines or parses --config
            job.define_flags(flag_values, [prog, *resolved])
            if any(arg in HELP_FLAGS for arg in argv):
                print(job_help(job, prog, flag_values))
                raise SystemExit(0)
            unparsed = flag_values([prog, *resolved], known_only=True)
        except (AttributeError, KeyError) as error:
            if not any(arg.startswith(("--config.", "-config.")) for arg in argv):
                raise  # the config file's own error
            raise UsageError(f"a --config.<key> override names no key of the config: {_unquoted(error)}") from None
        args = flags.FLAGS(unparsed)[1:]  # absl's own flags (--verbosity, ...); unknown flags are refused here
        if len(args) != (1 if job.positional else 0):
            raise UsageError(f"expected {job.positional or 'no arguments'}, got {args}")
    except (UsageError, flags.Error) as error:
        print(f"{prog}: {error}\n(see {prog} --help)", file=sys.stderr)
        raise SystemExit(2) from None
    launch.quiet_logs()
    job.run(flag_values, args, " ".join([prog, *argv]))


def main(argv: list[str] | None = None, prog: str = "moe-grok") -> None:
    """The `moe-grok` console command. `argv`: the command line after the program name (default sys.argv[1:]).
    SystemExit(0) after a help, SystemExit(2) on a usage error."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in HELP_FLAGS or argv[0] == "help":
        print(overview(prog), file=sys.stdout if argv else sys.stderr)
        raise SystemExit(0 if argv else 2)
    if argv[0] not in JOBS:
        print(f"{prog}: no command {argv[0]!r}; the commands: {', '.join(JOBS)} ({prog} --help)", file=sys.stderr)
        raise SystemExit(2)
    run_job(argv[0], argv[1:], f"{prog} {argv[0]}")
