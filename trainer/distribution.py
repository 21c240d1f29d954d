"""tf.distribute strategies by name, who is chief, how workers meet, and what they agree on."""

from __future__ import annotations

import faulthandler
import functools
import itertools
import os
import signal
import socket
import threading
import time
from collections.abc import Sequence

import tensorflow as tf
from absl import logging

from trainer.errors import ConfigError, check_choice, check_integer

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
_STRATEGIES: dict[tuple[str, int], tf.distribute.Strategy] = {}
_COORDINATED_JOBS = ("chief", "worker")  # the tasks that run MultiWorkerMirroredStrategy's replicas


class PeerTimeout(TimeoutError):
    """Other tasks of a multi-worker cluster did not start within `peer_timeout` seconds.

    The CLI prints the message, which names them, and exits with `EXIT_STATUS`: 75,
    EX_TEMPFAIL of sysexits.h. Nothing ran; the same command may succeed once they are up.
    """

    EXIT_STATUS = 75


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


def make_strategy(
    name: str = "default", cpu_replicas: int = 0, *, peer_timeout: int = 120
) -> tf.distribute.Strategy:
    """A `tf.distribute.Strategy` by name.

    The same name and `cpu_replicas` return the same strategy object (TensorFlow expects one
    per process; several MirroredStrategy objects in one process were seen to collide in their
    collective ops, "Shape mismatch in the collective instance").

    Args:
      name: `"default"` (no distribution), `"mirrored"` (all local GPUs, or the CPU; with
        `cpu_replicas`, that many logical CPUs), `"multi_worker"`
        (`MultiWorkerMirroredStrategy`, cluster from the `TF_CONFIG` environment variable) or
        `"tpu"` (`TPUStrategy`, TPU from the `TPU_NAME` environment variable, or the local one).
      cpu_replicas: with `"mirrored"`, mirror over this many logical CPU devices; 0 to use
        the real devices.
      peer_timeout: with `"multi_worker"`, seconds to wait for the other tasks to start
        (`wait_for_peers`); 0 waits forever.

    Raises:
      ConfigError: an unknown name, or `cpu_replicas` with another strategy.
      PeerTimeout: other tasks of the cluster did not start within `peer_timeout` seconds.
    """
    check_strategy(name, cpu_replicas)
    check_integer("peer_timeout", peer_timeout, 0)
    if name == "default":
        return tf.distribute.get_strategy()
    if (name, cpu_replicas) not in _STRATEGIES:
        _STRATEGIES[name, cpu_replicas] = _new_strategy(name, cpu_replicas, peer_timeout)
    return _STRATEGIES[name, cpu_replicas]


def _new_strategy(name: str, cpu_replicas: int, peer_timeout: int) -> tf.distribute.Strategy:
    if name == "mirrored":
        if not cpu_replicas:
            return tf.distribute.MirroredStrategy()
        # Logical CPUs share one memory: summing on /cpu:0 beat the collective ring TensorFlow
        # picks for them (a seed-MLP step 506 against 671 us on 2 of them; benchmarks/scaling.py).
        return tf.distribute.MirroredStrategy(
            configure_cpu_replicas(cpu_replicas),
            cross_device_ops=tf.distribute.ReductionToOneDevice(),
        )
    if name == "multi_worker":
        return _multi_worker_strategy(peer_timeout)
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


def replica_jit_compile(jit_compile: bool | None, devices: tuple[str, ...]) -> bool:
    """Whether to compile the per-replica step with XLA, on the strategy's `devices`.

    `jit_compile` True or False decides (True on logical CPU replicas is refused by
    `check_jit_compile`). If None (automatic): yes when the replicas are all GPUs (XLA per
    replica under MirroredStrategy), no otherwise: on one device (`devices` is ()) the
    in-memory loop compiles the whole multi-step loop instead (`use_xla`), and logical CPU
    replicas would all land on /cpu:0.

    Args:
      jit_compile: `options.jit_compile`.
      devices: `local_devices(strategy)`, e.g. `("/job:localhost/replica:0/task:0/device:GPU:0",)`.
    """
    if jit_compile is not None:
        return jit_compile
    return bool(devices) and all("GPU" in d.upper() for d in devices)


def is_default(strategy: tf.distribute.Strategy) -> bool:
    """Whether `strategy` is TensorFlow's no-op default strategy (no replicas to split over)."""
    return type(strategy).__name__ == "_DefaultDistributionStrategy"


