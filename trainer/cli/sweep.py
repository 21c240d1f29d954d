"""λ sweeps: one run per value of a penalty strength, in one process, without retracing the step."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import tensorflow as tf

from trainer.errors import ConfigError
from trainer.run import files, summaries
from trainer.run.controller import TrainResult

if TYPE_CHECKING:  # the Trainer module imports the controller, as this one does
    from trainer.step.trainer import Trainer


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """`penalty.attribute=v1,v2,...`, e.g. `selective_l2.scale=1e-5,1e-4,1e-3`."""

    penalty: str
    attribute: str
    values: tuple[float, ...]

    @property
    def hparam(self) -> str:
        return f"{self.penalty}.{self.attribute}"


def parse_sweep(spec: str) -> SweepSpec:
    """Parses `penalty.attribute=v1,v2,...`.

    Raises:
      ConfigError: the spec is malformed or a value is not a number.
    """
    target, equals, listed = spec.partition("=")
    penalty, dot, attribute = target.strip().partition(".")
    if not (equals and dot and penalty.isidentifier() and attribute.isidentifier()):
        raise ConfigError(
            f"--sweep={spec!r}: expected PENALTY.STRENGTH=V1,V2,... "
            "like 'selective_l2.scale=1e-5,1e-4,1e-3'."
        )
    try:
        values = tuple(float(v) for v in listed.split(","))
    except ValueError:
        raise ConfigError(f"--sweep={spec!r}: the values must be numbers.") from None
    if len(set(values)) != len(values):
        raise ConfigError(f"--sweep={spec!r}: a value is repeated.")
    return SweepSpec(penalty, attribute, values)


def _target(trainer: Trainer, spec: SweepSpec) -> Any:
    by_name = {p.name: p for p in trainer.penalties}
    if spec.penalty not in by_name:
        raise ConfigError(
            f"--sweep names penalty {spec.penalty!r}, but the penalties are "
            f"{', '.join(by_name) or 'none'}; add it with --penalty."
        )
    penalty = by_name[spec.penalty]
    strengths = penalty.strength_names()
    if spec.attribute not in strengths:
        raise ConfigError(
            f"--sweep: {spec.attribute!r} is not a strength of {penalty!r}; "
            f"its strengths: {', '.join(strengths) or 'none'}."
        )
    strength = getattr(type(penalty), spec.attribute)  # the `Strength` declaration
    for value in spec.values:
        try:
            strength.check(value)
        except ConfigError as e:
            raise ConfigError(f"--sweep value {value!r} of {spec.hparam}: {e}") from None
    return penalty


def run_sweep(trainer: Trainer, spec: SweepSpec) -> tuple[list[dict[str, Any]], str]:
    """Trains `trainer` once per value, each run from the same initial state.

    Every value is checked as the strength checks an assignment before the first run. Only
    the strength variable changes between runs, so the train step is traced once. A run
    that diverges (`train()` raises `FloatingPointError`) is recorded as such and the sweep
    goes on. With a `model_dir`, each run writes to `<model_dir>/<penalty>.<attribute>=<value>`
    (its TensorBoard scalars, HParams and checkpoints), and `model_dir` holds the HParams
    config. With an `export_dir`, each run that does not diverge exports its evaluated
    weights (with `keep_best`, its best) to `<export_dir>/<penalty>.<attribute>=<value>`.

    Returns:
      The results, one dict per value: `value`, `diverged` (None, or the error's message),
      `export_dir` (the run's export, None without one), and `TrainResult.to_dict()`'s
      fields (for a diverged run, `step` is the step reached and `train`, `eval` and
      `history` are empty); and a table of the held-out metric (`trainer.sweep_metric`) per
      value with the best marked, and with exports a last line naming the best's folder.

    Raises:
      ConfigError: the spec names no penalty or strength of `trainer`, or a value the
        strength rejects.
    """
    penalty = _target(trainer, spec)
    metric, mode = trainer.sweep_metric
    initial = trainer.get_state()
    base_dir, base_export = trainer.options.model_dir, trainer.options.export_dir
    if base_dir and trainer.is_chief:
        _write_config(base_dir, spec, metric)
    if base_export and trainer.is_chief:
        files.writable_dir("export_dir", base_export)  # before the first run, not after
    results = []
    for value in spec.values:
        trainer.set_state(initial)
        setattr(penalty, spec.attribute, value)
        trial = f"{spec.hparam}={value:g}"  # the run's folder, in both directories
        run_dir = files.join(base_dir, trial) if base_dir else None
        export_dir = files.join(base_export, trial) if base_export else None
        trainer.options = dataclasses.replace(
            trainer.options, model_dir=run_dir, export_dir=export_dir
        )
        try:
            result = trainer.train().to_dict()
            diverged = None
        except FloatingPointError as e:
            result = TrainResult(trainer.step).to_dict()
            diverged, export_dir = str(e), None
        if run_dir and trainer.is_chief:
            writer = tf.summary.create_file_writer(run_dir)
            summaries.write_hparams(writer, {spec.hparam: value}, trial_id=f"{value:g}")
            writer.close()
        results.append({"value": value, "diverged": diverged, "export_dir": export_dir, **result})
    trainer.options = dataclasses.replace(
        trainer.options, model_dir=base_dir, export_dir=base_export
    )
    return results, _table(spec, results, metric, mode)


def _write_config(base_dir: str, spec: SweepSpec, metric: str) -> None:
    from tensorboard.plugins.hparams import api as hp

    writer = tf.summary.create_file_writer(base_dir)
    with writer.as_default():
        hp.hparams_config(
            hparams=[hp.HParam(spec.hparam, hp.Discrete(list(spec.values)))],
            metrics=[hp.Metric(f"eval/{metric}", display_name=f"held-out {metric}")],
        )
    writer.close()


def _table(spec: SweepSpec, results: list[dict[str, Any]], metric: str, mode: str) -> str:
    scores = [r["eval"].get(metric, math.nan) for r in results]
    finite = [s for s in scores if math.isfinite(s)]
    best = (min if mode == "min" else max)(finite) if finite else None
    lines = [f"{spec.hparam:>24}  held-out {metric} ({mode} is best)"]
    for result, score in zip(results, scores):
        if result["diverged"]:
            cell = f"diverged at step {result['step']}"
        else:
            cell = f"{score:.6g}" + ("  <- best" if score == best else "")
        lines.append(f"{result['value']:>24g}  {cell}")
    exported = [r for r, s in zip(results, scores) if s == best and r["export_dir"]]
    if exported:
        run = exported[0]
        lines.append(f"best: {spec.hparam}={run['value']:g}, exported to {run['export_dir']}")
    return "\n".join(lines)
