"""Penalties: loss terms (L2, SelectiveL2) and direct weight updates (DecoupledWeightDecay)."""

from __future__ import annotations

import dataclasses
import reprlib
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import tensorflow as tf

from trainer import selection
from trainer.errors import ConfigError, check_choice, check_float32, check_non_negative
from trainer.registry import register_penalty
from trainer.selection import Selector, variable_path

__all__ = [
    "L2",
    "DecoupledWeightDecay",
    "Penalty",
    "SelectiveL2",
    "Selector",
    "StepContext",
    "Strength",
    "check_loss_term",
    "variable_path",
]


class Strength:
    """A non-negative penalty strength (λ, a rate), declared as a class attribute of a `Penalty`.

    Assign it a number (validated by `check`: finite, ≥ 0, 0 or a normal float32). Once the
    penalty is built (`Penalty.build`, which the Trainer calls under its distribution
    strategy's scope) the value lives in a non-trainable float32 `tf.Variable`: inside a
    `tf.function` (`loss`, `update`) the attribute reads as that variable, so
    `self.scale * ...` follows every later assignment (a schedule, a sweep) without
    retracing; outside one it reads as a float.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, penalty: Any, owner: type | None = None) -> Any:
        if penalty is None:
            return self
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


class Penalty:
    """Base class of regularization penalties.

    A penalty acts on a selection of a model's trainable variables, resolved once when the
    model is built (`select`, a pure query), after which `build` creates its state (the
    strength variables, anything a subclass adds). It contributes a term to the loss
    (declare `has_loss = True` and implement `loss`), or updates its variables directly
    after the gradients are computed (`has_update = True` and `update`), or both.

    Subclasses declare strengths as `Strength()` class attributes, take `**selection` in
    their constructor and pass it on: the base class handles `include`, `exclude` and
    `name`, and `params` (shown in `repr` and the penalty table) lists the strengths.

    Selection: `include` and `exclude` are regexes searched in `variable.path` (Keras 3,
    e.g. `"sequential/dense/kernel"`) or predicates taking the variable. A variable is
    selected if `include` matches it (or, without `include`, if `default_selection` accepts
    it) and `exclude` does not. A regex that matches no variable at all, or a selection
    that is empty, is an error: a typo must not turn a penalty into a silent no-op.

    Args:
      include: regex or predicate choosing variables; None for the default selection.
      exclude: regex or predicate removing variables from the selection; None for none.
      name: the name in logs (`penalty/<name>`); defaults to the registered name.
    """

    registered_name: ClassVar[str | None] = None
    has_loss: ClassVar[bool] = False  # adds `loss(variables)` to the loss
    has_update: ClassVar[bool] = False  # calls `update(variables, context)` every step

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for flag, method in (("has_loss", "loss"), ("has_update", "update")):
            implemented = getattr(cls, method) is not getattr(Penalty, method)
            if implemented != getattr(cls, flag):
                raise TypeError(
                    f"{cls.__name__}: declare `{flag} = True` exactly when it implements "
                    f"{method}() ({flag}={getattr(cls, flag)}, {method}() "
                    f"{'implemented' if implemented else 'not implemented'})."
                )

    def __init__(
        self, *, include: Selector = None, exclude: Selector = None, name: str | None = None
    ):
        if not (self.has_loss or self.has_update):
            raise TypeError(f"{type(self).__name__} must implement loss() or update().")
        if name is not None and not (isinstance(name, str) and name.isidentifier()):
            raise ConfigError(f"`name` ({name!r}) must be an identifier, e.g. 'l2_kernels'.")
        self.include = include
        self.exclude = exclude
        self._include = selection.compile_selector("include", include)
        self._exclude = selection.compile_selector("exclude", exclude)
        self.name = name or self.registered_name or type(self).__name__.lower()

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
        for name in self.strength_names():
            if name not in created:
                value = getattr(self, name)
                created[name] = tf.Variable(value, trainable=False, dtype=tf.float32, name=name)

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

        Called with the gradients already computed from the pre-update weights.
        """
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        """The arguments shown in `repr` and the penalty table: the strengths by default."""
        return {name: getattr(self, name) for name in self.strength_names()}

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


def _sum_of_squares(variables: Sequence[Any]) -> tf.Tensor:
    """Σ w² over all `variables`, in float32 whatever the compute dtype."""
    if not variables:
        return tf.constant(0.0)
    return tf.add_n([_square_sum(tf.cast(v, tf.float32)) for v in variables])


def square_sum(x: tf.Tensor) -> tf.Tensor:
    """Σ x² of a float tensor, fast under XLA:CPU.

    A tensor of rank ≥ 2 whose size is a multiple of 16 is reduced as a matrix-vector
    product of its squared elements, in rows of 16, with ones: XLA:CPU emits a full reduction
    as a scalar loop, which made `L2` cost ~10% of the seed MLP's step inside the compiled
    loop; the product runs vectorized (rows of 16 ran ~1.5x faster than rows of the last
    dimension, 64, on the seed MLP).
    """
    size = x.shape.num_elements()
    if size and x.shape.rank >= 2 and size % 16 == 0:
        rows = tf.reshape(tf.square(x), [-1, 16])
        return tf.reduce_sum(tf.linalg.matvec(rows, tf.ones([16], x.dtype)))
    return tf.reduce_sum(tf.square(x))


