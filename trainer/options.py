"""TrainerOptions: every training option with its help, validated once, here."""

from __future__ import annotations

import dataclasses
import math
import os
import posixpath
import re
import textwrap
import typing
from collections.abc import Mapping
from typing import Any

from trainer.distribution import STRATEGIES, check_strategy
from trainer.errors import (
    ConfigError,
    check_choice,
    check_float32,
    check_integer,
    check_non_negative,
    check_positive,
)
from trainer.optimizers import OPTIMIZERS
from trainer.run import files

MIXED_PRECISION = (None, "mixed_bfloat16", "mixed_float16")
# Options whose values come from a fixed list: the CLI makes them enum flags.
SCHEDULES = ("constant", "cosine", "linear")
NONFINITE = ("stop", "rollback")
CHOICES = {
    "optimizer": OPTIMIZERS,
    "strategy": STRATEGIES,
    "mixed_precision": MIXED_PRECISION,
    "lr_schedule": SCHEDULES,
    "on_nonfinite": NONFINITE,
}


# Sections of the command line's help, in order; each field names its own.
OPTIMIZER = "optimizer"
DATA = "data"
LOOP = "loop & evaluation"
CHECKPOINTS = "checkpoints & export"
TECHNIQUES = "techniques: schedules, clipping, accumulation, SAM, EMA, SWA"
RUNS = "runs: early stopping, rollback, profiling"
DISTRIBUTION = "distribution & precision"
SECTIONS = (OPTIMIZER, DATA, LOOP, CHECKPOINTS, TECHNIQUES, RUNS, DISTRIBUTION)


def _option(default: Any, section: str, text: str, *, recorded: bool = False) -> Any:
    """A `TrainerOptions` field: its default and, as metadata, its help, its section and
    whether it is recorded with a run (a new value on resume is in force, and logged)."""
    return dataclasses.field(
        default=default, metadata={"help": text, "section": section, "recorded": recorded}
    )


