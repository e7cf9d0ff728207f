"""The jobs of the `moe-grok` command (and of the experiments/ launchers, which run them too): each
declares its absl flags and runs one studies / library function. Heavy modules (jax, the model) are
imported inside `run`, so `--help` answers at once."""
from __future__ import annotations

import dataclasses
import os
import sys
import traceback
from collections.abc import Callable

from absl import flags
from ml_collections import config_flags

from moe_grok import configs


@dataclasses.dataclass(frozen=True)
class Job:
    """One subcommand. `define_flags(flag_values, argv)` declares its flags (`argv`, the command line
    after the subcommand, serves ml_collections' config overrides); `run(flag_values, args, command)`
    runs it with the positional arguments `args` and the command line as typed (`command`)."""

    name: str
    summary: str  # one line for `moe-grok --help`
    description: str  # the subcommand's --help: what it does, examples
    define_flags: Callable[[flags.FlagValues, list[str]], None]
    run: Callable[[flags.FlagValues, list[str], str], None]
    positional: str = ""  # the positional arguments' usage ("" = none accepted)


def define_config_flag(flag_values: flags.FlagValues, argv: list[str], default: str, help_text: str) -> None:
    """--config: a shipped config's name or a config file's path; --config.<key>=<value> overrides a key."""
    config_flags.DEFINE_config_file(
        "config", configs.path(default),
        f"{help_text}: a shipped config's name ({', '.join(configs.names())}) or a config file's path; "
        f"default {default}. --config.<key>=<value> sets any key (moe-grok print-config NAME lists them).",
        flag_values=flag_values, sys_argv=argv)


def _config(flag_values: flags.FlagValues):
    return flag_values["config"].value


# toy ---------------------------------------------------------------------------------------------------------------

def _toy_flags(flag_values, argv):
    define_config_flag(flag_values, argv, "toy_grokking", "Run config")
    flags.DEFINE_string("workdir", "runs/toy", "Run directory (checkpoints, metrics, report).", flag_values=flag_values)
    flags.DEFINE_bool("skip_training", False, "Only analyse the checkpoints already in workdir.",
                      flag_values=flag_values)


def _toy_run(flag_values, args, command):
    from moe_grok.report.files import format_table
    from moe_grok.studies import toy_run
    from moe_grok.training import loop

    config, workdir = _config(flag_values), flag_values.workdir
    if not flag_values.skip_training:
        last = loop.train(config, workdir, callbacks=toy_run.training_callbacks(config))
        print(f"trained to step {last['step']}: train acc {last['train_accuracy']:.3f}, "
              f"test acc {last['test_accuracy']:.3f}")
    from moe_grok.checkpoints import run_artifact

    artifacts = os.path.join(workdir, toy_run.ARTIFACTS_DIR)
    report = toy_run.analyze_run(config, workdir, artifact=toy_run.artifact_path(artifacts, config.train.seed))
    run_artifact.write_manifest(artifacts, {"kind": "run"})
    print(format_table(report))
    print(f"report: {os.path.join(workdir, 'analysis', 'report')}; artifact (moe-grok rederive): {artifacts}")


TOY = Job("toy", "train the toy MoE on modular arithmetic, then analyse its checkpoints (CPU, minutes)", """\
Toy grokking reproduction: train a small MoE on modular arithmetic, then analyse its checkpoints.

  moe-grok toy --workdir=runs/toy                         # default config (toy_grokking)
  moe-grok toy --workdir=runs/mix --config=toy_mixture    # 4 domains
  moe-grok toy --workdir=runs/toy --config.train.steps=6000

Re-running with the same workdir resumes training from its latest state and reuses the cached
analysis of finished checkpoints.""", _toy_flags, _toy_run)


# protocol ----------------------------------------------------------------------------------------------------------

def _protocol_flags(flag_values, argv):
    define_config_flag(flag_values, argv, "toy_protocol", "Protocol config")
    flags.DEFINE_string("workdir", "runs/protocol", "Directory of every arm's runs and the results.",
                        flag_values=flag_values)
    flags.DEFINE_bool("summarize_only", False, "Aggregate a finished run's per-seed reports again (results.json, "
                      "page, figures; the config's `registered` block replaces the run's): no training or "
                      "analysis.", flag_values=flag_values)


def _protocol_run(flag_values, args, command):
    from moe_grok.studies import protocol, protocol_pages

    config = _config(flag_values)
    if flag_values.summarize_only:
        registered = config.registered.to_dict() if "registered" in config else None
        results = protocol.resummarize(flag_values.workdir, registered, config.docs_dir)
    else:
        results = protocol.run(config, flag_values.workdir, command=command)
    print(protocol_pages.markdown(results, protocol.QUANTITIES))


