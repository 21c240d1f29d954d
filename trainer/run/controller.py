"""The outer loop: model_dir, checkpoint and eval cadence, signals, progress, results, export."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from signal import SIGINT, SIGTERM, Signals
from typing import TYPE_CHECKING, Any

import tensorflow as tf
from absl import logging

from trainer.distribution import is_default, sum_over_workers
from trainer.inputs import InputWait
from trainer.run import files, records, resume, summaries
from trainer.run.agreement import start_from_chief
from trainer.run.callbacks import CallbackList
from trainer.run.checkpointing import Checkpointer
from trainer.run.export import export_saved_model
from trainer.run.hooks import Hooks, TaskHooks
from trainer.run.keras_callbacks import as_callbacks
from trainer.run.lock import RefreshLock, RunLock
from trainer.run.profiling import Profile
from trainer.run.progress import Progress, ShowProgress, format_losses
from trainer.run.protocol import Runnable
from trainer.run.rollback import Rollback
from trainer.run.signals import INTERRUPTED_EXIT_STATUS, StopSignals
from trainer.run.summaries import WriteScalars
from trainer.run.watch import Watch

if TYPE_CHECKING:
    from trainer.penalties.base import Penalty


class Preempted(Exception):
    """`train()` stopped on SIGTERM or SIGINT at a loop boundary; rerunning resumes.

    With a `model_dir` the step reached is saved first; without one nothing is. Under
    MultiWorkerMirroredStrategy a signal to any worker stops every worker at the same step:
    as SIGTERM if any worker received one, else as SIGINT.

    Attributes:
      step: the step reached (and saved).
      path: the checkpoint saved; None without a `model_dir`, and on a non-chief worker.
      signal: `signal.SIGTERM` (preemption) or `signal.SIGINT` (Ctrl-C).
      saved_by_chief: on a non-chief worker of a multi-worker run with a `model_dir`: the
        chief saved the step, in its own `model_dir`; this worker keeps no checkpoint (on
        resume it takes the chief's state).
      exit_status: the CLI's exit status: `EXIT_STATUS` (42) after SIGTERM, 130 (128 +
        SIGINT, as shells report Ctrl-C) after SIGINT.
    """

    EXIT_STATUS = 42  # after SIGTERM, as TensorFlow's PreemptionCheckpointHandler

    def __init__(
        self,
        step: int,
        path: str | None,
        signal: Signals = SIGTERM,
        *,
        elsewhere: bool = False,
        saved_by_chief: bool = False,
    ):
        what = "Preempted" if signal == SIGTERM else "Interrupted"
        cause = f"{signal.name} to another worker" if elsewhere else signal.name
        if saved_by_chief:
            super().__init__(
                f"{what} ({cause}): the chief saved step {step} (this worker keeps no "
                "checkpoint); rerun every worker to resume."
            )
        elif path:
            super().__init__(f"{what} ({cause}): saved step {step} to {path}; rerun to resume.")
        else:
            super().__init__(f"{what} ({cause}) at step {step}; nothing saved (no model_dir).")
        self.step = step
        self.path = path
        self.signal = signal
        self.saved_by_chief = saved_by_chief

    @property
    def exit_status(self) -> int:
        """42 (`EXIT_STATUS`) after SIGTERM, 130 after SIGINT."""
        return self.EXIT_STATUS if self.signal == SIGTERM else INTERRUPTED_EXIT_STATUS


@dataclasses.dataclass
class TrainResult:
    """What `Trainer.train()` returns; `results.json` in `model_dir` is `to_dict()`.

    With a `model_dir`, `results.json` is rewritten (atomically) as the run goes: at every
    evaluation and checkpoint (before the checkpoint, so that a checkpoint never holds an
    evaluation the file lacks), on SIGTERM or SIGINT, and at the end before the export. A
    resumed run reads it back and keeps the evaluations up to the step it resumes from,
    each once; later ones (made after the checkpoint resumed from) are dropped and made
    again, as are those a rollback (`on_nonfinite=rollback`) undoes.

    The times (`steps_per_sec`, `first_loop_sec`, `eval_sec`, `checkpoint_sec`,
    `input_wait_share`) are this process's: in a resumed run they cover the part trained
    since the resume; a rerun that trains no step (a finished or early-stopped run) keeps
    those of the run that trained.

    Attributes:
      step: the step reached.
      steps_per_sec: the training rate: steps over the train loops' own time, the first
        loop's left out (0.0 when only one loop ran). Evaluations, checkpoints, writing
        results and callbacks are not in it.
      first_loop_sec: the first loop's time, tracing and compiling included.
      train: the loss breakdown (`loss`, `data_loss`, `penalty/<name>`, ...), mean of the
        last loop; empty when nothing was trained.
      eval: the latest evaluation's held-out metrics (at the end, once finished); empty
        without an eval dataset.
      history: the evaluations during training, `{"step": ..., **metrics}` each.
      input_wait_share: the share of the train loops' time (after the first) spent waiting
        for the next batch of a tf.data input; None for in-memory input (`train_arrays`).
      stopped_early: whether a callback ended the run before `train_steps`:
        `early_stop_patience`, or one of `Trainer(callbacks=...)` (a Keras callback setting
        `model.stop_training`).
      best: the best evaluation by the task's held-out metric, `{"step": ..., **metrics}`;
        None before any evaluation.
      rollbacks: the rollbacks `on_nonfinite=rollback` made in this run.
      eval_sec: the evaluations' total time (`Trainer.evaluate`).
      checkpoint_sec: the checkpoints' total time (saving them).
      train_eval: the latest evaluation on the training slice (`train_eval_examples`),
        with the same keys as `eval`; empty when off.
      gap: `train_eval[k] - eval[k]` for each key of both; empty when off. The history's
        entries then also hold `train_eval/<k>` and `gap/<k>`.
    """

    step: int
    steps_per_sec: float = 0.0
    first_loop_sec: float = 0.0
    train: dict[str, float] = dataclasses.field(default_factory=dict)
    eval: dict[str, float] = dataclasses.field(default_factory=dict)
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)
    input_wait_share: float | None = None
    stopped_early: bool = False
    best: dict[str, float] | None = None
    rollbacks: int = 0
    eval_sec: float = 0.0  # last: the fields before keep their positions
    checkpoint_sec: float = 0.0
    train_eval: dict[str, float] = dataclasses.field(default_factory=dict)
    gap: dict[str, float] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict (what `results.json` holds)."""
        return dataclasses.asdict(self)