def gathers_in_graph(strategy: tf.distribute.Strategy) -> bool:
    """Whether `strategy`'s replicas can gather in-memory batches inside the loop: the default
    strategy, MirroredStrategy and MultiWorkerMirroredStrategy (whose replicas run in this
    process's graph and can read its variables); not TPUs, which get the tf.data path."""
    mirrored = (tf.distribute.MirroredStrategy, tf.distribute.MultiWorkerMirroredStrategy)
    return is_default(strategy) or isinstance(strategy, mirrored)


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


def _multi_worker_strategy(peer_timeout: int) -> tf.distribute.Strategy:
    """MultiWorkerMirroredStrategy, once every other task of `TF_CONFIG` is up.

    Its constructor waits for the other tasks itself, but forever and holding the GIL: no
    Python thread, no Python signal handler runs meanwhile (Ctrl-C is not seen), and the
    SIGTERM handler TensorFlow installs then (its preemption notifier) only records the
    signal. Waiting in `wait_for_peers` first keeps both signals working and bounds the wait;
    should a task vanish between that and the constructor, faulthandler ends the process
    (status 1, with a traceback) after `peer_timeout` seconds. Afterwards the SIGTERM handler
    from before (the default action, unless one was set) replaces TensorFlow's: outside the
    training loop, where `signals.StopSignals` catches it, SIGTERM ends the process.
    """
    wait_for_peers(peer_timeout)
    main_thread = threading.current_thread() is threading.main_thread()
    sigterm = signal.getsignal(signal.SIGTERM)  # what Python set; TensorFlow's is not seen
    if peer_timeout:
        faulthandler.dump_traceback_later(peer_timeout, exit=True)
    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    finally:
        if peer_timeout:
            faulthandler.cancel_dump_traceback_later()
    if main_thread:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if sigterm is None else sigterm)
    return strategy


def _cluster_addresses() -> tuple[str | None, dict[str, str]]:
    """This task's address in `TF_CONFIG` (None if it is not a chief or worker), and the
    other chief and worker tasks' addresses by name (`"worker 1"`)."""
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    spec = resolver.cluster_spec().as_dict()
    own, others = None, {}
    for job in _COORDINATED_JOBS:
        tasks = spec.get(job, [])
        for index, address in tasks.items() if isinstance(tasks, dict) else enumerate(tasks):
            if (job, index) == (resolver.task_type, resolver.task_id):
                own = address
            else:
                others[f"{job} {index}"] = address
    return own, others


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _accepts(address: str) -> bool:
    """Whether something accepts TCP connections at `address` (host:port)."""
    try:
        socket.create_connection(_host_port(address), timeout=1).close()
    except OSError:
        return False
    return True


def _listen(address: str) -> socket.socket | None:
    """A socket listening on `address`'s port, so that the other tasks see this one; None
    if the port is taken (then what holds it answers them)."""
    port = _host_port(address)[1]
    try:
        if socket.has_dualstack_ipv6():
            return socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
        return socket.create_server(("", port))
    except OSError:
        return None


def wait_for_peers(timeout: int) -> None:
    """Waits until every other chief and worker task of `TF_CONFIG` accepts TCP connections.

    Meanwhile this task's own port accepts them too (TensorFlow's server takes it over when
    the strategy is made), so that tasks started in any order find each other. The wait is
    plain Python: SIGINT raises KeyboardInterrupt, SIGTERM acts as the process has it set.

    Args:
      timeout: seconds; 0 waits forever.

    Raises:
      PeerTimeout: naming the tasks (and addresses) that did not answer in time.
    """
    own, missing = _cluster_addresses()
    deadline = time.monotonic() + timeout
    listener = _listen(own) if own and missing else None
    try:
        while missing := {n: a for n, a in missing.items() if not _accepts(a)}:
            names = ", ".join(f"{n} at {a}" for n, a in missing.items())
            if timeout and time.monotonic() >= deadline:
                raise PeerTimeout(
                    f"Other tasks did not start within `peer_timeout` ({timeout} s): {names}; "
                    "start them, or check the addresses in TF_CONFIG."
                )
            logging.log_every_n_seconds(
                logging.INFO,
                "Waiting for %s to start (peer_timeout: %s).",
                30,
                names,
                f"{timeout} s" if timeout else "none",
            )
            time.sleep(0.2)
    finally:
        if listener is not None:
            listener.close()


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


def worker_names(strategy: tf.distribute.Strategy) -> list[str]:
    """The processes that run `strategy`'s replicas, chief first: `["chief 0", "worker 0"]`
    or `["worker 0", "worker 1"]` for a multi-worker cluster; `["this process"]` otherwise."""
    if worker_count(strategy) == 1:
        return ["this process"]
    spec = strategy.cluster_resolver.cluster_spec()
    return [
        f"{job} {index}"
        for job in _COORDINATED_JOBS
        if job in spec.jobs
        for index in sorted(spec.task_indices(job))
    ]