PROTOCOL = Job("protocol", "the toy protocol (docs/protocol.md): every arm and seed, analysis, results page", """\
The toy protocol of docs/protocol.md: every arm, every seed (trained together), analysis, tables.

  moe-grok protocol --workdir=runs/protocol
  moe-grok protocol --config=toy_protocol_round2 --workdir=runs/protocol_round2

Writes results.json, <name>_results.md and figures to the workdir, and the page and figures to
config.docs_dir (default docs/results, relative to the current directory; --config.docs_dir= for
the workdir only). Re-running resumes: finished training and cached analyses are reused.
--summarize_only aggregates a finished run's per-seed reports again with the current code.""",
               _protocol_flags, _protocol_run)


# olmoe -------------------------------------------------------------------------------------------------------------

def _olmoe_flags(flag_values, argv):
    define_config_flag(flag_values, argv, "olmoe_grokking", "Run config")


def start_distributed(cluster) -> None:
    """`jax.distributed.initialize` from the config's `cluster` keys (docs/multihost.md); an unset key
    (empty, -1) is left to JAX: JAX_COORDINATOR_ADDRESS, or SLURM / a TPU pod / Open MPI detected.
    Must run before any other JAX call. When a process dies, JAX's coordination service ends every
    other one (exit by SIGABRT, its log naming the silent task or the lost coordinator) within
    `heartbeat_timeout_s`, rather than leaving them blocked in a collective."""
    import jax

    jax.distributed.initialize(coordinator_address=cluster.coordinator_address or None,
                               num_processes=None if cluster.num_processes < 0 else cluster.num_processes,
                               process_id=None if cluster.process_id < 0 else cluster.process_id,
                               initialization_timeout=cluster.initialization_timeout_s,
                               heartbeat_timeout_seconds=cluster.heartbeat_timeout_s)


def _exit_without_peers() -> None:
    """End this process of a multi-process run at once (exit status 1) after printing the error it raises.
    A plain exit would wait at jax.distributed's shutdown barrier, sending heartbeats, for up to 5 minutes
    while the other processes wait in a collective for this one; without its heartbeats they stop within
    cluster.heartbeat_timeout_s, their logs naming this process as the one that stopped."""
    import jax

    error = sys.exc_info()[1]
    lost_peer = isinstance(error, jax.errors.JaxRuntimeError) and any(
        sign in str(error) for sign in ("Gloo", "Connection closed by peer", "Connection reset by peer"))
    cause = (" because another process of the run died or failed (a collective lost its peer: see that process's log)"
             if lost_peer else "")
    print(f"{traceback.format_exc()}process {jax.process_index()} of {jax.process_count()} failed{cause}; it exits "
          "now, and the other processes stop when its heartbeats do", file=sys.stderr, flush=True)
    os._exit(1)


def _olmoe_run(flag_values, args, command):
    config = _config(flag_values)
    import jax

    if config.distributed:  # before any other JAX call
        start_distributed(config.cluster)
    from moe_grok.report.files import format_table
    from moe_grok.studies import olmoe_run

    try:
        report = olmoe_run.run(config)
    except BaseException:
        if jax.process_count() > 1:
            _exit_without_peers()
        raise
    if jax.process_index() == 0:
        print(format_table(report))
        print(f"report: {os.path.join(config.out_dir, 'report')}")


OLMOE = Job("olmoe", "the paper's analysis of OLMoE (or Qwen3-MoE) checkpoints over training data groups", """\
OLMoE checkpoint analysis: per-sample loss and pathways of grouped training data across
checkpoints, memorization per group, pathway metrics, optional correlation with test accuracy.

  moe-grok olmoe \\
      --config.checkpoints=allenai/OLMoE-1B-7B-0924@step5000-tokens20B,\\
allenai/OLMoE-1B-7B-0924@step245000-tokens1027B \\
      --config.data.paths=data/owm.jsonl,data/starcoder.jsonl --config.data.tokenizer=tokenizer.json \\
      --config.out_dir=runs/olmoe

An interrupted run resumes: finished checkpoints are read from out_dir/cache.""", _olmoe_flags, _olmoe_run)


# convert -----------------------------------------------------------------------------------------------------------

