"""Sweeps: one run per value of a penalty strength or the learning rate, or per point of a
grid of them, each repeated over seeds, in one process, without retracing the step."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow as tf

from trainer.errors import ConfigError
from trainer.optimizers import learning_rate_variable, set_learning_rate
from trainer.run import files, summaries
from trainer.run.controller import TrainResult

if TYPE_CHECKING:  # the Trainer module imports the controller, as this one does
    from trainer.step.trainer import Trainer

MAX_TRIALS = 1000  # the most trials (points × seeds) one sweep may run
LEARNING_RATE = "learning_rate"  # the one axis that is not a penalty's strength


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """`penalty.attribute=v1,v2,...`, e.g. `selective_l2.scale=1e-5,1e-4,1e-3`, or
    `learning_rate=v1,v2,...` (then `penalty` is empty)."""

    penalty: str
    attribute: str
    values: tuple[float, ...]

    @property
    def hparam(self) -> str:
        return f"{self.penalty}.{self.attribute}" if self.penalty else self.attribute


def parse_sweep(spec: str) -> SweepSpec:
    """Parses `penalty.attribute=v1,v2,...` or `learning_rate=v1,v2,...`.

    Raises:
      ConfigError: the spec is malformed or a value is not a number.
    """
    target, equals, listed = spec.partition("=")
    penalty, dot, attribute = target.strip().partition(".")
    if equals and target.strip() == LEARNING_RATE:
        penalty, dot, attribute = "", ".", LEARNING_RATE
    if not (
        equals and dot and (not penalty or penalty.isidentifier()) and attribute.isidentifier()
    ):
        raise ConfigError(
            f"--sweep={spec!r}: expected PENALTY.STRENGTH=V1,V2,... "
            "like 'selective_l2.scale=1e-5,1e-4,1e-3', or learning_rate=V1,V2,..."
        )
    try:
        values = tuple(float(v) for v in listed.split(","))
    except ValueError:
        raise ConfigError(f"--sweep={spec!r}: the values must be numbers.") from None
    if len(set(values)) != len(values):
        raise ConfigError(f"--sweep={spec!r}: a value is repeated.")
    return SweepSpec(penalty, attribute, values)


def check_grid(specs: Sequence[SweepSpec], seeds: int = 1, max_trials: int = MAX_TRIALS) -> int:
    """Checks a grid's axes and size before anything is built or trained.

    Args:
      specs: the axes, one per `--sweep`.
      seeds: runs per point (`--sweep_seeds`).
      max_trials: the most trials (points × seeds) allowed.

    Returns:
      The number of trials.

    Raises:
      ConfigError: no axis, an axis given twice, `seeds` < 1, or more trials than `max_trials`.
    """
    if not specs:
        raise ConfigError("--sweep_seeds needs at least one --sweep axis.")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"--sweep_seeds ({seeds!r}) must be a positive integer.")
    names = [spec.hparam for spec in specs]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"--sweep: the axis {name} is given twice; give it once.")
    trials = math.prod(len(spec.values) for spec in specs) * seeds
    if trials > max_trials:
        sizes = " × ".join(f"{len(spec.values)} ({spec.hparam})" for spec in specs)
        raise ConfigError(
            f"--sweep: the grid has {trials} trials ({sizes} × {seeds} seeds), more than the "
            f"limit of {max_trials}; sweep fewer values or seeds."
        )
    return trials


def _target(trainer: Trainer, spec: SweepSpec) -> Any:
    """The penalty that `spec` sweeps (None for the learning rate), its values checked."""
    if not spec.penalty:
        if learning_rate_variable(trainer.optimizer) is None:
            raise ConfigError(
                "--sweep=learning_rate=...: the optimizer follows a schedule (lr_schedule="
                f"{trainer.options.lr_schedule!r}, warmup_steps={trainer.options.warmup_steps}); "
                "sweep the learning rate with a constant one."
            )
        for value in spec.values:
            try:
                dataclasses.replace(trainer.options, learning_rate=value)
            except ConfigError as e:
                raise ConfigError(f"--sweep value {value!r} of learning_rate: {e}") from None
        return None
    by_name = {p.name: p for p in trainer.penalties}
    if spec.penalty not in by_name:
        raise ConfigError(
            f"--sweep names penalty {spec.penalty!r}, but the penalties are "
            f"{', '.join(by_name) or 'none'}; add it with --penalty, or sweep learning_rate."
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


def _seed_list(trainer: Trainer, seeds: int | Sequence[int] | None) -> list[int]:
    if seeds is None:
        return [trainer.options.seed]
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds < 1:
            raise ConfigError(f"--sweep_seeds ({seeds}) must be a positive integer.")
        seeds = range(trainer.options.seed, trainer.options.seed + seeds)
    seeds = list(seeds)
    for seed in seeds:
        dataclasses.replace(trainer.options, seed=seed)  # an out-of-range seed: ConfigError
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"run_sweep: `seeds` ({seeds!r}) must be distinct, and at least one.")
    return seeds


def run_sweep(
    trainer: Trainer,
    spec: SweepSpec | Sequence[SweepSpec],
    seeds: int | Sequence[int] | None = None,
    max_trials: int = MAX_TRIALS,
) -> tuple[list[dict[str, Any]], str]:
    """Trains `trainer` once per point of the grid and seed, each run from a fresh state.

    The grid is every combination of the axes' values (one `SweepSpec` each: a penalty
    strength or `learning_rate`, a constant rate only); each point runs once per seed. A
    trial (point, seed) starts as a fresh build with `options.seed = seed` would: the model's
    initial weights drawn under that seed (`Trainer.initial_model_values`), the optimizer's
    state and the step reset, and the in-memory data in that seed's order (a variable read
    by the loop). Strengths, the learning rate and the data seed are variables, so the train
    step is traced once. Every value is checked, and the grid's size against `max_trials`,
    before the first run. A run that diverges (`train()` raises `FloatingPointError`) is
    recorded as such and the sweep goes on. Afterwards the model holds the last trial's
    weights; the options, the data seed and the learning rate are set back.

    With one axis and no `seeds`, each run writes to `<model_dir>/<penalty>.<attribute>=<value>`
    (its TensorBoard scalars, HParams and checkpoints); with several axes the folder names
    every axis, `<axis>=<value>,<axis>=<value>`, and with seeds `,seed=<seed>` follows.
    `model_dir` holds the HParams config (every axis, and the seed when repeated). With an
    `export_dir`, each run that does not diverge exports its evaluated weights (with
    `keep_best`, its best) to the same folder name under `export_dir`.

    Args:
      trainer: the Trainer to sweep.
      spec: one axis, or several (a grid).
      seeds: None (one run per point, at `options.seed`), a count N (seeds `options.seed`
        to `options.seed + N - 1`), or the seeds themselves.
      max_trials: the most trials (points × seeds) run; a larger grid is refused.

    Returns:
      The results, one dict per trial: `point` (value by axis name), `seed`, `value` (with
      one axis), `diverged` (None, or the error's message), `export_dir` (the run's export,
      None without one), and `TrainResult.to_dict()`'s fields (for a diverged run, `step`
      is the step reached and `train`, `eval` and `history` are empty); and a table of the
      held-out metric (`trainer.sweep_metric`): with one axis and no seeds, one line per
      value with the best marked; else one line per point (see `point_rows`).

    Raises:
      ConfigError: an axis names no penalty or strength of `trainer`, a value the strength
        (or the learning rate) rejects, a learning rate that follows a schedule, bad seeds,
        or a grid above `max_trials`.
    """
    specs = [spec] if isinstance(spec, SweepSpec) else list(spec)
    seed_list = _seed_list(trainer, seeds)
    check_grid(specs, len(seed_list), max_trials)
    targets = [_target(trainer, s) for s in specs]
    metric, mode = trainer.sweep_metric
    grid = len(specs) > 1 or seeds is not None
    repeated = len(seed_list) > 1
    base = trainer.options
    initial = trainer.get_state()
    starts = {seed: trainer.initial_model_values(seed) for seed in seed_list if seed != base.seed}
    if starts:
        tf.keras.utils.set_random_seed(base.seed)
    if base.model_dir and trainer.is_chief:
        _write_config(base.model_dir, specs, seed_list if repeated else [], metric)
    if base.export_dir and trainer.is_chief:
        files.writable_dir("export_dir", base.export_dir)  # before the first run, not after
    batches = trainer.train_loop.batches
    rate = learning_rate_variable(trainer.optimizer)
    rate = None if rate is None else float(rate.numpy())  # set back after a rate's sweep
    results = []
    try:
        for point in itertools.product(*(s.values for s in specs)):
            for seed in seed_list:
                values = dict(zip((s.hparam for s in specs), point))
                trial = _trial_name(specs, point, seed if repeated else None)
                trainer.set_state(initial)
                if seed in starts:
                    for variable, value in zip(trainer.model.variables, starts[seed], strict=True):
                        variable.assign(value)
                options = {}
                for s, target, value in zip(specs, targets, point):
                    if target is None:
                        set_learning_rate(trainer.optimizer, value)
                        options["learning_rate"] = value
                    else:
                        setattr(target, s.attribute, value)
                if batches is not None:
                    batches.seed = seed
                results.append(_run_trial(trainer, base, trial, seed, values, options, repeated))
                if not grid:
                    results[-1]["value"] = point[0]
    finally:
        trainer.options = base
        if batches is not None:
            batches.seed = base.seed
        if None in targets:
            set_learning_rate(trainer.optimizer, rate)
    if not grid:
        return results, _table(specs[0], results, metric, mode)
    return results, grid_table(specs, results, metric, mode, seed_list)


def _trial_name(specs: Sequence[SweepSpec], point: Sequence[float], seed: int | None) -> str:
    """The trial's folder name: `axis=value` per axis, comma-separated, then `seed=<seed>`."""
    parts = [f"{s.hparam}={v:g}" for s, v in zip(specs, point)]
    return ",".join(parts + ([f"seed={seed}"] if seed is not None else []))


