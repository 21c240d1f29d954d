"""Where a step's time goes: per-kernel times from the TensorFlow profiler, per step.

`kernel_times(run, steps)` profiles `run()` (which runs `steps` train steps) and returns the
time each kernel took, in microseconds per step: TensorFlow ops (oneDNN convolutions, ...) for
a graph run op by op, and, for an XLA-compiled loop, its thunks (one per fusion, dot or copy),
which XLA:CPU records only when the process started with
`XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true` (see `XPROF_FLAG`). The profiler's own
overhead (~10-30% on small steps) inflates every kernel alike: compare shares, not totals.
"""

from __future__ import annotations

import collections
import glob
import os
import sys
import tempfile
from collections.abc import Callable

import tensorflow as tf

XPROF_FLAG = "--xla_cpu_enable_xprof_traceme=true"
# Spans that contain kernels rather than being kernels.
_CONTAINERS = ("ThunkExecutor", "Await", "ExecutorState", "Execute", "BlockUntilReady", "Run")


def restart_with_xla_traces() -> None:
    """Restarts this script with `XPROF_FLAG` in `XLA_FLAGS` unless it is there: XLA reads
    its flags once, when TensorFlow loads, so setting them later in the process is too late."""
    flags = os.environ.get("XLA_FLAGS", "")
    if XPROF_FLAG not in flags.split():
        env = {**os.environ, "XLA_FLAGS": f"{flags} {XPROF_FLAG}".strip()}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def kernel_times(run: Callable[[], None], steps: int) -> collections.Counter:
    """Microseconds per step for each kernel `run()` executed, summed over threads.

    A kernel is an event on one of TensorFlow's compute or intra-op threads (not the Python
    thread); its name is the last part of the op's path (`MatMul.12`, `Conv2DBackpropFilter`).
    """
    # Imported here: the profiler's protobufs are not needed to run the benchmarks.
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        try:
            run()
        finally:
            tf.profiler.experimental.stop()
        (path,) = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
        space = xplane_pb2.XSpace()
        with open(path, "rb") as f:
            space.ParseFromString(f.read())
    times: collections.Counter = collections.Counter()
    for plane in space.planes:
        names = {key: meta.name for key, meta in plane.event_metadata.items()}
        for line in plane.lines:
            if not line.name.startswith(("tf_Compute", "tf_numa", "tf_XLA")):
                continue
            for event in line.events:
                name = names.get(event.metadata_id, "?").split("/")[-1]
                if not name.startswith(_CONTAINERS) and "::" not in name:
                    times[name] += event.duration_ps / 1e6 / steps
    return times


def top_kernels(times: collections.Counter, count: int = 12) -> list[str]:
    """The `count` costliest kernels as lines: µs per step, share of the kernels' total (a
    sum over threads: where kernels run on two threads at once, more than the step)."""
    total = sum(times.values()) or 1.0
    lines = [f"kernels' total {total:8.1f} us/step (profiled)"]
    for name, micros in times.most_common(count):
        lines.append(f"  {micros:8.1f} us/step {100 * micros / total:5.1f}%  {name}")
    return lines
