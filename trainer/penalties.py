"""Penalties: loss terms (L2, SelectiveL2) and direct weight updates (DecoupledWeightDecay)."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf

from trainer.errors import ConfigError
from trainer.registry import register_penalty

Selector = str | Callable[[Any], bool] | None


def variable_path(variable: Any) -> str:
    """The name selection matches on: Keras 3 `variable.path`, else the TF name sans `:0`."""
    path = getattr(variable, "path", None)
    if path:
        return path
    name = variable.name
    return name.removesuffix(":0")


def _compile(argument: str, selector: Selector) -> re.Pattern | Callable | None:
    if selector is None or callable(selector):
        return selector
    if not isinstance(selector, str):
        raise ConfigError(
            f"`{argument}` ({selector!r}) must be a regex string, a predicate or None."
        )
    try:
        return re.compile(selector)
    except re.error as e:
        raise ConfigError(f"`{argument}` ({selector!r}) is not a valid regex: {e}.") from e


def _matches(selector: re.Pattern | Callable, variable: Any) -> bool:
    if isinstance(selector, re.Pattern):
        return selector.search(variable_path(variable)) is not None
    return bool(selector(variable))


def check_non_negative(argument: str, value: Any) -> float:
    """Returns `value` as a float, or raises `ConfigError` naming `argument`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"`{argument}` ({value!r}) must be a non-negative number.")
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"`{argument}` ({value!r}) must be a non-negative finite number.")
    return float(value)


def _sum_of_squares(variables: Sequence[Any]) -> tf.Tensor:
    """Σ w² over all `variables`, in float32 whatever the compute dtype."""
    if not variables:
        return tf.constant(0.0)
    return tf.add_n([_square_sum(tf.cast(v, tf.float32)) for v in variables])


@tf.custom_gradient
def _square_sum(x: tf.Tensor) -> tuple[tf.Tensor, Callable]:
    """Σ x², with its gradient `2x` written out (one fused op in the backward pass, where
    the tape's gradient of `reduce_sum(square(x))` is a broadcast and two products).

    A tensor of rank ≥ 2 is reduced as a matrix-vector product of its squared rows with
    ones: XLA:CPU emits a full reduction as a scalar loop, which made `L2` cost ~10% of the
    seed MLP's step inside the compiled loop; the product runs vectorized.
    """
    last = x.shape[-1] if x.shape.rank is not None and x.shape.rank >= 2 else None
    if last:
        rows = tf.reshape(tf.square(x), [-1, last])
        value = tf.reduce_sum(tf.linalg.matvec(rows, tf.ones([last], x.dtype)))
    else:
        value = tf.reduce_sum(tf.square(x))

    def gradient(upstream: tf.Tensor) -> tf.Tensor:
        return (2.0 * upstream) * x

    return value, gradient