def _convert_flags(flag_values, argv):
    flags.DEFINE_string("hf_path", None, "Local HF checkpoint directory, hub repo id or repo@revision.",
                        required=True, flag_values=flag_values)
    flags.DEFINE_string("revision", None, "Hub revision, e.g. step245000-tokens1027B.", flag_values=flag_values)
    flags.DEFINE_string("out", None, "Output directory of the moe_grok checkpoint.", required=True,
                        flag_values=flag_values)
    flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "Parameter dtype.", flag_values=flag_values)
    flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out whole (its files are deleted); without it only "
                      "a new, empty or earlier convert of the same source is written.", flag_values=flag_values)


def _convert_run(flag_values, args, command):
    from moe_grok.model.checkpoint_io import convert_hf_checkpoint

    model_config, count = convert_hf_checkpoint(flag_values.hf_path, flag_values.out, dtype=flag_values.dtype,
                                                revision=flag_values.revision, overwrite=flag_values.overwrite)
    print(f"wrote {flag_values.out}: {model_config.family} model, {count / 1e6:.1f}M parameters in "
          f"{flag_values.dtype}")


CONVERT = Job("convert", "an HF checkpoint of a supported family (OLMoE, Qwen3-MoE) to a moe_grok checkpoint", """\
Convert an HF checkpoint of a supported model family (OLMoE, Qwen3-MoE; local directory or hub
revision) into a moe_grok checkpoint.

  moe-grok convert --hf_path=allenai/OLMoE-1B-7B-0924 \\
      --revision=step245000-tokens1027B --out=ckpts/olmoe-step245000 --dtype=bfloat16

--out must be new, empty or an earlier convert of the same source (re-run: replaced), unless
--overwrite; it is written aside and swapped in whole, and a second convert into the same --out
is refused while the first runs. The output directory is a checkpoint spec for `moe-grok olmoe`
(name it step<N>... or append =<step>).""", _convert_flags, _convert_run)


# theory ------------------------------------------------------------------------------------------------------------

def _theory_flags(flag_values, argv):
    define_config_flag(flag_values, argv, "verify_theory", "Run config")


def _theory_run(flag_values, args, command):
    from moe_grok.studies import synthetic_theory, toy_bounds
    from moe_grok.theory.synthetic_run import SyntheticConfig

    config = _config(flag_values)
    if config.toy.workdir:
        print(toy_bounds.run(config.toy.workdir, config.out, config.toy.samples,
                             SyntheticConfig.from_config(config.synthetic)))
        return
    print(synthetic_theory.run_sweep(config))


THEORY = Job("theory", "the routing-kernel theory: d_eff vs pathway distance (synthetic), or the bound along a toy run",
             """\
Synthetic check of the routing-kernel theory: pathway edit distance vs d_eff and the
generalization bound vs measured test error, over router seeds and cluster structures.

  moe-grok theory --config.out=runs/theory

Writes results.csv, results.json and theory.png under config.out. A grid of router scales x top-k
gates x kernels (--config.sweep.router_scales, .top_ks, .kernels: "analytic", "empirical") writes
instead, per (scale, top-k, kernel) cell, cells.csv and theory_grid.png and prints the registered
reading (docs/protocol.md); each (scale, top-k) is kept under config.out/cells/, so a stopped
sweep resumes.

  moe-grok theory --config.toy.workdir=runs/toy --config.out=runs/theory_toy

instead follows a finished toy grokking run: at every checkpoint, the multi-layer routing Gram
of a fixed sample of training examples, its d_eff and the bound, next to the test error.""",
             _theory_flags, _theory_run)


# rederive ----------------------------------------------------------------------------------------------------------

def _rederive_flags(flag_values, argv):
    flags.DEFINE_string("from_dir", None, "A run's artifacts directory (<workdir>/artifacts of `toy` or `protocol`).",
                        required=True, flag_values=flag_values)
    flags.DEFINE_string("workdir", None, "Where the re-derived reports (and a protocol's results) go.",
                        required=True, flag_values=flag_values)
    flags.DEFINE_string("docs_dir", "", "A protocol's page and figures also here (as `protocol` with docs_dir).",
                        flag_values=flag_values)
    flags.DEFINE_multi_string("analysis", [], "KEY=VALUE: an analysis option (AnalysisOptions field) changed for "
                              "every seed; VALUE as JSON, else a string (repeatable).", flag_values=flag_values)
    flags.DEFINE_list("arms", None, "A protocol run's arms to derive (comma-separated; default every arm).",
                      flag_values=flag_values)


