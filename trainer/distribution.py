"""tf.distribute strategies by name, who is chief, and how workers agree to stop."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import tensorflow as tf

from trainer.errors import ConfigError, check_choice, check_integer

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
_COORDINATED_JOBS = ("chief", "worker")  # the tasks that run MultiWorkerMirroredStrategy's replicas


def configure_cpu_replicas(count: int) -> list[str]:
    """Splits the first CPU into `count` logical devices, for testing replicas without GPUs.

    Must run before TensorFlow executes its first op; afterwards it succeeds only if that many
    logical CPUs already exist.

    Returns:
      The device names, `["/cpu:0", ..., f"/cpu:{count - 1}"]`.

    Raises:
      ConfigError: TensorFlow is already initialised with fewer logical CPUs.
    """
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
        )
    except RuntimeError:
        existing = len(tf.config.list_logical_devices("CPU"))
        if existing < count:
            raise ConfigError(
                f"`cpu_replicas` ({count}): TensorFlow already started with {existing} CPU "
                "device(s); create the strategy before any TensorFlow op runs."
            ) from None
    return [f"/cpu:{i}" for i in range(count)]


def check_strategy(name: str, cpu_replicas: int) -> None:
    """Checks a strategy name and its `cpu_replicas`.

    Raises:
      ConfigError: an unknown name, a bad count, or `cpu_replicas` with another strategy.
    """
    check_choice("strategy", name, STRATEGIES)
    check_integer("cpu_replicas", cpu_replicas, 0, 1024)
    if cpu_replicas and name != "mirrored":
        raise ConfigError(
            f"`cpu_replicas` ({cpu_replicas}) needs strategy 'mirrored', not {name!r}."
        )


def make_strategy(name: str = "default", cpu_replicas: int = 0) -> tf.distribute.Strategy:
    """A `tf.distribute.Strategy` by name.

    The same arguments return the same strategy object (TensorFlow expects one per process).

    Args:
      name: `"default"` (no distribution), `"mirrored"` (all local GPUs, or the CPU; with
        `cpu_replicas`, that many logical CPUs), `"multi_worker"`
        (`MultiWorkerMirroredStrategy`, cluster from the `TF_CONFIG` environment variable) or
        `"tpu"` (`TPUStrategy`, TPU from the `TPU_NAME` environment variable, or the local one).
      cpu_replicas: with `"mirrored"`, mirror over this many logical CPU devices; 0 to use
        the real devices.

    Raises:
      ConfigError: an unknown name, or `cpu_replicas` with another strategy.
    """
    check_strategy(name, cpu_replicas)
    if name == "default":
        return tf.distribute.get_strategy()
    return _new_strategy(name, cpu_replicas)


@functools.cache
def _new_strategy(name: str, cpu_replicas: int) -> tf.distribute.Strategy:
    """One strategy per kind and process: several MirroredStrategy objects in one process
    were seen to collide in their collective ops ("Shape mismatch in the collective instance")."""
    if name == "mirrored":
        devices = configure_cpu_replicas(cpu_replicas) if cpu_replicas else None
        return tf.distribute.MirroredStrategy(devices)
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(os.environ.get("TPU_NAME", ""))
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def check_jit_compile(jit_compile: bool | None, strategy: tf.distribute.Strategy) -> None:
    """Raises if `jit_compile=True` would put several logical-CPU replicas on one device.

    Raises:
      ConfigError: XLA places every logical CPU replica on /cpu:0.
    """
    devices = local_devices(strategy)
    if jit_compile is True and len(devices) > 1 and all("CPU" in d for d in devices):
        raise ConfigError(
            f"`jit_compile` (True) cannot run {len(devices)} replicas on logical CPU devices: "
            "XLA places them all on /cpu:0. Use one CPU replica, or GPUs."
        )


def is_default(strategy: tf.distribute.Strategy) -> bool:
    """Whether `strategy` is TensorFlow's no-op default strategy (no replicas to split over)."""
    return type(strategy).__name__ == "_DefaultDistributionStrategy"


def local_devices(strategy: tf.distribute.Strategy) -> tuple[str, ...]:
    """The devices this process's replicas run on; () for the default strategy."""
    return () if is_default(strategy) else tuple(strategy.extended.worker_devices)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes results: always, except on non-chief multi-worker tasks."""
    resolver = getattr(strategy, "cluster_resolver", None)
    task_type = getattr(resolver, "task_type", None)
    if not task_type:
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type == "chief" or (
        not has_chief and task_type == "worker" and resolver.task_id == 0
    )


def worker_count(strategy: tf.distribute.Strategy) -> int:
    """The processes that run `strategy`'s replicas together: the chief and worker tasks of a
    MultiWorkerMirroredStrategy's cluster, else 1 (a TPU pod has one client too)."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return 1
    spec = strategy.cluster_resolver.cluster_spec()
    return max(1, sum(spec.num_tasks(job) for job in _COORDINATED_JOBS if job in spec.jobs))


def sum_over_workers(strategy: tf.distribute.Strategy, values: Sequence[float]) -> list[float]:
    """`values` summed over the processes of a multi-worker `strategy`, else `values`.

    Over several processes this is a collective all-reduce that each of them must call, in
    the same order; with one process (the default strategy, MirroredStrategy, TPUStrategy)
    nothing runs.
    """
    if worker_count(strategy) == 1:
        return list(values)
    return _all_reduce(strategy)(tf.constant(values, tf.float32)).numpy().tolist()


@functools.cache
def _all_reduce(strategy: tf.distribute.Strategy):
    replicas = len(local_devices(strategy))

    @tf.function
    def all_reduce(values):
        # Each local replica contributes the process's values once; summed over all replicas.
        per_replica = strategy.run(tf.identity, args=(values,))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None) / replicas

    return all_reduce