@dataclasses.dataclass(frozen=True)
class TrainerOptions:
    """How to train: the optimizer, batch, step counts and where to write.

    Each field is also a command-line flag of the same name (`--learning_rate=...`). Its text
    lives beside it, in the field's metadata: `help` (the flag's help, and this docstring's
    `Attributes:` section, appended from it when the module loads), `section` (its group in
    `--help`) and `recorded` (recorded with a run: a new value on resume is logged).
    """

    optimizer: str = _option(
        "adam",
        OPTIMIZER,
        "the optimizer of the default `Trainer.build_optimizer`: sgd, momentum (SGD with momentum "
        "0.9), adam, adamw (Keras AdamW: weight_decay 0.004 on every trainable variable, shown in "
        "the penalty table), rmsprop, adagrad or nadam.",
    )
    learning_rate: float = _option(1e-3, OPTIMIZER, "the optimizer's learning rate, positive.")
    batch_size: int = _option(
        128,
        DATA,
        "examples per training step (the global batch), positive.",
        recorded=True,
    )
    train_steps: int = _option(1000, LOOP, "total optimizer steps, positive.", recorded=True)
    steps_per_loop: int = _option(
        100,
        LOOP,
        "steps run inside one tf.function call, between progress lines; positive. Larger is "
        "faster; results do not depend on it.",
        recorded=True,
    )
    eval_every: int = _option(
        0,
        LOOP,
        "evaluate every this many steps (a loop is cut short to end there); 0 evaluates only at "
        "the end.",
        recorded=True,
    )
    train_eval_examples: int = _option(
        0,
        LOOP,
        "0 (the default) is off. N > 0: at every evaluation, also evaluate on the first N training "
        "examples (a fixed slice; preprocess, no augmentation, the evaluated weights: EMA/SWA when "
        "on) and report the gap (train - eval) of the loss and each metric; and measure the task's "
        "metrics while training (train/<metric>, streamed over each loop).",
    )
    model_dir: str | None = _option(
        None,
        CHECKPOINTS,
        "directory (a local path or a tf.io.gfile URL such as gs://...) for checkpoints, "
        "TensorBoard summaries and results.json; None writes nothing.",
    )
    data_dir: str | None = _option(
        None,
        DATA,
        "where TFDS tasks look for prepared data; None for TFDS' default.",
    )
    in_memory_fraction: float = _option(
        0.25,
        DATA,
        "for tasks that read their data with `read_to_memory` (mnist, cifar10): the most of the "
        "physical RAM the training data may take, as stored, to be held in memory and batched "
        "in-graph; above it, the data comes through a tf.data pipeline. From 0 (always tf.data) "
        "to 1.",
    )
    seed: int = _option(
        0,
        DATA,
        "seeds Python, NumPy, TensorFlow and Keras for initialisation and shuffling.",
        recorded=True,
    )
    label_smoothing: float = _option(
        0.0,
        DATA,
        "for classification tasks (mnist, cifar10): train on soft targets onehot*(1-e) + e/K "
        "(Keras' CategoricalCrossentropy(label_smoothing=e)); from 0 (off, the default) to below "
        "1. Training batches only: evaluation is unchanged.",
        recorded=True,
    )
    mixup_alpha: float = _option(
        0.0,
        DATA,
        "for classification tasks (mnist, cifar10): mixup (Zhang et al. 2018) with one "
        "lambda ~ Beta(alpha, alpha) per replica batch, mixing features and soft targets with a "
        "permutation of the batch, drawn from (seed, optimizer step); non-negative, 0 (the "
        "default) is off. Training batches only: evaluation is unchanged.",
        recorded=True,
    )
    use_tf_function: bool = _option(
        True,
        LOOP,
        "False runs the very same step eagerly, for debugging.",
    )
    strategy: str = _option(
        "default",
        DISTRIBUTION,
        "the tf.distribute strategy: default (none), mirrored (all local GPUs), multi_worker "
        "(cluster from TF_CONFIG) or tpu; ignored when the Trainer is given a strategy object.",
    )
    cpu_replicas: int = _option(
        0,
        DISTRIBUTION,
        "with strategy mirrored, mirror over this many logical CPUs (for testing); 0 uses the real "
        "devices.",
    )
    mixed_precision: str | None = _option(
        None,
        DISTRIBUTION,
        "None, mixed_bfloat16 (the CPU choice) or mixed_float16 (GPUs; adds a LossScaleOptimizer). "
        "Weights and penalties stay float32.",
        recorded=True,
    )
    jit_compile: bool | None = _option(
        None,
        DISTRIBUTION,
        "XLA. None (the default) compiles the whole multi-step loop when the task gives "
        "train_arrays, there is no distribution strategy and the model has no convolutions on a "
        "CPU-only machine, and falls back without XLA if it does not compile; True compiles the "
        "loop (or, with a tf.data input, the step) always; False never.",
    )
    checkpoint_every: int = _option(
        1000,
        CHECKPOINTS,
        "with model_dir, save a checkpoint every this many steps (and at the end, and on SIGTERM); "
        "0 saves only at the end and on SIGTERM.",
        recorded=True,
    )
    resume_from: str | None = _option(
        None,
        CHECKPOINTS,
        "a checkpoint path (<model_dir>/ckpt-<step>) to resume from instead of the latest one, "
        "e.g. when the latest is damaged; needs a model_dir to continue the run in.",
    )
    export_dir: str | None = _option(
        None,
        CHECKPOINTS,
        "write the evaluated model there as a SavedModel: signature serving_default takes data "
        "as stored (through the task's preprocess), serve the model's inputs; a folder of its own, "
        "not model_dir itself (a subfolder such as <model_dir>/export is fine).",
    )
    deterministic: bool = _option(
        False,
        CHECKPOINTS,
        "enable TensorFlow's op determinism, so that a resumed run ends with weights bit-identical "
        "to an uninterrupted one.",
    )
    summary_every: int = _option(
        100,
        LOOP,
        "with model_dir, write TensorBoard scalars every this many steps from inside the train "
        "loop; 0 writes none.",
        recorded=True,
    )
    peer_timeout: int = _option(
        120,
        DISTRIBUTION,
        "with strategy multi_worker, seconds to wait for the other tasks in TF_CONFIG to start; "
        "then exit with one line naming the missing ones (status 75). 0 waits forever.",
    )
    lr_schedule: str = _option(
        "constant",
        TECHNIQUES,
        "the learning rate over train_steps, applied by the default build_optimizer: constant, "
        "cosine (Keras CosineDecay / optax warmup_cosine_decay_schedule) or linear decay to "
        "end_learning_rate, after warmup_steps of linear warmup from 0 to learning_rate.",
        recorded=True,
    )
    warmup_steps: int = _option(
        0,
        TECHNIQUES,
        "optimizer steps of linear warmup from 0 to learning_rate, from 0 to train_steps.",
        recorded=True,
    )
    end_learning_rate: float = _option(
        0.0,
        TECHNIQUES,
        "the rate cosine or linear decays to at train_steps, from 0 to learning_rate.",
        recorded=True,
    )
    clip_global_norm: float = _option(
        0.0,
        TECHNIQUES,
        "clip the global norm of the whole gradient (data loss, loss penalties, Keras "
        "regularizers; over all replicas) to this before the update; 0 (the default) does not "
        "clip. Decoupled decay is not clipped.",
        recorded=True,
    )
    accumulate_steps: int = _option(
        1,
        TECHNIQUES,
        "split each batch into this many micro-batches of batch_size / accumulate_steps, sum their "
        "gradients and make one optimizer step; must divide batch_size. Penalties, decoupled decay "
        "and the EMA count once per optimizer step.",
        recorded=True,
    )
    ema_decay: float = _option(
        0.0,
        TECHNIQUES,
        "keep an exponential moving average of the weights, ema = d*ema + (1-d)*w per optimizer "
        "step (Keras' use_ema formula), used for evaluation, export and results while training "
        "continues on the raw weights; from 0 (off, the default) to below 1.",
        recorded=True,
    )
    sam_rho: float = _option(
        0.0,
        TECHNIQUES,
        "sharpness-aware minimization (SAM, Foret et al. 2021): the radius rho of the weight "
        "perturbation; each step takes the gradients at w, perturbs the weights by "
        "rho*g/||g||, takes the gradients there, restores w and applies those. 0 (the default) "
        "is off: the plain step.",
        recorded=True,
    )
    sam_adaptive: bool = _option(
        False,
        TECHNIQUES,
        "with sam_rho, adaptive SAM (ASAM, Kwon et al. 2021): the perturbation scaled "
        "element-wise, rho*T^2*g/||T*g|| with T = |w| + 0.01.",
        recorded=True,
    )
    swa_start: int = _option(
        0,
        TECHNIQUES,
        "with swa_every, stochastic weight averaging (SWA, Izmailov et al. 2018) from this "
        "optimizer step on, from 0 to below train_steps.",
        recorded=True,
    )
    swa_every: int = _option(
        0,
        TECHNIQUES,
        "average the weights after every this many optimizer steps from swa_start (SWA); "
        "evaluation, export, keep_best and sweeps use the average (BatchNorm statistics "
        "recomputed over swa_bn_batches training batches) while training continues on the "
        "raw weights. 0 (the default) is off.",
        recorded=True,
    )
    swa_bn_batches: int = _option(
        32,
        TECHNIQUES,
        "with SWA, the training batches the BatchNorm moving statistics of the averaged "
        "weights are recomputed over before each evaluation and export, positive; models "
        "without BatchNorm skip it.",
        recorded=True,
    )
    early_stop_patience: int = _option(
        0,
        RUNS,
        "stop after this many evaluations in a row without an improvement of the task's held-out "
        "metric (Trainer.sweep_metric, by default the eval loss) by more than "
        "early_stop_min_delta; needs eval_every. 0 (the default) never stops early.",
        recorded=True,
    )
    early_stop_min_delta: float = _option(
        0.0,
        RUNS,
        "the least change of the held-out metric that counts as an improvement for "
        "early_stop_patience, non-negative.",
    )
    keep_best: bool = _option(
        False,
        RUNS,
        "with model_dir, keep the weights of the best evaluation (the EMA ones with ema_decay) as "
        "a checkpoint in <model_dir>/best/, never rotated out; with export_dir, export those "
        "weights instead of the last ones. Needs eval_every.",
    )
    on_nonfinite: str = _option(
        "stop",
        RUNS,
        "what a non-finite loss does: stop (exit 1, naming the step and the term) or rollback (to "
        "the last checkpoint, or the initial state without one, with the learning rate times "
        "rollback_lr_factor; after max_rollbacks, stop).",
    )
    max_rollbacks: int = _option(
        3,
        RUNS,
        "with on_nonfinite=rollback, the most rollbacks of a run, positive.",
    )
    rollback_lr_factor: float = _option(
        0.5,
        RUNS,
        "with on_nonfinite=rollback, what each rollback multiplies a constant learning rate by, "
        "from 0 (excluded) to 1; a schedule is left unchanged.",
    )
    profile_steps: str | None = _option(
        None,
        RUNS,
        "'A,B' (0 <= A < B <= train_steps): with model_dir, a TensorFlow profiler trace of the "
        "steps from A to B (loops are cut at A and B) in <model_dir>/plugins/profile/, for "
        "TensorBoard's Profile tab. A resumed run traces what is left of the range, and warns "
        "when that is nothing.",
    )

    def __post_init__(self):
        self._check_floats()
        for name in ("batch_size", "train_steps", "steps_per_loop"):
            check_integer(name, getattr(self, name), 1)
        for name in (
            "eval_every",
            "train_eval_examples",
            "checkpoint_every",
            "summary_every",
            "peer_timeout",
        ):
            check_integer(name, getattr(self, name), 0)
        check_integer("seed", self.seed, 0, 2**32 - 1)
        check_positive("learning_rate", self.learning_rate)
        if check_non_negative("in_memory_fraction", self.in_memory_fraction) > 1:
            raise ConfigError(
                f"`in_memory_fraction` ({self.in_memory_fraction!r}) must be a number from 0 to 1."
            )
        for name, choices in CHOICES.items():
            check_choice(name, getattr(self, name), choices)
        check_strategy(self.strategy, self.cpu_replicas)
        for name in ("use_tf_function", "deterministic", "keep_best", "sam_adaptive"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"`{name}` ({getattr(self, name)!r}) must be True or False.")
        if self.jit_compile not in (None, True, False):
            raise ConfigError(f"`jit_compile` ({self.jit_compile!r}) must be None, True or False.")
        self._check_techniques()
        self._check_runs()
        self._check_directories()

    def _check_floats(self) -> None:
        """Every float field (found by its type, so a new one is covered) as a finite number
        that float32 holds (`errors.check_float32`): the step computes with float32 copies,
        where 1e39 would be inf. The ranges of each are checked after."""
        for name in float_options():
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"`{name}` ({value!r}) must be a number.")
            try:
                finite = math.isfinite(value)
            except OverflowError:  # an int beyond any float
                finite = False
            if not finite:
                raise ConfigError(f"`{name}` ({value!r}) must be a finite number.")
            check_float32(name, float(value))

    def _check_techniques(self) -> None:
        check_integer("warmup_steps", self.warmup_steps, 0, self.train_steps)
        end = check_non_negative("end_learning_rate", self.end_learning_rate)
        if end > self.learning_rate:
            raise ConfigError(
                f"`end_learning_rate` ({end!r}) must be at most `learning_rate` "
                f"({self.learning_rate!r})."
            )
        if end and self.lr_schedule == "constant":
            raise ConfigError(f"`end_learning_rate` ({end!r}) needs lr_schedule cosine or linear.")
        check_non_negative("clip_global_norm", self.clip_global_norm)
        k = check_integer("accumulate_steps", self.accumulate_steps, 1, self.batch_size)
        if self.batch_size % k:
            raise ConfigError(
                f"`accumulate_steps` ({k}) must divide `batch_size` "
                f"({self.batch_size}) into equal micro-batches."
            )
        ema = check_non_negative("ema_decay", self.ema_decay)
        if ema >= 1:
            raise ConfigError(f"`ema_decay` ({self.ema_decay!r}) must be from 0 (off) to below 1.")
        check_non_negative("sam_rho", self.sam_rho)
        if check_non_negative("label_smoothing", self.label_smoothing) >= 1:
            raise ConfigError(
                f"`label_smoothing` ({self.label_smoothing!r}) must be from 0 (off) to below 1."
            )
        check_non_negative("mixup_alpha", self.mixup_alpha)
        if self.sam_adaptive and not self.sam_rho:
            raise ConfigError("`sam_adaptive` (True) needs `sam_rho` above 0.")
        check_integer("swa_every", self.swa_every, 0)
        check_integer("swa_start", self.swa_start, 0, self.train_steps - 1)
        check_integer("swa_bn_batches", self.swa_bn_batches, 1)
        if self.swa_start and not self.swa_every:
            raise ConfigError(f"`swa_start` ({self.swa_start}) needs `swa_every` above 0.")
        if self.swa_every and self.ema_decay:
            raise ConfigError(
                f"`swa_every` ({self.swa_every}) and `ema_decay` ({self.ema_decay!r}) both "
                "average the weights: evaluation and export can use one average; choose one."
            )

    def _check_runs(self) -> None:
        check_integer("early_stop_patience", self.early_stop_patience, 0)
        check_non_negative("early_stop_min_delta", self.early_stop_min_delta)
        for name in ("early_stop_patience", "keep_best"):
            if getattr(self, name) and not self.eval_every:
                raise ConfigError(f"`{name}` ({getattr(self, name)!r}) needs `eval_every`.")
        if self.keep_best and not self.model_dir:
            raise ConfigError("`keep_best` (True) needs a `model_dir` to keep the best in.")
        check_integer("max_rollbacks", self.max_rollbacks, 1)
        factor = check_positive("rollback_lr_factor", self.rollback_lr_factor)
        if factor > 1:
            raise ConfigError(f"`rollback_lr_factor` ({factor!r}) must be above 0 and at most 1.")
        if self.profile_steps is not None:
            profile_range(self.profile_steps, self.train_steps)
            if not self.model_dir:
                raise ConfigError(f"`profile_steps` ({self.profile_steps!r}) needs a `model_dir`.")

    def _check_directories(self) -> None:
        if self.resume_from and not self.model_dir:
            raise ConfigError(
                f"`resume_from` ({self.resume_from!r}) needs a `model_dir` to continue the run "
                "in (it may be the checkpoint's own directory); without one nothing would be "
                "saved."
            )
        if self.export_dir and self.model_dir and same_path(self.export_dir, self.model_dir):
            raise ConfigError(
                f"`export_dir` ({self.export_dir!r}) is `model_dir` ({self.model_dir!r}): the "
                "SavedModel would be mixed with the run's checkpoints, and copying, serving or "
                "replacing it would take them along; use a folder of its own, such as "
                f"{files.join(self.model_dir, 'export')!r}."
            )