RESULTS = "results.json"
_EVALUATION = records.Record(
    {"step": int}, required=("step",), rest=records.Optional(records.NUMBER)
)
RESULTS_SCHEMA = records.Record(
    {
        "step": int,
        "steps_per_sec": records.NUMBER,
        "first_loop_sec": records.NUMBER,
        "eval_sec": records.NUMBER,
        "checkpoint_sec": records.NUMBER,
        "train": records.METRICS,
        "eval": records.METRICS,
        "history": records.ListOf(_EVALUATION),
        "input_wait_share": records.Optional(records.NUMBER),
        "stopped_early": bool,
        "best": records.Optional(_EVALUATION),
        "rollbacks": int,
        "train_eval": records.METRICS,
        "gap": records.METRICS,
    },
    required=("step",),
)
"""What `results.json` must hold to be read back (`records`); unknown keys are accepted."""


def make_checkpointer(trainer: Runnable, model_dir: str) -> Checkpointer:
    """A `Checkpointer` of `trainer`'s whole state in `model_dir`, with its settings."""
    return Checkpointer(
        model_dir,
        task=trainer.registered_name or type(trainer).__name__,
        model_variables=list(trainer.model.variables),
        objects=trainer.checkpoint_objects(),
        penalty_states=_penalty_states(trainer.penalties),
        settings=resume.settings(trainer),
        chief=trainer.is_chief,
    )


