"""The command line: absl flags -> options, penalties and a registered task -> train."""

from __future__ import annotations

import dataclasses
import sys

import tensorflow as tf
from absl import app, flags, logging

from trainer import registry
from trainer.distribution import STRATEGIES
from trainer.errors import ConfigError
from trainer.progress import format_losses
from trainer.summaries import write_text
from trainer.sweep import parse_sweep, run_sweep
from trainer.trainer import OPTIMIZERS, Preempted, TrainerOptions

_TASK = flags.DEFINE_string("task", "synthetic", "Registered task to run.")
_PENALTY = flags.DEFINE_multi_string(
    "penalty",
    [],
    "Penalty spec in Python-call syntax with literal arguments, e.g. "
    "\"selective_l2(1e-4, exclude='bias')\"; repeat the flag for several.",
)
_IMPORT = flags.DEFINE_multi_string(
    "import", [], "Python module to import before running (registers user tasks and penalties)."
)
_OPTIMIZER = flags.DEFINE_enum("optimizer", None, OPTIMIZERS, "Optimizer (default: the task's).")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", None, "Learning rate (default: the task's).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Global batch size (default: the task's).")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", None, "Training steps (default: the task's).")
_STEPS_PER_LOOP = flags.DEFINE_integer(
    "steps_per_loop", None, "Steps per tf.function call and progress line (default: the task's)."
)
_EVAL_EVERY = flags.DEFINE_integer(
    "eval_every", None, "Evaluate every N steps; 0: only at the end (default: the task's)."
)
_MODEL_DIR = flags.DEFINE_string("model_dir", None, "Directory for results (none by default).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory (default: TFDS').")
_SEED = flags.DEFINE_integer("seed", None, "Random seed (default: the task's).")
_STRATEGY = flags.DEFINE_enum(
    "strategy",
    None,
    STRATEGIES,
    "tf.distribute strategy (default: none; multi_worker reads TF_CONFIG).",
)
_CPU_REPLICAS = flags.DEFINE_integer(
    "cpu_replicas", None, "With --strategy=mirrored: mirror over N logical CPU devices (testing)."
)
_MIXED_PRECISION = flags.DEFINE_enum(
    "mixed_precision",
    None,
    ["mixed_bfloat16", "mixed_float16"],
    "Mixed precision policy; mixed_bfloat16 on CPUs (float16 is very slow there).",
)
_JIT_COMPILE = flags.DEFINE_bool("jit_compile", None, "Compile the train step with XLA.")
_CHECKPOINT_EVERY = flags.DEFINE_integer(
    "checkpoint_every", None, "With --model_dir: checkpoint every N steps; 0: only at the end."
)
_RESUME_FROM = flags.DEFINE_string(
    "resume_from", None, "Checkpoint to resume from instead of the latest (e.g. DIR/ckpt-2000)."
)
_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "Export the trained model as a SavedModel.")
_DETERMINISTIC = flags.DEFINE_bool(
    "deterministic", None, "Op determinism: a resumed run ends bit-identical to an unbroken one."
)
_SUMMARY_EVERY = flags.DEFINE_integer(
    "summary_every", None, "With --model_dir: TensorBoard scalars every N steps; 0: none."
)
_DESCRIBE = flags.DEFINE_bool(
    "describe", False, "Print which variables each penalty covers (and which none), then exit."
)
_SWEEP = flags.DEFINE_string(
    "sweep",
    None,
    "Train one run per value of a penalty strength, e.g. 'selective_l2.scale=1e-5,1e-4,1e-3'.",
)
_USE_TF_FUNCTION = flags.DEFINE_bool(
    "use_tf_function", True, "Run the train step as a tf.function; false runs it eagerly."
)

# Flag name -> TrainerOptions field, for flags that override the task's defaults when given.
_OPTION_FLAGS = {
    "optimizer": _OPTIMIZER,
    "learning_rate": _LEARNING_RATE,
    "batch_size": _BATCH_SIZE,
    "train_steps": _TRAIN_STEPS,
    "steps_per_loop": _STEPS_PER_LOOP,
    "eval_every": _EVAL_EVERY,
    "model_dir": _MODEL_DIR,
    "data_dir": _DATA_DIR,
    "seed": _SEED,
    "use_tf_function": _USE_TF_FUNCTION,
    "strategy": _STRATEGY,
    "cpu_replicas": _CPU_REPLICAS,
    "mixed_precision": _MIXED_PRECISION,
    "jit_compile": _JIT_COMPILE,
    "checkpoint_every": _CHECKPOINT_EVERY,
    "resume_from": _RESUME_FROM,
    "export_dir": _EXPORT_DIR,
    "deterministic": _DETERMINISTIC,
    "summary_every": _SUMMARY_EVERY,
}


def _fail(message: str) -> None:
    print(f"trainer: error: {message}", file=sys.stderr)
    sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _fail(str(e).splitlines()[0])


def build_trainer():
    """Builds the task's Trainer from the parsed flags.

    Raises:
      ConfigError: an unknown task or penalty, a bad spec or option.
    """
    registry.load_plugins(registry.TASK_ENTRY_POINTS)
    registry.load_plugins(registry.PENALTY_ENTRY_POINTS)
    registry.import_modules(_IMPORT.value)
    task = registry.get_task(_TASK.value)
    penalties = [registry.parse_penalty_spec(spec) for spec in _PENALTY.value]
    overrides = {name: flag.value for name, flag in _OPTION_FLAGS.items() if flag.value is not None}
    defaults = dataclasses.replace(TrainerOptions(), **getattr(task, "default_options", {}))
    options = dataclasses.replace(defaults, **overrides)
    return task(options, penalties=penalties)


def describe(trainer) -> None:
    """Prints the penalty coverage table (and writes it to TensorBoard with --model_dir)."""
    table = trainer.penalty_table()
    print(table)
    model_dir = trainer.options.model_dir
    if model_dir and trainer.is_chief:
        writer = tf.summary.create_file_writer(model_dir)
        write_text(writer, "penalties", table)
        writer.close()


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]!r}; all options are --flags (see --help).")
    if flags.FLAGS["verbosity"].using_default_value:
        logging.set_verbosity(logging.INFO)
    try:
        sweep = parse_sweep(_SWEEP.value) if _SWEEP.value else None
        trainer = build_trainer()
        if _DESCRIBE.value:
            describe(trainer)
            return
        if sweep:
            _, table = run_sweep(trainer, sweep)
            print(table)
            return
        result = trainer.train()
    except ConfigError as e:
        _fail(str(e))
    except FloatingPointError as e:
        print(f"trainer: {e}", file=sys.stderr)
        sys.exit(1)
    except Preempted as e:
        print(f"trainer: {e}", file=sys.stderr)
        sys.exit(Preempted.EXIT_STATUS)
    print(
        f"{_TASK.value}: {result['step']} steps, {result['steps_per_sec']:.0f} steps/s after a "
        f"{result['first_loop_sec']:.1f} s first loop (tracing, compiling)\n"
        f"  train (last loop): {format_losses(result['train'])}\n"
        f"  eval: {format_losses(result['eval']) or '(no eval dataset)'}"
    )


def run() -> None:
    """Entry point of `python -m trainer` and the `tapeloop` console script."""
    app.run(main, flags_parser=_parse_flags)