class Strength:
    """A non-negative penalty strength (λ, a rate): a class attribute of a `Penalty`.

    It reads and writes as a float. Once the penalty is built (`Penalty.select`, called by the
    Trainer under its distribution strategy's scope) the value lives in a non-trainable
    `tf.Variable`, so that assigning a new value (a schedule, a sweep) never retraces the
    step; `penalty.strength(name)` is that variable, for use in `loss` and `update`.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, penalty: Any, owner: type | None = None) -> Any:
        if penalty is None:
            return self
        variable = penalty.__dict__.get("_strength_variables", {}).get(self.name)
        if variable is not None:
            return float(variable.numpy())
        return penalty.__dict__["_strength_values"][self.name]

    def __set__(self, penalty: Any, value: Any) -> None:
        value = check_non_negative(self.name, value)
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
    model is built (`select`). It contributes a term to the loss (override `loss`), or
    updates its variables directly after the gradients are computed (override `update`), or
    both. Strengths live in non-trainable `tf.Variable`s so that changing one never
    retraces the train step.

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

    registered_name: str | None = None

    def __init__(
        self, *, include: Selector = None, exclude: Selector = None, name: str | None = None
    ):
        if not (self.has_loss or self.has_update):
            raise TypeError(f"{type(self).__name__} must override loss() or update().")
        if name is not None and not (isinstance(name, str) and name.isidentifier()):
            raise ConfigError(f"`name` ({name!r}) must be an identifier, e.g. 'l2_kernels'.")
        self.include = include
        self.exclude = exclude
        self._include = _compile("include", include)
        self._exclude = _compile("exclude", exclude)
        self.name = name or self.registered_name or type(self).__name__.lower()

    @property
    def has_loss(self) -> bool:
        """Whether this penalty adds a term to the loss."""
        return type(self).loss is not Penalty.loss

    @property
    def has_update(self) -> bool:
        """Whether this penalty updates its variables directly."""
        return type(self).update is not Penalty.update

    def default_selection(self, variable: Any) -> bool:
        """Which variables are selected when `include` is None; all of them here."""
        del variable
        return True

    def select(self, variables: Sequence[Any]) -> list[Any]:
        """Resolves this penalty's selection among `variables`.

        Args:
          variables: the model's trainable variables.

        Returns:
          The selected variables, in their original order.

        Raises:
          ConfigError: a regex matches no variable path, or nothing is selected.
        """
        variables = list(variables)
        paths = [variable_path(v) for v in variables]
        examples = ", ".join(repr(p) for p in paths[:4]) + (", ..." if len(paths) > 4 else "")
        for argument, selector in (("include", self._include), ("exclude", self._exclude)):
            if isinstance(selector, re.Pattern) and not any(selector.search(p) for p in paths):
                raise ConfigError(
                    f"{self!r}: {argument}={selector.pattern!r} matches no variable path of "
                    f"the {len(paths)} trainable variables ({examples})."
                )
        chosen = [
            v
            for v in variables
            if (_matches(self._include, v) if self._include else self.default_selection(v))
            and not (self._exclude and _matches(self._exclude, v))
        ]
        if not chosen:
            raise ConfigError(
                f"{self!r} selects no variable among the {len(paths)} trainable variables "
                f"({examples})."
            )
        self.build()
        return chosen

    def build(self) -> None:
        """Creates the variables holding the `Strength`s; `select` calls it."""
        variables = self.__dict__.setdefault("_strength_variables", {})
        for name, value in self.__dict__.get("_strength_values", {}).items():
            if name not in variables:
                variables[name] = tf.Variable(value, trainable=False, dtype=tf.float32, name=name)

    def state_variables(self) -> list[tf.Variable]:
        """Variables to checkpoint with the run: the strengths; override to add state."""
        return list(self.__dict__.get("_strength_variables", {}).values())

    def strength(self, name: str) -> tf.Variable:
        """The variable holding the `Strength` called `name` (built on first use)."""
        if name not in self.__dict__.get("_strength_variables", {}):
            self.build()
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
        """The constructor arguments shown in `repr` and the penalty table."""
        return {}

    def __repr__(self) -> str:
        args = dict(self.params())
        for key in ("include", "exclude"):
            value = getattr(self, key)
            if value is not None:
                args[key] = getattr(value, "__name__", value) if callable(value) else value
        if self.name != (self.registered_name or type(self).__name__.lower()):
            args["name"] = self.name
        return f"{type(self).__name__}({', '.join(f'{k}={_short(v)}' for k, v in args.items())})"


def _short(value: Any) -> str:
    """`repr`, with floats read back from float32 variables shown as typed (1e-4, not 9.99e-05)."""
    return repr(float(f"{value:.7g}")) if isinstance(value, float) else repr(value)


@register_penalty("l2")
class L2(Penalty):
    """`scale · Σ w²` over all trainable variables: the Keras `l2` regularizer's convention.

    Note there is no ½: `L2(λ)` on a kernel equals `kernel_regularizer=keras.regularizers.l2(λ)`,
    and its gradient is `2λw`.

    Args:
      scale: λ, a non-negative number.
      include: see `Penalty`.
      exclude: see `Penalty`.
      name: see `Penalty`.
    """

    scale = Strength()

    def __init__(
        self,
        scale: float = 0.01,
        *,
        include: Selector = None,
        exclude: Selector = None,
        name: str | None = None,
    ):
        super().__init__(include=include, exclude=exclude, name=name)
        self.scale = scale

    def loss(self, variables: Sequence[Any]) -> tf.Tensor:
        return self.strength("scale") * _sum_of_squares(variables)

    def params(self) -> dict[str, Any]:
        return {"scale": self.scale}


@register_penalty("selective_l2")
class SelectiveL2(L2):
    """L2 on the variables whose path matches `include` and not `exclude`.

    `SelectiveL2(1e-4, exclude='bias|norm')` regularizes everything but biases and
    normalization parameters; `SelectiveL2(1e-4, include='kernel')` only kernels.

    Args:
      scale: λ, a non-negative number.
      include: regex on `variable.path`, or a predicate.
      exclude: regex on `variable.path`, or a predicate.
      name: see `Penalty`.

    Raises:
      ConfigError: neither `include` nor `exclude` is given (use `L2` for all variables).
    """

    def __init__(
        self,
        scale: float = 0.01,
        *,
        include: Selector = None,
        exclude: Selector = None,
        name: str | None = None,
    ):
        if include is None and exclude is None:
            raise ConfigError(
                "SelectiveL2 needs `include` or `exclude` (both are None); "
                "use L2 to regularize every trainable variable."
            )
        super().__init__(scale, include=include, exclude=exclude, name=name)


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
      include: regex or predicate; by default variables with ndim ≥ 2 (kernels, not
        biases or normalization scales).
      exclude: regex or predicate.
      name: see `Penalty`.
    """

    rate = Strength()

    def __init__(
        self,
        rate: float = 0.004,
        *,
        coupling: str = "learning_rate",
        include: Selector = None,
        exclude: Selector = None,
        name: str | None = None,
    ):
        super().__init__(include=include, exclude=exclude, name=name)
        if coupling not in COUPLINGS:
            raise ConfigError(f"`coupling` ({coupling!r}) must be one of {', '.join(COUPLINGS)}.")
        self.coupling = coupling
        self.rate = rate

    def default_selection(self, variable: Any) -> bool:
        return len(variable.shape) >= 2

    def decay(self, context: StepContext) -> tf.Tensor:
        """The multiplicative decay applied this step (`lr_t · rate` by default)."""
        rate = self.strength("rate")
        if self.coupling == "learning_rate":
            return tf.cast(context.learning_rate, tf.float32) * rate
        if self.coupling == "schedule":
            return tf.cast(context.schedule_multiplier, tf.float32) * rate
        return tf.identity(rate)

    def update(self, variables: Sequence[Any], context: StepContext) -> None:
        decay = self.decay(context)
        for v in variables:
            v.assign_sub(tf.cast(decay, v.dtype) * v)

    def params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"rate": self.rate}
        if self.coupling != "learning_rate":
            params["coupling"] = self.coupling
        return params
