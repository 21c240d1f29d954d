"""The command line: absl flags -> options, penalties and a registered task -> train."""

from __future__ import annotations

import dataclasses
import re
import sys
import typing
from collections.abc import Sequence

import tensorflow as tf
from absl import app, flags, logging

from trainer.cli import registry
from trainer.cli.sweep import MAX_TRIALS, check_grid, parse_sweep, run_sweep
from trainer.distribution import PeerTimeout
from trainer.errors import ConfigError
from trainer.options import CHOICES, TrainerOptions, option_help, option_sections
from trainer.run import files
from trainer.run.callbacks import Callback
from trainer.run.controller import Preempted, TrainResult
from trainer.run.progress import format_losses
from trainer.run.signals import (
    INTERRUPTED_EXIT_STATUS,
    raise_dropped_interrupt,
    remembered_interrupts,
)
from trainer.run.summaries import write_text
from trainer.step.trainer import Trainer

_TASK = flags.DEFINE_string("task", "synthetic", "Registered task to run.")
_PENALTY = flags.DEFINE_multi_string(
    "penalty",
    [],
    "Penalty spec in Python-call syntax with literal arguments, e.g. "
    "\"selective_l2(1e-4, exclude='bias')\"; repeat the flag for several.",
)
_PARAM_GROUP = flags.DEFINE_multi_string(
    "param_group",
    [],
    "Parameter group spec, e.g. \"lr_multiplier(0.1, include='dense/')\" (that group trains "
    "at 0.1 times the learning rate) or \"freeze(include='embedding')\"; repeat the flag "
    "for several.",
)
_IMPORT = flags.DEFINE_multi_string(
    "import",
    [],
    "Python module to import before running (registers user tasks and penalties); repeat the "
    "flag for several.",
)
_DESCRIBE = flags.DEFINE_bool(
    "describe", False, "Print which variables each penalty covers (and which none), then exit."
)
_SWEEP = flags.DEFINE_multi_string(
    "sweep",
    [],
    "Train one run per value of a penalty strength or the learning rate, e.g. "
    "'selective_l2.scale=1e-5,1e-4,1e-3' or 'learning_rate=1e-3,1e-2'; repeat the flag for a "
    f"grid (every combination; at most {MAX_TRIALS} runs with the seeds).",
)
_SWEEP_SEEDS = flags.DEFINE_integer(
    "sweep_seeds",
    None,
    "Repeat each --sweep point over this many seeds (seed, seed+1, ...: new initial weights and "
    "data order each); the table gives mean ± sd per point.",
)


def _define_option_flags() -> dict[str, flags.FlagHolder]:
    """One flag per `TrainerOptions` field, of the same name, with the field's doc as help.

    Every flag defaults to None: a flag not given keeps the task's `default_options` (and
    then the field's default).
    """
    docs, types = option_help(), typing.get_type_hints(TrainerOptions)
    holders = {}
    for field in dataclasses.fields(TrainerOptions):
        name, kind = field.name, types[field.name]
        text = f"{docs[field.name]} (default: the task's, else {field.default!r})"
        if name in CHOICES:
            choices = [c for c in CHOICES[name] if c is not None]
            holders[name] = flags.DEFINE_enum(name, None, choices, text)
        elif kind in (bool, bool | None):
            holders[name] = flags.DEFINE_bool(name, None, text)
        elif kind is int:
            holders[name] = flags.DEFINE_integer(name, None, text)
        elif kind is float:
            holders[name] = flags.DEFINE_float(name, None, text)
        elif kind in (str, str | None):
            holders[name] = flags.DEFINE_string(name, None, text)
        else:
            raise TypeError(f"TrainerOptions.{name}: no flag type for {kind}.")
    return holders


_OPTION_FLAGS = _define_option_flags()