def float_options() -> tuple[str, ...]:
    """The `TrainerOptions` fields typed `float` (or `float | None`)."""
    hints = typing.get_type_hints(TrainerOptions)
    return tuple(
        f.name for f in dataclasses.fields(TrainerOptions) if hints[f.name] in (float, float | None)
    )


def normalised_path(path: str) -> str:
    """`path` as one spelling: a URL (`gs://b/x/`) with `.`, `..`, repeated and trailing
    slashes resolved; a local path absolute, with symbolic links resolved."""
    scheme, separator, rest = path.partition("://")
    if separator:
        return f"{scheme.lower()}://{posixpath.normpath('/' + rest).lstrip('/')}"
    return os.path.realpath(path)


def same_path(a: str, b: str) -> bool:
    """Whether `a` and `b` name the same directory, however spelt (`normalised_path`)."""
    return normalised_path(a) == normalised_path(b)


def profile_range(text: Any, train_steps: int) -> tuple[int, int]:
    """`(A, B)` from `profile_steps` 'A,B'.

    Raises:
      ConfigError: not two integers with 0 <= A < B <= train_steps.
    """
    match = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*", text) if isinstance(text, str) else None
    if not match or not int(match[1]) < int(match[2]) <= train_steps:
        raise ConfigError(
            f"`profile_steps` ({text!r}) must be 'A,B', steps with 0 <= A < B <= "
            f"train_steps ({train_steps})."
        )
    return int(match[1]), int(match[2])


