"""The penalty base: `Penalty` (phases inferred from its methods), `Strength`, `StepContext`."""

from __future__ import annotations

import contextlib
import dataclasses
import reprlib
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import tensorflow as tf

from trainer.errors import ConfigError, check_float32, check_non_negative
from trainer.penalties import selection
from trainer.penalties.schedules import StrengthSchedule, as_schedule
from trainer.penalties.selection import Selector


class Strength:
    """A non-negative penalty strength (λ, a rate), declared as a class attribute of a `Penalty`.

    Assign it a number (validated by `check`: finite, ≥ 0, 0 or a normal float32). Once the
    penalty is built (`Penalty.build`, which the Trainer calls under its distribution
    strategy's scope) the value lives in a non-trainable float32 `tf.Variable`: inside a
    `tf.function` (`loss`, `update`) the attribute reads as that variable, so
    `self.scale * ...` follows every later assignment (a schedule, a sweep) without
    retracing; outside one it reads as a float.

    With a schedule (`Penalty`'s `schedule=`), an assignment sets the base of the curve
    (the value in force follows from the next step) and the variable holds the value in
    force (`base · m(step)`, written by the step's first stage), which reads give once the
    penalty is built; `params()` shows the base.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, penalty: Any, owner: type | None = None) -> Any:
        if penalty is None:
            return self
        at_step = penalty.__dict__.get("_strengths_at_step", {})
        if self.name in at_step and tf.inside_function():
            return at_step[self.name]
        variable = penalty.__dict__.get("_strength_variables", {}).get(self.name)
        if variable is not None:
            return variable if tf.inside_function() else float(variable.numpy())
        values = penalty.__dict__.get("_strength_values", {})
        if self.name not in values:
            raise AttributeError(
                f"{type(penalty).__name__}.{self.name} is a Strength that was never assigned; "
                f"set `self.{self.name} = ...` in __init__."
            )
        if tf.inside_function():
            raise RuntimeError(
                f"{type(penalty).__name__}.{self.name} read inside a tf.function before the "
                "penalty was built: call `penalty.build(variables)` first (the Trainer does), "
                "or the value would be frozen into the graph."
            )
        return values[self.name]

    def check(self, value: Any) -> float:
        """Returns `value` as a float if this strength may take it; `__set__` and sweeps call it.

        Raises:
          ConfigError: naming the strength: `value` is not a finite number ≥ 0, or not 0 or
            a normal float32 (see `errors.check_float32`).
        """
        return check_float32(self.name, check_non_negative(self.name, value))

    def __set__(self, penalty: Any, value: Any) -> None:
        value = self.check(value)
        penalty.__dict__.setdefault("_strength_values", {})[self.name] = value
        if self.name in penalty.__dict__.get("_schedules", {}):
            penalty._anchor_schedule(self.name)
            base = penalty.__dict__.get("_strength_bases", {}).get(self.name)
            if base is not None:  # the value in force follows at the next step
                base.assign(value)
            return
        variable = penalty.__dict__.get("_strength_variables", {}).get(self.name)
        if variable is not None:
            variable.assign(value)


@dataclasses.dataclass(frozen=True)
class StepContext:
    """What a penalty's `update` may need to know about the current step.

    Attributes:
      learning_rate: the optimizer's learning rate for this step (a schedule evaluated at
        the step), a float32 scalar tensor.
      schedule_multiplier: `learning_rate` divided by the schedule's value at step 0 (the
        η_t of Loshchilov & Hutter); 1.0 without a schedule.
    """

    learning_rate: tf.Tensor
    schedule_multiplier: tf.Tensor


# Each phase's flag and the method whose override gives it, in the order of a step.
PHASES = (("has_loss", "loss"), ("has_update", "update"), ("has_project", "project"))


class Penalty:
    """Base class of regularization penalties.

    A penalty acts on a selection of a model's trainable variables, resolved once when the
    model is built (`select`, a pure query), after which `build` creates its state (the
    strength variables, anything a subclass adds). It acts in up to three phases of each
    optimizer step, each a method it overrides:

    - `loss(variables)`: a term added to the loss, before the gradients;
    - `update(variables, context)`: a direct update of its variables before the optimizer's
      (decoupled weight decay);
    - `project(variables)`: a direct update after the optimizer's (max-norm, non-negativity).

    Which phases a class has (`has_loss`, `has_update`, `has_project`) is inferred from the
    methods it or its bases override; a class may still declare them, consistently. A penalty
    that decays its variables (`w ← w − d·w`) says so with `decays = True`, so that a variable
    decayed by it and by the optimizer's own `weight_decay` (or another decay) is refused.

    Subclasses declare strengths as `Strength()` class attributes, take `**selection` in
    their constructor and pass it on: the base class handles `include`, `exclude` and
    `name`, and `params` (shown in `repr` and the penalty table) lists the strengths.

    Selection: `include` and `exclude` are regexes searched in `variable.path` (Keras 3,
    e.g. `"sequential/dense/kernel"`) or predicates taking the variable. A variable is
    selected if `include` matches it (or, without `include`, if `default_selection` accepts
    it) and `exclude` does not. A regex that matches no variable at all, or a selection
    that is empty, is an error: a typo must not turn a penalty into a silent no-op.

    Schedules: any strength can follow a `StrengthSchedule` over the optimizer steps
    (`schedule='cosine(end=1e-5)'`): the value given is the curve's start, an assignment
    later (a sweep) scales the curve. A penalty with one strength takes one schedule; one
    with several takes a dict by strength name (`{'alpha': 'warmup(steps=100)'}`), so that
    each `end` is in its strength's units. The Trainer writes the value in force into the
    strength's variable at the start of each step (`step.schedules.StrengthSchedules`).

    Args:
      include: regex or predicate choosing variables; None for the default selection.
      exclude: regex or predicate removing variables from the selection; None for none.
      name: the name in logs (`penalty/<name>`); defaults to the registered name.
      schedule: None (constant strengths); a spec string or a `StrengthSchedule` for the
        one strength; or a dict of those by strength name.

    Raises:
      TypeError: the class overrides none of `loss`, `update`, `project` (when instantiated).
      ConfigError: naming the penalty: a bad schedule spec, a schedule on a penalty without
        strengths, one schedule for several strengths, or `end` ≠ 0 with a start value of 0.
    """

    registered_name: ClassVar[str | None] = None
    # Inferred for each subclass from the methods it overrides (`PHASES`).
    has_loss: ClassVar[bool] = False  # adds `loss(variables)` to the loss
    has_update: ClassVar[bool] = False  # calls `update(variables, context)` before the optimizer
    has_project: ClassVar[bool] = False  # calls `project(variables)` after the optimizer
    # Whether its direct updates decay the weights: two decays on one variable are refused.
    decays: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for flag, method in PHASES:
            implemented = getattr(cls, method) is not getattr(Penalty, method)
            declared = cls.__dict__.get(flag)
            # A declaration in this class body must agree with what the class (or a base)
            # implements; an inherited flag is recomputed here, so it always does.
            if declared is not None and declared != implemented:
                fix = "drop the declaration" if implemented else f"implement {method}()"
                raise TypeError(
                    f"{cls.__name__} declares `{flag} = {declared!r}` but "
                    f"{'overrides' if implemented else 'does not override'} {method}(): "
                    f"{fix} (phases are inferred from the methods a penalty overrides)."
                )
            setattr(cls, flag, implemented)

    def __init__(
        self,
        *,
        include: Selector = None,
        exclude: Selector = None,
        name: str | None = None,
        schedule: Any = None,
    ):
        if not any(getattr(self, flag) for flag, _ in PHASES):
            raise TypeError(
                f"{type(self).__name__} must implement loss(), update() or project() "
                "(it overrides none of them)."
            )
        if name is not None and not (isinstance(name, str) and name.isidentifier()):
            raise ConfigError(f"`name` ({name!r}) must be an identifier, e.g. 'l2_kernels'.")
        self.include = include
        self.exclude = exclude
        self._include = selection.compile_selector("include", include)
        self._exclude = selection.compile_selector("exclude", exclude)
        self.name = name or self.registered_name or type(self).__name__.lower()
        self._schedules = self._check_schedule(schedule)
        self._schedule_ratios: dict[str, float] = {}
        for strength in self._schedules:
            if strength in self.__dict__.get("_strength_values", {}):  # assigned before
                self._anchor_schedule(strength)

    def _check_schedule(self, schedule: Any) -> dict[str, StrengthSchedule]:
        """`schedule` by strength name (see the class docstring); raises a ConfigError."""
        if schedule is None:
            return {}
        owner = f"penalty {self.name!r}"
        names = self.strength_names()
        if not names:
            raise ConfigError(
                f"{owner}: `schedule` ({schedule!r}) given, but {type(self).__name__} has no "
                "strength to schedule."
            )
        if not isinstance(schedule, dict):
            if len(names) > 1:
                raise ConfigError(
                    f"{owner}: `schedule` ({schedule!r}) must be a dict by strength name, "
                    f"e.g. {{{names[0]!r}: 'cosine(end=0.0)'}}: it has strengths "
                    f"{', '.join(names)}."
                )
            schedule = {names[0]: schedule}
        unknown = sorted(set(schedule) - set(names))
        if unknown:
            raise ConfigError(
                f"{owner}: `schedule` ({schedule!r}) names {', '.join(map(repr, unknown))}; "
                f"its strengths: {', '.join(names)}."
            )
        try:
            return {k: as_schedule(v) for k, v in schedule.items()}
        except ConfigError as e:
            raise ConfigError(f"{owner}: {e}") from None

    def _anchor_schedule(self, strength: str) -> None:
        """On the strength's first assignment, fixes the ratio its schedule's `end` keeps,
        and checks that the strength may take the curve's lowest value (a max_norm bound
        must stay > 0: no warmup from 0, no decay to 0)."""
        if strength not in self._schedule_ratios:
            value = self._strength_values[strength]
            owner = f"penalty {self.name!r} ({strength}={value:g})"
            schedule = self._schedules[strength]
            ratio = schedule.ratio(value, owner)
            lowest = 0.0 if schedule.warmup else ratio if schedule.kind != "constant" else 1.0
            try:
                getattr(type(self), strength).check(value * lowest)
            except ConfigError as e:
                raise ConfigError(
                    f"{owner}: schedule {schedule.spec()!r} takes it to {value * lowest:g}: {e}"
                ) from None
            self._schedule_ratios[strength] = ratio

    @property
    def schedules(self) -> dict[str, StrengthSchedule]:
        """The strengths' schedules by strength name; empty when none has one."""
        return dict(self.__dict__.get("_schedules", {}))

    def scheduled_value(self, strength: str, step: Any, default_steps: int) -> tf.Tensor:
        """The value of the scheduled `strength` at the optimizer step `step` (after `build`):
        its base variable times its schedule's multiplier, a float32 scalar tensor.

        Args:
          strength: a strength name in `schedules`.
          step: the optimizer's `iterations` (an integer tensor).
          default_steps: the schedule's `steps` when it has none (the run's `train_steps`).
        """
        base = self.__dict__["_strength_bases"][strength]
        ratio = self._schedule_ratios[strength]
        multiplier = self._schedules[strength].multiplier(step, ratio, default_steps)
        return tf.convert_to_tensor(base) * multiplier

    @contextlib.contextmanager
    def scheduled_at(self, step: Any, default_steps: int) -> Iterator[None]:
        """Within it, while tracing, the scheduled strengths read as their values at `step`
        (`scheduled_value`) instead of the value in force: for the per-step summaries, which
        show the next step's values, as the learning rate's."""
        self._strengths_at_step = {
            name: self.scheduled_value(name, step, default_steps) for name in self.schedules
        }
        try:
            yield
        finally:
            del self._strengths_at_step

    @classmethod
    def strength_names(cls) -> list[str]:
        """The names of the declared `Strength`s, base classes' first."""
        names: list[str] = []
        for klass in reversed(cls.__mro__):
            names += [k for k, v in vars(klass).items() if isinstance(v, Strength)]
        return list(dict.fromkeys(names))

    def default_selection(self, variable: Any) -> bool:
        """Which variables are selected when `include` is None; all of them here."""
        del variable
        return True

    def select(self, variables: Sequence[Any]) -> list[Any]:
        """This penalty's selection among `variables` (creates nothing).

        Args:
          variables: the model's trainable variables.

        Returns:
          The selected variables, in their original order.

        Raises:
          ConfigError: a regex matches no variable path, or nothing is selected.
        """
        return selection.select(
            variables,
            include=self._include,
            exclude=self._exclude,
            default=self.default_selection,
            owner=repr(self),
        )

    def build(self, variables: Sequence[Any]) -> None:
        """Creates the penalty's state for its selected `variables`: the strength variables.

        The Trainer calls it once, under its strategy's scope; a subclass with state of its
        own (e.g. anchors) overrides it and calls `super().build(variables)`.
        """
        del variables
        created = self.__dict__.setdefault("_strength_variables", {})
        bases = self.__dict__.setdefault("_strength_bases", {})
        for name in self.strength_names():
            if name not in created:
                value = getattr(self, name)
                created[name] = tf.Variable(value, trainable=False, dtype=tf.float32, name=name)
                if name in self.__dict__.get("_schedules", {}):  # not checkpointed: given now
                    bases[name] = tf.Variable(value, trainable=False, name=f"{name}_base")

    @property
    def built(self) -> bool:
        """Whether `build` has run."""
        return "_strength_variables" in self.__dict__

    def state_variables(self) -> list[tf.Variable]:
        """Variables to checkpoint with the run: the strengths; override to add state."""
        return list(self.__dict__.get("_strength_variables", {}).values())

    def strength(self, name: str) -> tf.Variable:
        """The variable holding the `Strength` called `name` (after `build`)."""
        if not self.built:
            raise RuntimeError(f"{self!r} is not built: call build(variables) first.")
        return self._strength_variables[name]

    def loss(self, variables: Sequence[Any]) -> tf.Tensor:
        """The loss term for the selected `variables`: a float32 scalar."""
        raise NotImplementedError

    def update(self, variables: Sequence[Any], context: StepContext) -> None:
        """Updates the selected `variables` directly, before the optimizer's update.

        Called with the gradients already computed from the pre-update weights, once per
        optimizer step (in cross-replica context under a strategy), skipped on the steps a
        loss-scale optimizer skips.
        """
        raise NotImplementedError

    def project(self, variables: Sequence[Any]) -> None:
        """Updates the selected `variables` directly, after the optimizer's update.

        Called once per optimizer step (in cross-replica context under a strategy), before
        the EMA of the weights, and skipped on the steps a loss-scale optimizer skips: e.g.
        `v.assign(clip_norm(v))`, as a Keras constraint after `apply_gradients`.
        """
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        """The arguments shown in `repr` and the penalty table: the strengths (their bases
        when scheduled) by default, and `schedule` as a spec (a dict with several)."""
        schedules = self.__dict__.get("_schedules", {})
        params: dict[str, Any] = {
            name: self._strength_values[name] if name in schedules else getattr(self, name)
            for name in self.strength_names()
        }
        if schedules:
            specs = {k: v.spec() for k, v in schedules.items()}
            several = len(self.strength_names()) > 1
            params["schedule"] = specs if several else next(iter(specs.values()))
        return params

    def __repr__(self) -> str:
        args = dict(self.params())
        for key in ("include", "exclude"):
            value = getattr(self, key)
            if value is not None:
                args[key] = getattr(value, "__name__", value) if callable(value) else value
        if self.name != (self.registered_name or type(self).__name__.lower()):
            args["name"] = self.name
        return f"{type(self).__name__}({', '.join(f'{k}={_short(v)}' for k, v in args.items())})"


def check_loss_term(penalty: Penalty, value: Any) -> tf.Tensor:
    """Returns `value`, what `penalty.loss(...)` returned, if it is a float32 scalar tensor.

    The Trainer calls it once at build, eagerly: another kind of term would fail deep in
    the compiled step, without naming the penalty.

    Raises:
      ConfigError: naming the penalty: `value` is None, not a tensor, not float32, or not a
        scalar.
    """
    if value is None or not tf.is_tensor(value):
        got = "None" if value is None else f"a {type(value).__name__}, {reprlib.repr(value)}"
    elif value.dtype != tf.float32:
        got = f"a {value.dtype.name} tensor"
    elif value.shape.rank != 0:
        got = f"a tensor of shape {tuple(value.shape)}"
    else:
        return value
    raise ConfigError(f"{penalty!r}.loss() returned {got}; it must return a float32 scalar tensor.")


def _short(value: Any) -> str:
    """`repr`, with floats read back from float32 variables shown as typed (1e-4, not 9.99e-05)."""
    return repr(float(f"{value:.7g}")) if isinstance(value, float) else repr(value)