@tf.custom_gradient
def _square_sum(x: tf.Tensor) -> tuple[tf.Tensor, Callable]:
    """`square_sum(x)`, with its gradient `2x` written out (one fused op in the backward
    pass, where the tape's gradient of `reduce_sum(square(x))` is a broadcast and two
    products)."""

    def gradient(upstream: tf.Tensor) -> tf.Tensor:
        return (2.0 * upstream) * x

    return square_sum(x), gradient


def upstream_after(terms: Sequence[tf.Tensor]) -> tf.Tensor | None:
    """The loss's upstream gradient, 1, computed from the loss `terms` (`1 + 0·Σ terms`):
    pass it as `tape.gradient(..., output_gradients=...)` so that every gradient, hence
    every in-place weight update, comes after the terms' values.

    Without that order, XLA copies each weight a term reads on every step of a compiled
    loop, in case the term ran after the update: 200 KB and ~15 µs a step for the seed MLP's
    first kernel under `L2` or `L1`. The one difference: a non-finite term makes every
    gradient NaN, where the loss is already non-finite and the loop stops on it. None when
    there are no terms.
    """
    if not terms:
        return None
    return 1.0 + 0.0 * tf.add_n([tf.cast(t, tf.float32) for t in terms])


@register_penalty("l2")
class L2(Penalty):
    """`scale · Σ w²` over all trainable variables: the Keras `l2` regularizer's convention.

    Note there is no ½: `L2(λ)` on a kernel equals `kernel_regularizer=keras.regularizers.l2(λ)`,
    and its gradient is `2λw`.

    Args:
      scale: λ, a non-negative number.
      **selection: `include`, `exclude`, `name`; see `Penalty`.
    """

    scale = Strength()
    has_loss = True

    def __init__(self, scale: float = 0.01, **selection: Any):
        super().__init__(**selection)
        self.scale = scale

    def loss(self, variables: Sequence[Any]) -> tf.Tensor:
        return self.scale * _sum_of_squares(variables)


@register_penalty("selective_l2")
class SelectiveL2(L2):
    """L2 on the variables whose path matches `include` and not `exclude`.

    `SelectiveL2(1e-4, exclude='bias|norm')` regularizes everything but biases and
    normalization parameters; `SelectiveL2(1e-4, include='kernel')` only kernels.

    Args:
      scale: λ, a non-negative number.
      **selection: `include` and/or `exclude` (regexes on `variable.path`, or predicates),
        `name`; see `Penalty`.

    Raises:
      ConfigError: neither `include` nor `exclude` is given (use `L2` for all variables).
    """

    def __init__(self, scale: float = 0.01, **selection: Any):
        if selection.get("include") is None and selection.get("exclude") is None:
            raise ConfigError(
                "SelectiveL2 needs `include` or `exclude` (both are None); "
                "use L2 to regularize every trainable variable."
            )
        super().__init__(scale, **selection)


COUPLINGS = ("learning_rate", "schedule", "absolute")


@register_penalty("decoupled_weight_decay")
class DecoupledWeightDecay(Penalty):
    """Decoupled weight decay: `w ← w − lr_t · rate · w`, applied to the weights directly.

    This is the weight decay of AdamW (Loshchilov & Hutter, "Decoupled Weight Decay
    Regularization", ICLR 2019). It never enters the loss or the gradients: an L2 term in
    the loss is rescaled by Adam's per-coordinate normalisation, so weights with large
    gradient history are decayed less than others, which is not what "weight decay" means.
    Under plain SGD the two coincide (`L2(λ/2)` ≡ `DecoupledWeightDecay(λ)`, the paper's
    Proposition 1); under adaptive optimizers they do not.

    The decay is applied to the pre-update weights, before the optimizer's step, as Keras
    (`AdamW`), PyTorch and optax do.

    Args:
      rate: the decay rate (Keras' `weight_decay`), non-negative.
      coupling: how the rate is scaled per step:
        `"learning_rate"` (default; Keras, PyTorch, optax): `lr_t · rate`;
        `"schedule"` (the paper): `η_t · rate`, η_t the learning-rate schedule's multiplier;
        `"absolute"` (TF-Addons' `DecoupledWeightDecayExtension`): `rate`.
      **selection: `include`, `exclude` (by default variables with ndim ≥ 2: kernels, not
        biases or normalization scales), `name`; see `Penalty`.
    """

    rate = Strength()
    has_update = True

    def __init__(self, rate: float = 0.004, *, coupling: str = "learning_rate", **selection: Any):
        super().__init__(**selection)
        self.coupling = check_choice("coupling", coupling, COUPLINGS)
        self.rate = rate

    def default_selection(self, variable: Any) -> bool:
        return len(variable.shape) >= 2

    def decay(self, context: StepContext) -> tf.Tensor:
        """The multiplicative decay applied this step (`lr_t · rate` by default)."""
        rate = tf.convert_to_tensor(self.rate, tf.float32)
        if self.coupling == "learning_rate":
            return tf.cast(context.learning_rate, tf.float32) * rate
        if self.coupling == "schedule":
            return tf.cast(context.schedule_multiplier, tf.float32) * rate
        return rate

    def update(self, variables: Sequence[Any], context: StepContext) -> None:
        decay = self.decay(context)
        for v in variables:
            v.assign_sub(tf.cast(decay, v.dtype) * v)

    def params(self) -> dict[str, Any]:
        params = super().params()
        if self.coupling != "learning_rate":
            params["coupling"] = self.coupling
        return params