class _Stage(Callback):
    """Where the command is, for the line a Ctrl-C outside the training loop ends it with
    (inside the loop the controller saves and stops: `Preempted`).

    A callback of the trainer: a run's `on_train_begin` comes inside the loop's signal
    handling, so a Ctrl-C that reaches the command after it came after the last step.
    """

    def __init__(self):
        self.where = "while parsing flags"
        self.trainer: Trainer | None = None
        self.finishing = False  # after a run's last step, before its `on_train_end`
        self.runs_done = 0

    def on_train_begin(self, result: TrainResult) -> None:
        self.finishing = True

    def on_train_end(self, result: TrainResult) -> None:
        self.finishing = False
        self.runs_done += 1

    def interrupted(self) -> str:
        """Where the Ctrl-C came and what it left, for `trainer: Interrupted (SIGINT) ...`."""
        if self.where == "after training":
            return "after training; the run is complete."
        if self.where != "training":
            return f"{self.where}; nothing was trained."
        opts = self.trainer.options  # in a sweep, the run's own directories
        if self.finishing:
            if opts.model_dir:
                left = f"step {self.trainer.step} is saved in {opts.model_dir}: rerun to export"
            else:
                left = "nothing was saved (no model_dir)"
            if opts.export_dir:
                # A local export is written aside, then renamed (`run.export`); a URL in place.
                url = "://" in opts.export_dir
                kept = "may hold a partial export" if url else "keeps its previous export, if any"
                left += f"; `export_dir` ({opts.export_dir}) {kept}"
            return f"after the last step, while exporting and writing results; {left}."
        if not self.runs_done:
            return "before the first step; nothing was trained."
        left = "rerun to resume" if opts.model_dir else "nothing was saved (no model_dir)"
        return f"between runs of --sweep, {self.runs_done} done; {left}."


_STAGE = _Stage()


def _fail(message: str) -> None:
    print(f"trainer: error: {message}", file=sys.stderr)
    sys.exit(2)


_USAGE = """\
usage: python -m trainer [--task=NAME] [--penalty=SPEC ...] [--OPTION=VALUE ...]
   or: tapeloop [the same flags]

Trains a registered task in a custom TensorFlow loop, then prints its losses and evaluation.
Every option below is a flag; one not given keeps the task's default. Bad input ends with one
line, `trainer: error: ...`, and exit status 2.

examples:
  python -m trainer --task=synthetic --penalty="selective_l2(1e-2, exclude='bias')" \\
      --penalty="decoupled_weight_decay(1e-3)" --train_steps=2000 --model_dir=runs/synthetic
  python -m trainer --import=my_penalties --penalty="elastic_net(exclude='bias')" \\
      --sweep="elastic_net.l2=0,1e-3" --train_steps=500
"""
# Arguments that ask for help (absl's `--help` would print only the key flags of `__main__`,
# and exit 1).
_HELP_ARGS = frozenset({"-h", "-?", "-help", "--help", "-helpshort", "--helpshort"})


def _flag_help(name: str) -> str:
    """One flag's entry: `--name: help`, wrapped to the terminal and indented."""
    flag = flags.FLAGS[name]
    # absl appends "; repeat this option ..." to a multi-string flag's help: ours says so.
    help_text = re.sub(r";\s*repeat this option to specify a list of values$", "", flag.help)
    text = f"--{'[no]' if flag.boolean else ''}{name}: {help_text}"
    if flag.default not in (None, False, []):  # an option flag's help names its default
        text += f" (default: {flag.default!r})"
    return flags.text_wrap(text, indent="      ", firstline_indent="  ")


def usage() -> str:
    """The text of `--help`: a usage line, examples, then tapeloop's own flags by section.

    absl's and TensorFlow's flags are left to `--helpfull`.
    """
    command = [
        h.name for h in (_TASK, _PENALTY, _PARAM_GROUP, _IMPORT, _DESCRIBE, _SWEEP, _SWEEP_SEEDS)
    ]
    sections = {"command": command, **option_sections()}
    parts = [_USAGE]
    for section, names in sections.items():
        parts.append(f"{section}:\n" + "\n".join(_flag_help(name) for name in names) + "\n")
    parts.append(
        "  --flagfile=FILE reads flags from FILE, one per line; --helpfull lists every flag,\n"
        "  absl's and TensorFlow's included.\n"
    )
    return "\n".join(parts)


def _parse_flags(argv: list[str]) -> list[str]:
    arguments = argv[1 : argv.index("--")] if "--" in argv else argv[1:]
    if _HELP_ARGS.intersection(arguments):
        print(usage(), end="")
        sys.exit(0)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _fail(str(e).splitlines()[0])


def build_trainer() -> Trainer:
    """Builds the task's Trainer from the parsed flags.

    Raises:
      ConfigError: an unknown task or penalty, a bad spec or option.
    """
    _STAGE.where = "while importing plugins"
    registry.load_plugins(registry.TASK_ENTRY_POINTS)
    registry.load_plugins(registry.PENALTY_ENTRY_POINTS)
    registry.import_modules(_IMPORT.value)
    _STAGE.where = "while building the trainer"
    task = registry.get_task(_TASK.value)
    penalties = [registry.parse_penalty_spec(spec) for spec in _PENALTY.value]
    overrides = {name: flag.value for name, flag in _OPTION_FLAGS.items() if flag.value is not None}
    groups = [registry.parse_param_group_spec(spec) for spec in _PARAM_GROUP.value]
    extra = {"param_groups": groups} if groups else {}  # a task's own __init__ may not take it
    return task(task.make_options(**overrides), penalties=penalties, **extra)