def parse_option_overrides(items: list[str]) -> dict:
    """{"memorized_set": "fixed", "tau": 0.6} from ["memorized_set=fixed", "tau=0.6"] (values as JSON, else text)."""
    import json

    overrides = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--analysis takes KEY=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(text)
        except json.JSONDecodeError:
            overrides[key] = text
    return overrides


def _rederive_run(flag_values, args, command):
    from moe_grok import pipeline
    from moe_grok.checkpoints import run_artifact
    from moe_grok.studies import protocol, protocol_pages

    source, workdir = flag_values.from_dir, flag_values.workdir
    overrides = parse_option_overrides(flag_values.analysis)
    record = run_artifact.verify_manifest(source)["record"] or {}
    if record.get("kind") == "protocol":
        results = protocol.rederive(source, workdir, overrides, flag_values.docs_dir, arms=flag_values.arms)
        print(protocol_pages.markdown(results, protocol.QUANTITIES))
        return
    if flag_values.arms is not None:
        raise ValueError(f"--arms selects a protocol run's arms; {source} holds a toy run's artifacts")
    for name in run_artifact.artifact_files(source):
        out_dir = os.path.join(workdir, name.removesuffix(".npz"), "analysis")
        pipeline.rederive(os.path.join(source, name), out_dir, overrides)
        print(f"report: {os.path.join(out_dir, 'report')}")


REDERIVE = Job("rederive", "every table and verdict page again from a run's artifacts (no training)", """\
Every report, table and verdict page of a finished `toy` or `protocol` run, derived again from its
compact artifacts (<workdir>/artifacts: what the analysis read, one file per seed) without training
or reading a checkpoint. Unchanged, the output equals the run's own byte for byte; --analysis
changes an analysis option for every seed.

  moe-grok rederive --from_dir=runs/protocol/artifacts --workdir=runs/protocol_again
  moe-grok rederive --from_dir=runs/protocol/artifacts --workdir=runs/fixed --analysis=memorized_set=fixed
  moe-grok rederive --from_dir=runs/protocol/artifacts --workdir=runs/two_arms --arms=grokking,random_labels
  moe-grok rederive --from_dir=runs/toy/artifacts --workdir=runs/toy_again""", _rederive_flags, _rederive_run)


# report ------------------------------------------------------------------------------------------------------------

def _report_flags(flag_values, argv):
    flags.DEFINE_string("history_dir", None, "The monitor's history directory (what a PathwayMonitor stored).",
                        required=True, flag_values=flag_values)
    flags.DEFINE_string("out_dir", None, "Where the report goes (table.txt, CSVs, summary.json, plots).",
                        required=True, flag_values=flag_values)
    flags.DEFINE_bool("plots", True, "Draw the report's figures (--noplots: tables and CSVs only).",
                      flag_values=flag_values)


def _report_run(flag_values, args, command):
    from moe_grok import pipeline
    from moe_grok.monitor import report_from_history
    from moe_grok.report.files import format_table

    report = report_from_history(flag_values.history_dir, flag_values.out_dir, with_plots=flag_values.plots)
    print(format_table(report))
    print(f"report: {os.path.join(flag_values.out_dir, pipeline.REPORT_DIR)}")


REPORT = Job("report", "the full post-hoc report from a training monitor's stored history", """\
The post-hoc report (the same as the analysis of the same checkpoints) from the history a
moe_grok.monitor PathwayMonitor stored while a model trained.

  moe-grok report --history_dir=runs/mine/monitor --out_dir=runs/mine/report""", _report_flags, _report_run)


# print-config ------------------------------------------------------------------------------------------------------

def _print_config_flags(flag_values, argv):
    del flag_values, argv


def _print_config_run(flag_values, args, command):
    from moe_grok.cli import config_keys

    if len(args) != 1:
        raise ValueError(f"print-config takes one config name or path, got {len(args)}: {args}")
    file = configs.path(args[0])
    print(f"# {args[0]} ({file}); set any key with --config.<key>=<value>")
    print(config_keys.format_keys(config_keys.config_keys(file)))


PRINT_CONFIG = Job("print-config", "every key of a config with its default and help", f"""\
Every key of a config with its default value and its help (the comment declaring it).

  moe-grok print-config toy_grokking
  moe-grok print-config path/to/my_config.py

Shipped configs: {', '.join(configs.names())}.""", _print_config_flags, _print_config_run, positional="NAME")


JOBS = {job.name: job for job in (TOY, PROTOCOL, REDERIVE, OLMOE, CONVERT, THEORY, REPORT, PRINT_CONFIG)}