def _run_trial(
    trainer: Trainer,
    base: Any,
    trial: str,
    seed: int,
    values: dict[str, float],
    options: dict[str, Any],
    repeated: bool,
) -> dict[str, Any]:
    """Trains one trial in its own folders; records a divergence instead of raising it."""
    run_dir = files.join(base.model_dir, trial) if base.model_dir else None
    export_dir = files.join(base.export_dir, trial) if base.export_dir else None
    trainer.options = dataclasses.replace(
        base, model_dir=run_dir, export_dir=export_dir, seed=seed, **options
    )
    try:
        result = trainer.train().to_dict()
        diverged = None
    except FloatingPointError as e:
        result = TrainResult(trainer.step).to_dict()
        diverged, export_dir = str(e), None
    if run_dir and trainer.is_chief:
        hparams = {**values, **({"seed": seed} if repeated else {})}
        single = len(values) == 1 and not repeated  # today's trial id: the value alone
        trial_id = f"{next(iter(values.values())):g}" if single else trial
        writer = tf.summary.create_file_writer(run_dir)
        summaries.write_hparams(writer, hparams, trial_id=trial_id)
        writer.close()
    point = {"point": values, "seed": seed}
    return {**point, "diverged": diverged, "export_dir": export_dir, **result}


def _write_config(base_dir: str, specs: Sequence[SweepSpec], seeds: list[int], metric: str) -> None:
    from tensorboard.plugins.hparams import api as hp

    hparams = [hp.HParam(s.hparam, hp.Discrete(list(s.values))) for s in specs]
    if seeds:
        hparams.append(hp.HParam("seed", hp.Discrete(seeds)))
    writer = tf.summary.create_file_writer(base_dir)
    with writer.as_default():
        hp.hparams_config(
            hparams=hparams,
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


@dataclasses.dataclass(frozen=True)
class PointRow:
    """One grid point's summary over its seeds.

    Attributes:
      point: the value by axis name.
      runs: the trials of the point; `diverged` of them diverged.
      mean, sd: the held-out metric's mean and sample standard deviation (ddof=1) over the
        trials that did not diverge (NaN where none did; sd NaN with a single one).
      gap_mean, gap_sd: the same for the metric's generalisation gap (`result["gap"]`, train
        minus eval), NaN where the results carry none.
      mark: "best", "within 1 sd" (|mean − best mean| ≤ the best point's sd), or "".
      export_dirs: the trials' exports.
    """

    point: dict[str, float]
    runs: int
    diverged: int
    mean: float
    sd: float
    gap_mean: float
    gap_sd: float
    mark: str
    export_dirs: tuple[str, ...]


def _mean_sd(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
    return float(np.mean(values)), sd


def point_rows(results: list[dict[str, Any]], metric: str, mode: str) -> list[PointRow]:
    """The trials of `run_sweep` grouped by point, ranked by the mean of `metric` (best
    first; points where every trial diverged last), the best and those within one sd of
    it marked: |mean − best mean| ≤ sd of the best point (no mark without that sd)."""
    grouped: dict[tuple, list[dict[str, Any]]] = {}
    for result in results:
        grouped.setdefault(tuple(result["point"].items()), []).append(result)
    rows = []
    for key, trials in grouped.items():
        kept = [r for r in trials if not r["diverged"]]
        mean, sd = _mean_sd([r["eval"].get(metric, math.nan) for r in kept])
        gaps = [(r.get("gap") or {}).get(metric, math.nan) for r in kept]
        gap_mean, gap_sd = _mean_sd(gaps)
        exports = tuple(r["export_dir"] for r in kept if r["export_dir"])
        rows.append(PointRow(dict(key), len(trials), len(trials) - len(kept), mean, sd,
                             gap_mean, gap_sd, "", exports))  # fmt: skip
    sign = 1.0 if mode == "min" else -1.0
    rows.sort(key=lambda r: (math.isnan(r.mean), sign * r.mean if not math.isnan(r.mean) else 0))
    if rows and math.isfinite(rows[0].mean):
        best = rows[0]
        marked = [dataclasses.replace(best, mark="best")]
        for row in rows[1:]:
            near = math.isfinite(row.mean) and abs(row.mean - best.mean) <= best.sd
            marked.append(dataclasses.replace(row, mark="within 1 sd") if near else row)
        rows = marked
    return rows


def _cell(mean: float, sd: float) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.6g} ± {sd:.2g}" if math.isfinite(sd) else f"{mean:.6g} ± -"


def grid_table(
    specs: Sequence[SweepSpec],
    results: list[dict[str, Any]],
    metric: str,
    mode: str,
    seeds: Sequence[int],
) -> str:
    """The grid's table: one line per point (see `point_rows`), ranked, with the mean ± sd of
    the held-out metric and of its gap over the seeds, the diverged trials counted, and the
    best and those within one sd of it marked; then a line on how it was computed."""
    rows = point_rows(results, metric, mode)
    names = [s.hparam for s in specs]
    widths = [max(len(n), 10) for n in names]
    head = "  ".join(f"{n:>{w}}" for n, w in zip(names, widths))
    lines = [f"rank  {head}  {'held-out ' + metric:>26}  {'gap ' + metric:>22}  runs"]
    for rank, row in enumerate(rows, 1):
        axes = "  ".join(f"{row.point[n]:>{w}g}" for n, w in zip(names, widths))
        runs = f"{row.diverged}/{row.runs} diverged" if row.diverged else f"{row.runs}"
        mark = {"best": "  <- best", "within 1 sd": "  <- within 1 sd of best"}.get(row.mark, "")
        metric_cell, gap_cell = _cell(row.mean, row.sd), _cell(row.gap_mean, row.gap_sd)
        lines.append(f"{rank:>4}  {axes}  {metric_cell:>26}  {gap_cell:>22}  {runs}{mark}")
    diverged = sum(1 for r in results if r["diverged"])
    seed_text = f"seeds {seeds[0]}..{seeds[-1]}" if len(seeds) > 1 else f"seed {seeds[0]}"
    lines.append(
        f"mean ± sample sd (ddof=1) over {seed_text}; {diverged} of {len(results)} runs "
        "diverged, left out."
    )
    lines.append(f"{mode} is best; within 1 sd: |mean - best mean| <= the best point's sd.")
    if rows and rows[0].mark == "best" and rows[0].export_dirs:
        best = ",".join(f"{n}={rows[0].point[n]:g}" for n in names)
        lines.append(f"best: {best}, exported to {', '.join(rows[0].export_dirs)}")
    return "\n".join(lines)