def _penalty_states(penalties: Sequence[Penalty]) -> dict[str, list[Any]]:
    """Each penalty's state by name, without its strengths (the values given now are in
    force on resume), e.g. L2-SP's anchors."""
    states = {}
    for p in penalties:
        strengths = {id(p.strength(name)) for name in p.strength_names()}
        states[p.name] = [v for v in p.state_variables() if id(v) not in strengths]
    return states


class Controller:
    """Runs a trainer's training: loops between evaluations, checkpoints and signals.

    Everything that happens between two calls of the compiled loop lives here, or in the
    run's callbacks (`callbacks.Callback`), called in this order:

    1. `profiling.Profile`: the `profile_steps` trace (loops are cut at its steps).
    2. `progress.ShowProgress`: the progress line and the eval lines.
    3. `summaries.WriteScalars`: `steps_per_sec` and `eval/<metric>` in TensorBoard.
    4. `lock.RefreshLock`: the `model_dir` lock's time (with a `model_dir`, on the chief).
    5. `watch.Watch`: the best evaluation (`keep_best`) and `early_stop_patience`.
    6. `rollback.Rollback`: `on_nonfinite=rollback`.
    7. `hooks.TaskHooks`: the task's `on_loop_end`, `on_evaluate`, `on_train_end`.
    8. `trainer.callbacks`, in their order; Keras ones through `KerasCallback`.

    The controller reads the trainer only through `protocol.Runnable`.

    Args:
      trainer: what to train (a `Trainer`), with its `options`.
    """

    def __init__(self, trainer: Runnable):
        self.trainer = trainer
        self.options = trainer.options

    def train(self) -> TrainResult:
        """Trains to `options.train_steps`, resuming from `model_dir`'s checkpoint if any.

        Evaluates as `options.eval_every` says, checkpoints as `options.checkpoint_every`
        says, and on SIGTERM or SIGINT (`signals.StopSignals`: a second SIGINT ends the
        process at once) saves and raises `Preempted` at the next loop boundary (evaluating
        first if an evaluation is due there). A callback (early stopping among them) may stop
        the run earlier: it is evaluated and saved. A run already at `train_steps` is not
        retrained (evaluated if its results hold no evaluation). With `model_dir`, keeps
        `results.json` there as the run goes (see `TrainResult`).

        Raises:
          FloatingPointError: a loss term or weight became non-finite (the message names the
            step and the term); nothing non-finite is saved.
          Preempted: SIGTERM or SIGINT arrived (on any worker); with a `model_dir`, a
            checkpoint was saved.
          ConfigError: `model_dir` is unwritable, holds another task's or model's run, or a
            damaged `results.json` (left as it is).
          files.WriteError: a checkpoint, `results.json` or the export could not be written.
        """
        trainer, opts = self.trainer, self.options
        model_dir = files.writable_dir("model_dir", opts.model_dir) if opts.model_dir else None
        if opts.export_dir and trainer.is_chief:
            files.writable_dir("export_dir", opts.export_dir)  # before training, not after
        lock = RunLock(model_dir) if model_dir and trainer.is_chief else None
        if lock:
            lock.acquire()
        try:
            return self._train(model_dir, lock)
        finally:
            if lock:
                lock.release()

    def _callbacks(
        self, model_dir: str | None, checkpointer: Checkpointer | None, lock: RunLock | None
    ) -> CallbackList:
        """The run's callbacks, in the order of the class docstring."""
        trainer, opts = self.trainer, self.options
        self.clock = _Clock()
        self.results_path = (
            files.join(model_dir, RESULTS) if model_dir and trainer.is_chief else None
        )
        self.progress = Progress(opts.train_steps)
        self.profile = Profile(opts.profile_steps, model_dir, opts.train_steps)
        self.watch = Watch(trainer, model_dir)
        self.rollback = Rollback(trainer, checkpointer)
        return CallbackList(
            [
                self.profile,
                ShowProgress(self.progress, self.clock.last_rate),
                WriteScalars(trainer.train_loop, self.clock.last_rate),
                *([RefreshLock(lock)] if lock else []),
                self.watch,
                self.rollback,
                *([TaskHooks(trainer)] if isinstance(trainer, Hooks) else []),
                *as_callbacks(trainer.callbacks, trainer),
            ]
        )

    def _train(self, model_dir: str | None, lock: RunLock | None) -> TrainResult:
        trainer, opts = self.trainer, self.options
        loop = trainer.train_loop
        previous = (
            records.read(files.join(model_dir, RESULTS), RESULTS_SCHEMA) if model_dir else None
        )
        checkpointer = make_checkpointer(trainer, model_dir) if model_dir else None
        callbacks = self._callbacks(model_dir, checkpointer, lock)
        states = callbacks.checkpoint_states()
        if checkpointer and states:
            checkpointer.track("callbacks", states, restore=False)  # restored below
        iterator = None
        if not loop.in_memory and is_default(trainer.strategy):
            iterator = iter(trainer.train_dataset())
            if checkpointer:
                checkpointer.track("iterator", iterator, restore=self._same_input(checkpointer))
        if checkpointer:
            if trainer.is_chief:
                checkpointer.remove_temporary()
                _remove_temporary_results(model_dir)
            if checkpointer.latest or opts.resume_from:
                for line in resume.changes(checkpointer.saved_settings, resume.settings(trainer)):
                    logging.info("Resuming with a change: %s", line)
            if checkpointer.restore(opts.resume_from):
                if trainer.is_chief:
                    _warn_if_history_lost(model_dir, previous, trainer.step)
                if states:  # a checkpoint without a callback's state leaves it as it is
                    path = opts.resume_from or checkpointer.latest
                    if "watch" in states:  # where checkpoints before the callbacks kept it
                        tf.train.Checkpoint(runs=states["watch"]).restore(path).expect_partial()
                    tf.train.Checkpoint(callbacks=states).restore(path).expect_partial()
        checkpointed = {  # as each worker restored it from its own model_dir
            "model_variables": list(trainer.model.variables),
            **trainer.checkpoint_objects(),
            "penalties": _penalty_states(trainer.penalties),
            "callbacks": states,
        }
        start_from_chief(trainer.strategy, checkpointed, trainer.step)  # the chief's is the run's
        if not loop.in_memory and iterator is None:  # a distributed iterator cannot be saved
            iterator = iter(trainer.train_batches(skip=trainer.step))
        if trainer.step >= opts.train_steps:
            logging.info("Already at step %d of %d: not training.", trainer.step, opts.train_steps)
        if loop.set_summary_dir(model_dir if trainer.is_chief else None):
            summaries.write_text(loop.writer, "penalties", trainer.penalty_table(), trainer.step)
        try:
            with StopSignals() as stops:
                result = self._loops(iterator, checkpointer, stops, callbacks, previous)
        finally:
            self.profile.close()
            if loop.writer is not None:
                loop.writer.flush()
            if checkpointer:
                checkpointer.close()
        self._write_results(result)  # before the export: a failed export leaves it
        if opts.export_dir and trainer.is_chief:

            def export() -> None:
                with trainer.evaluated_weights():
                    export_saved_model(trainer, opts.export_dir)

            if not files.writing(
                f"the best model to `export_dir` ({opts.export_dir!r})",
                lambda: self.watch.export_best(opts.export_dir),
            ):
                files.writing(f"the model to `export_dir` ({opts.export_dir!r})", export)
        callbacks.on_train_end(result)
        return result

    def _same_input(self, checkpointer: Checkpointer) -> bool:
        """Whether a saved input iterator can continue: its position is in batches of the
        saved batch size, its order from the saved seed. If either changed, the new values
        are in force and the data starts over (logged)."""
        saved = checkpointer.saved_settings or {}
        changed = [
            k for k in ("batch_size", "seed") if k in saved and saved[k] != getattr(self.options, k)
        ]
        if changed and checkpointer.latest:
            logging.info(
                "%s changed: the input iterator starts over instead of continuing.",
                " and ".join(changed),
            )
        return not changed

    def _next_stop(self, step: int, cuts: Sequence[int]) -> int:
        """The step the next loop ends at: cut short at eval and checkpoint boundaries and at
        the callbacks' `loop_cuts`."""
        opts = self.options
        stop = min(step + opts.steps_per_loop, opts.train_steps)
        for every in (opts.eval_every, opts.checkpoint_every if opts.model_dir else 0):
            if every:
                stop = min(stop, (step // every + 1) * every)
        return min([stop] + [cut for cut in cuts if cut > step])

    def _loops(
        self,
        iterator: Any,
        checkpointer: Checkpointer | None,
        stops: StopSignals,
        callbacks: CallbackList,
        previous: dict[str, Any] | None,
    ) -> TrainResult:
        trainer, opts = self.trainer, self.options
        loop, clock, progress = trainer.train_loop, self.clock, self.progress
        step = trainer.step
        result = _continued(previous, step)
        callbacks.on_train_begin(result)
        result.best = self.watch.best
        reason = callbacks.stop_reason() if step < opts.train_steps else None
        if reason:
            logging.info("Stopped early before: %s.", reason)
            result.stopped_early = True
        while step < opts.train_steps and not result.stopped_early:
            callbacks.on_loop_begin(step)
            stop_at = self._next_stop(step, callbacks.loop_cuts())
            clock.loop_begins()
            result.train, reached = loop.run(stop_at - step, iterator)
            clock.loop_ran(loop.input_wait_s)
            try:
                _check_finite(result.train, reached)
            except FloatingPointError as e:
                if not callbacks.on_nonfinite(reached, result.train, e):
                    raise
                step, result.rollbacks = trainer.step, self.rollback.count
                result.history = [h for h in result.history if h["step"] <= step]
                self._write_results(result, step)  # back to an earlier state, and its history
                continue
            clock.loop_ends(reached - step)
            step = reached
            callbacks.on_loop_end(step, result.train)
            done = step >= opts.train_steps
            stop = None if done else self._agreed_stop(stops)
            reason = None if done or stop else callbacks.stop_reason()
            due = bool(opts.eval_every) and step % opts.eval_every == 0
            evaluated = done or reason is not None or due
            if evaluated:  # before the save: the callbacks' state counts it
                self._evaluate(step, result, callbacks)
                reason = reason or (None if done or stop else callbacks.stop_reason())
            result.stopped_early = reason is not None
            save = checkpointer is not None and (
                done
                or stop is not None
                or result.stopped_early
                or (opts.checkpoint_every and step % opts.checkpoint_every == 0)
            )
            if evaluated or save:  # before the checkpoint: it never has more than the file
                self._write_results(result, step)
            path = self._save(checkpointer, step) if save else None
            if stop:
                progress.close()
                if checkpointer:
                    checkpointer.close()
                signal, elsewhere = stop
                by_chief = checkpointer is not None and not checkpointer.chief
                raise Preempted(
                    step,
                    None if by_chief else path,
                    signal,
                    elsewhere=elsewhere,
                    saved_by_chief=by_chief,
                )
            if reason:
                progress.message(f"Stopping early at step {step}: {reason}.")
        progress.close()
        if not result.eval and step >= opts.train_steps:
            result.eval = self._timed(self.trainer.evaluate, "eval_sec")
        result.step = step
        if clock.trained:  # else the figures of the run that trained, if at this step
            clock.report(result, final=True)
        return result

    def _timed(self, call: Callable[[], Any], figure: str) -> Any:
        """`call()`, its time added to the clock's `figure` (`eval_sec`, `checkpoint_sec`)."""
        start = time.perf_counter()
        try:
            return call()
        finally:
            setattr(self.clock, figure, getattr(self.clock, figure) + time.perf_counter() - start)

    def _evaluate(self, step: int, result: TrainResult, callbacks: CallbackList) -> None:
        """Evaluates at `step` into `result` (its history, the best), and tells the callbacks."""
        result.eval = self._timed(self.trainer.evaluate, "eval_sec")
        self._evaluate_train_slice(step, result)
        if result.eval:
            result.history.append({"step": step, **result.eval, **_gap_entries(result)})
        callbacks.on_evaluate(step, result.eval)
        if result.gap:  # below the eval line
            self.progress.message(
                f"train slice at step {step}  {format_losses(result.train_eval)}  "
                f"gap (train - eval): {format_losses(result.gap)}"
            )
        result.best = self.watch.best

    def _evaluate_train_slice(self, step: int, result: TrainResult) -> None:
        """With `train_eval_examples`: the training slice's evaluation and the gap into
        `result` and to TensorBoard (`train_eval/<k>`, `gap/<k>`)."""
        if not self.options.train_eval_examples or not result.eval:
            return
        result.train_eval = self._timed(self.trainer.evaluate_train_slice, "eval_sec")
        result.gap = {
            k: result.train_eval[k] - v for k, v in result.eval.items() if k in result.train_eval
        }
        writer = self.trainer.train_loop.writer
        if writer is not None:
            summaries.write_scalars(writer, step, _gap_entries(result))

    def _save(self, checkpointer: Checkpointer, step: int) -> str:
        """Saves a checkpoint at `step`, timed; a failed write is one `WriteError` line."""
        return files.writing(
            f"checkpoint {step} to {checkpointer.directory!r}",
            lambda: self._timed(lambda: checkpointer.save(step), "checkpoint_sec"),
        )

    def _write_results(self, result: TrainResult, step: int | None = None) -> None:
        """Writes `result` to `results.json` (on the chief, with a `model_dir`), atomically;
        at `step`, with this process's figures so far, when `step` is given."""
        if self.results_path is None:
            return
        if step is not None:
            result.step = step
            if self.clock.trained:
                self.clock.report(result)
        path = self.results_path
        files.writing(path, lambda: files.write_json(path, result.to_dict()))

    def _agreed_stop(self, stops: StopSignals) -> tuple[Signals, bool] | None:
        """The stop every worker takes at this boundary: SIGTERM if one received it, else
        SIGINT if one did, else None; and whether it reached only other workers.

        Under a multi-worker strategy the flags are summed over the workers (a collective
        every worker joins: all reach the same boundaries); otherwise they are this process's.
        """
        local = stops.requested
        flags = [float(local == SIGTERM), float(local == SIGINT)]
        terms, interrupts = sum_over_workers(self.trainer.strategy, flags)
        if not (terms or interrupts):
            return None
        signal = SIGTERM if terms else SIGINT
        return signal, local != signal


class _Clock:
    """Times this process's part of a run: the train loops' own time (the first, which
    traces and compiles, apart), the evaluations' and the checkpoints'; and the share of the
    loops' time spent waiting for input."""

    def __init__(self):
        self.first_loop_sec: float | None = None
        self.eval_sec = self.checkpoint_sec = 0.0
        self.input_wait = InputWait()
        self._loops = 0
        self._loop_start = self._loop_sec = 0.0
        self._rate = 0.0
        self._steady_steps, self._steady_sec = 0, 0.0

    @property
    def trained(self) -> bool:
        """Whether a loop ran in this process."""
        return self._loops > 0

    def loop_begins(self) -> None:
        """The compiled loop is called now."""
        self._loop_start = time.perf_counter()

    def loop_ran(self, input_wait_s: float | None) -> None:
        """The compiled loop returned, after waiting `input_wait_s` for input (None: in memory)."""
        self._loop_sec = time.perf_counter() - self._loop_start
        self._loops += 1
        if self._loops == 1:
            self.first_loop_sec = self._loop_sec
        self.input_wait.add(input_wait_s, self._loop_sec)

    def loop_ends(self, steps: int) -> None:
        """The loop that ran made `steps` steps with finite losses (a non-finite one's are
        undone, and its time left out)."""
        self._rate = steps / self._loop_sec if self._loop_sec > 0 else 0.0
        if self._loops > 1:
            self._steady_steps += steps
            self._steady_sec += self._loop_sec

    def last_rate(self) -> float:
        """The last loop's steps per second."""
        return self._rate

    def report(self, result: TrainResult, final: bool = False) -> None:
        """Sets `result`'s times to this process's so far; `final` at the end of training (a
        high input wait is then warned about if it was not yet)."""
        result.steps_per_sec = (
            self._steady_steps / self._steady_sec if self._steady_sec > 0 else 0.0
        )
        result.first_loop_sec = self.first_loop_sec or 0.0
        result.eval_sec, result.checkpoint_sec = self.eval_sec, self.checkpoint_sec
        result.input_wait_share = self.input_wait.finish() if final else self.input_wait.share


def _warn_if_history_lost(model_dir: str, previous: dict[str, Any] | None, step: int) -> None:
    """Says, in one line, when the results up to `step`, the checkpoint resumed from, are
    gone (results.json missing) or end earlier (an older one, put back or left by a version
    that wrote it only at the end)."""
    path = files.join(model_dir, RESULTS)
    if previous is None:
        logging.warning(
            "%s is missing: the results up to step %d (the checkpoint resumed from), its "
            "evaluations among them, cannot be recovered; its history starts after step %d.",
            path,
            step,
            step,
        )
    elif previous["step"] < step:
        logging.warning(
            "%s ends at step %d, before the checkpoint resumed from (step %d): the "
            "evaluations between cannot be recovered; its history goes on after step %d.",
            path,
            previous["step"],
            step,
            step,
        )


def _remove_temporary_results(model_dir: str) -> None:
    """Removes the temporary files of `results.json` that a killed write left behind."""
    for path in tf.io.gfile.glob(files.join(model_dir, f"{RESULTS}.tmp-*")):
        tf.io.gfile.remove(path)


def _continued(previous: dict[str, Any] | None, step: int) -> TrainResult:
    """A result that starts with the resumed run's evaluations up to `step`; and, when its
    results were written at `step` (a finished, early-stopped or preempted run), its latest
    evaluation, training figures and times (this process may train no step)."""
    if not previous:
        return TrainResult(step)
    result = TrainResult(
        step, history=[h for h in previous.get("history", []) if h["step"] <= step]
    )
    if previous["step"] == step:
        for name in ("train", "eval", "train_eval", "gap", "steps_per_sec", "first_loop_sec",
                     "eval_sec", "checkpoint_sec", "input_wait_share"):  # fmt: skip
            if previous.get(name) is not None:
                setattr(result, name, previous[name])
    return result


def _gap_entries(result: TrainResult) -> dict[str, float]:
    """`train_eval/<k>` and `gap/<k>`, for the history and TensorBoard."""
    return {
        **{f"train_eval/{k}": v for k, v in result.train_eval.items()},
        **{f"gap/{k}": v for k, v in result.gap.items()},
    }


def _check_finite(logs: dict[str, float], step: int) -> None:
    bad = [
        name
        for name, value in logs.items()
        if name != "loss" and not name.startswith("train/") and not math.isfinite(value)
    ]
    if bad or not math.isfinite(logs.get("loss", 0.0)):
        raise FloatingPointError(
            f"Non-finite loss at step {step}: "
            + ", ".join(f"{n}={logs[n]}" for n in (bad or ["loss"]))
            + "; the last checkpoint, if any, is from before it."
        )