def options_with(
    defaults: Mapping[str, Any], overrides: Mapping[str, Any], *, owner: str
) -> TrainerOptions:
    """`TrainerOptions` with `defaults` (a task's `default_options`), then `overrides`.

    Raises:
      ConfigError: a key is not a `TrainerOptions` field (naming `owner`), or a value is
        invalid.
    """
    fields = {f.name for f in dataclasses.fields(TrainerOptions)}
    for source, values in (("default_options", defaults), ("options", overrides)):
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ConfigError(
                f"{owner} {source}: {unknown[0]!r} is not a TrainerOptions field; "
                f"the fields: {', '.join(sorted(fields))}."
            )
    return TrainerOptions(**{**defaults, **overrides})


def option_help() -> dict[str, str]:
    """Each `TrainerOptions` field's help text, from its metadata."""
    return {f.name: f.metadata["help"] for f in dataclasses.fields(TrainerOptions)}


def option_sections() -> dict[str, list[str]]:
    """The `TrainerOptions` field names of each section, sections and fields in order."""
    sections: dict[str, list[str]] = {section: [] for section in SECTIONS}
    for field in dataclasses.fields(TrainerOptions):
        sections[field.metadata["section"]].append(field.name)
    return sections


def recorded_options() -> tuple[str, ...]:
    """The fields recorded with a run: on resume, a new value is in force and logged."""
    return tuple(f.name for f in dataclasses.fields(TrainerOptions) if f.metadata["recorded"])


def _attributes_section() -> str:
    """The Google-style `Attributes:` section of `TrainerOptions`, from the fields' help."""
    lines = ["", "    Attributes:"]
    for name, text in option_help().items():
        lines += textwrap.wrap(
            f"{name}: {text}",
            96,
            initial_indent="      ",
            subsequent_indent="        ",
            break_on_hyphens=False,
        )
    return "\n".join(lines) + "\n"


TrainerOptions.__doc__ += _attributes_section()