def worker_index(strategy: tf.distribute.Strategy) -> int:
    """This process's place in `worker_names(strategy)`: 0 on the chief."""
    if worker_count(strategy) == 1:
        return 0
    resolver = strategy.cluster_resolver
    return worker_names(strategy).index(f"{resolver.task_type} {resolver.task_id}")


def gather_from_workers(strategy: tf.distribute.Strategy, row: Sequence[int]) -> list[list[int]]:
    """Every worker's `row` of integers, in `worker_names` order.

    Over several processes this is a collective that each of them must call, in the same
    order, with rows of the same length; with one process nothing runs.
    """
    count = worker_count(strategy)
    if count == 1:
        return [list(row)]
    own = tf.one_hot(worker_index(strategy), count, dtype=tf.int64)[:, None]
    table = own * tf.constant([list(row)], tf.int64)  # this worker's row; zeros elsewhere
    (summed,) = _sum_over_workers(strategy, [table], contribute=True)
    return summed.numpy().tolist()


def broadcast_from_chief(
    strategy: tf.distribute.Strategy, tensors: Sequence[tf.Tensor]
) -> list[tf.Tensor]:
    """The chief's `tensors`, on every worker of a multi-worker `strategy`; else `tensors`.

    Over several processes this is a collective that each of them must call, in the same
    order, with tensors of the same shapes and dtypes: a sum to which only the chief
    contributes, exact for every float, integer and boolean dtype (floats are summed in
    float32 or float64, the others in int64, and cast back). With one process nothing runs.

    Raises:
      TypeError: a tensor of another dtype (complex, string).
    """
    if worker_count(strategy) == 1:
        return list(tensors)
    flat, groups = pack_by_dtype(tensors)
    summed = _sum_over_workers(strategy, flat, contribute=is_chief(strategy))
    return unpack_by_dtype(summed, groups, tensors)


def pack_by_dtype(tensors: Sequence[tf.Tensor]) -> tuple[list[tf.Tensor], list[list[int]]]:
    """`tensors` flattened into one vector per dtype they are summed in (`_summed_dtype`),
    and the indices of the tensors in each; `unpack_by_dtype` undoes it."""
    groups: dict[tf.DType, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(_summed_dtype(t.dtype), []).append(i)
    flat = [
        tf.concat([tf.reshape(tf.cast(tensors[i], dtype), [-1]) for i in indices], axis=0)
        for dtype, indices in groups.items()
    ]
    return flat, list(groups.values())


def unpack_by_dtype(
    flat: Sequence[tf.Tensor], groups: Sequence[Sequence[int]], like: Sequence[tf.Tensor]
) -> list[tf.Tensor]:
    """Tensors of the shapes and dtypes of `like` from `pack_by_dtype`'s vectors."""
    out: list[tf.Tensor] = list(like)
    for values, indices in zip(flat, groups, strict=True):
        pieces = tf.split(values, [int(tf.size(like[i])) for i in indices])
        for i, piece in zip(indices, pieces):
            out[i] = tf.cast(tf.reshape(piece, tf.shape(like[i])), like[i].dtype)
    return out


def _summed_dtype(dtype: tf.DType) -> tf.DType:
    """The dtype `dtype` is summed in, exactly: float32 or float64 for floats, else int64."""
    if dtype.is_floating:
        return tf.float64 if dtype == tf.float64 else tf.float32
    if dtype.is_integer or dtype == tf.bool:
        return tf.int64
    raise TypeError(f"Cannot broadcast a {dtype.name} tensor from the chief.")


def _sum_over_workers(
    strategy: tf.distribute.Strategy, tensors: Sequence[tf.Tensor], *, contribute: bool
) -> list[tf.Tensor]:
    """`tensors` summed over the workers, each worker's counted once (by one of its local
    replicas), or not at all where `contribute` is False."""
    calls = itertools.count()

    def per_replica(context: tf.distribute.experimental.ValueContext) -> tuple[tf.Tensor, ...]:
        del context
        counted = contribute and next(calls) == 0
        return tuple(t if counted else tf.zeros_like(t) for t in tensors)

    values = strategy.experimental_distribute_values_from_function(per_replica)
    return list(_collective_sum(strategy)(values))


@functools.cache
def _collective_sum(strategy: tf.distribute.Strategy):
    @tf.function
    def collective_sum(values):
        return tuple(strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for v in values)

    return collective_sum