def describe(trainer: Trainer) -> None:
    """Prints the penalty coverage table (and writes it to TensorBoard with --model_dir)."""
    table = trainer.penalty_table()
    print(table)
    model_dir = trainer.options.model_dir
    if model_dir and trainer.is_chief:
        files.writable_dir("model_dir", model_dir)
        writer = tf.summary.create_file_writer(model_dir)
        write_text(writer, "penalties", table)
        writer.close()


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]!r}; all options are --flags (see --help).")
    if flags.FLAGS["verbosity"].using_default_value:
        logging.set_verbosity(logging.INFO)
    try:
        sweep = [parse_sweep(spec) for spec in _SWEEP.value]
        if sweep or _SWEEP_SEEDS.value is not None:  # the grid's size, before anything is built
            check_grid(sweep, 1 if _SWEEP_SEEDS.value is None else _SWEEP_SEEDS.value)
        trainer = build_trainer()
        _STAGE.trainer, _STAGE.where = trainer, "training"
        trainer.callbacks = [*trainer.callbacks, _STAGE]
        if trainer.options.model_dir and (_DESCRIBE.value or sweep):
            files.writable_dir("model_dir", trainer.options.model_dir)
        if _DESCRIBE.value:
            _STAGE.where = "while describing the penalties"
            describe(trainer)
            return
        if sweep:
            axes = sweep[0] if len(sweep) == 1 else sweep  # one axis: today's table
            results, table = run_sweep(trainer, axes, _SWEEP_SEEDS.value)
            _STAGE.where = "after training"
            print(table)
            if all(r["diverged"] for r in results):
                given = " ".join(f"--sweep={spec}" for spec in _SWEEP.value)
                print(f"trainer: every run of {given} diverged.", file=sys.stderr)
                sys.exit(1)
            return
        result = trainer.train()
        _STAGE.where = "after training"
    except ConfigError as e:
        _fail(str(e))
    except (FloatingPointError, files.WriteError) as e:
        print(f"trainer: {e}", file=sys.stderr)
        sys.exit(1)
    except Preempted as e:  # SIGTERM: 42, SIGINT: 130; see Preempted.exit_status
        print(f"trainer: {e}", file=sys.stderr)
        sys.exit(e.exit_status)
    except PeerTimeout as e:
        print(f"trainer: {e}", file=sys.stderr)
        sys.exit(PeerTimeout.EXIT_STATUS)
    print(
        f"{_TASK.value}: {result.step} steps, {result.steps_per_sec:.0f} steps/s after a "
        f"{result.first_loop_sec:.1f} s first loop (tracing, compiling)\n"
        f"  train (last loop): {format_losses(result.train)}\n"
        f"  eval: {format_losses(result.eval) or '(no eval dataset)'}"
        + (f"\n  train slice: {format_losses(result.train_eval)}" if result.gap else "")
        + (f"\n  gap (train - eval): {format_losses(result.gap)}" if result.gap else "")
    )


def run(argv: Sequence[str] | None = None) -> None:
    """Runs the command line: `python -m trainer`, the `tapeloop` console script, or a caller
    that passes its own `argv` (tests run the CLI in their process this way).

    A Ctrl-C at any moment ends it with one line on stderr, which says where it came and
    what is left, and exit status 130: in the training loop after saving (`Preempted`),
    elsewhere at once. `python -m trainer` and `tapeloop` guard the import of this module
    (TensorFlow's) too: `trainer.__main__.main`.

    Args:
      argv: the command line, the program's name first; None reads `sys.argv`.

    Raises:
      SystemExit: always, with the exit status: 0 done, 1 a failed run, 2 bad input, 42 and
        130 preempted or interrupted, 75 a missing peer.
    """
    global _STAGE
    _STAGE = _Stage()
    try:
        with remembered_interrupts():  # one Python drops (`Exception ignored`) is not lost
            try:
                app.run(main, argv=None if argv is None else list(argv), flags_parser=_parse_flags)
            except SystemExit as e:
                if not e.code:  # a Ctrl-C dropped after training, at the very end
                    raise_dropped_interrupt()
                raise
    except KeyboardInterrupt:
        print(f"trainer: Interrupted (SIGINT) {_STAGE.interrupted()}", file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT_STATUS)
