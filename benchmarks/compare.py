"""tapeloop vs a hand-written GradientTape loop vs `model.fit`: steps/s, overheads, FLOP floor.

Usage (from the repository root, with the project installed):

    TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/compare.py            # ~4-6 min on 2 CPU cores
    TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/compare.py --quick    # ~1.5 min smoke run
    TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/compare.py --repeats 8 --workloads seed_mlp
    # small per-step overheads, without cross-thread wake-ups (one TF thread):
    TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/compare.py --threads 1 --workloads seed_mlp

Everything runs in one process. Each workload (the seed MLP 784-64-10, a compute-bound MLP
784-1024-1024-10, a small CNN on 32x32x3) gets the same model, random in-memory data and
optimizer (Adam, lr 1e-3) in every variant:

  hand_loop       the seed article's Example 3, corrected: a `@tf.function` GradientTape step
                  called once per batch from Python over a tf.data iterator
  hand_loop_100   the same step, 100 steps per call (`tf.range` over the iterator in one
                  tf.function): the reference for tapeloop's overhead at equal steps per call
  fit             `compile(Adam, SparseCategoricalCrossentropy(from_logits=True))`, `fit`
  fit_spe100      the same with `steps_per_execution=100`
  tapeloop        a `trainer.Trainer` fed the same tf.data pipeline, default options
                  (steps_per_loop=100; no XLA with a tf.data input)
  tapeloop_spl    tapeloop with steps_per_loop = all timed steps in one call, no XLA
  tapeloop_fast   tapeloop with steps_per_loop = all timed steps and jit_compile=True (XLA on
                  the step)
  tapeloop_arrays tapeloop's defaults for data that fits in memory: the same data through
                  `Trainer.train_arrays`, batched inside the loop, default options (100 steps
                  per call; XLA over the whole loop, except for convolutions on CPU)
  hand_arrays_xla those options written by hand: in-memory batches gathered in-graph, the
                  whole loop one XLA computation (not on the CNN: XLA:CPU convolutions are
                  13-24x slower): the reference for tapeloop_arrays' framework overhead

On the seed MLP also: tapeloop_arrays with each penalty (L2, SelectiveL2,
DecoupledWeightDecay, L2 + DecoupledWeightDecay), and diagnostic variants (`--no-diagnostics`
skips them) that add tapeloop's extra work to `hand_loop_100` one piece at a time, to locate
its overhead. A `matmul` pseudo-variant (a 2048x2048 float32 matmul chain inside a tf.function,
plain and XLA-compiled) measures the sustained GFLOP/s for the "time over FLOP floor" column.

Timing: every variant is built once and warmed up (its first call, which traces and compiles,
is reported separately), then the rounds run round-robin, the variant order rotated each
round, so that machine noise hits every variant alike. Each round times a fixed number of
steps per variant: 200 on the seed MLP (10 rounds), 40 on the big MLP and 20 on the CNN (3
rounds each; `--quick`: 200, 5, 5, one round); "100 steps per call" means min(100, that
number), shown in the steps/call column. Ratios are medians of per-round (paired) ratios.

Noise: on a shared machine another process can take a core for minutes. Every timed
repetition records the CPU that other processes used meanwhile (from /proc); one where they
used more than 0.3 core is timed again (at most twice, within `--retry-budget` seconds for the
whole run) and the least contended try is kept; the tables count the repetitions still
contended. The tables also give this process's CPU time per step ("CPU ms"), which another
process taking the other core disturbs far less than wall time: use it to compare small
overheads when the wall times are bimodal. With TensorFlow's default threads, a small model's
steps also wait on cross-thread wake-ups, which on a 2-vCPU VM makes its wall time jump
between levels (e.g. ~0.75, ~1.5 and ~3 ms per step for the seed MLP) from one repetition to
the next; `--threads 1` runs everything on one TensorFlow thread and gives stable per-step
numbers for attributing overheads of a few percent (it slows the compute-bound workloads).

tapeloop is timed through its public `train()`: one Trainer per variant, built and traced
once; each timed repetition sets `trainer.options = dataclasses.replace(options,
train_steps=trainer.step + K)` and calls `train()` again, which continues from the current
step on a fresh iterator, exactly like another `fit` call. A fresh Trainer per repetition
would retrace the step every time (1-4 s, more than the timed steps themselves). The timing
therefore includes `train()`'s per-call Python work (iterator creation, loss read-back, log
formatting, the end-of-training `evaluate()`), as `fit`'s timing includes its callbacks. The
diagnostic `tapeloop_loop_only` calls the compiled loop, `trainer.train_loop.run(n, iterator)`,
directly to separate that Python work from the in-graph loop.

This script parses the flags and runs the rest: `workloads.py` (the models and data),
`variants.py` (the variants), `harness.py` (warm-up, timed rounds, retries) and `report.py`
(the tables, and the comparisons under them: `report.COMPARISONS`).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import tensorflow as tf
from harness import RETRIES, measure_workload, subprocess_timings
from report import FOOTNOTE, ComparisonError, check_comparisons, report_workload, source_state
from variants import option_fields, variants_for
from workloads import workloads

import trainer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="~1.5 minute smoke run")
    parser.add_argument("--repeats", type=int, default=None, help="rounds per workload")
    parser.add_argument(
        "--workloads", default="seed_mlp,big_mlp,cnn", help="comma-separated subset"
    )
    parser.add_argument("--no-diagnostics", action="store_true", help="skip diagnostic variants")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="TensorFlow intra- and inter-op threads (default 0: TensorFlow's choice, one per "
        "core); 1 removes cross-thread wake-ups, for measuring small per-step overheads",
    )
    parser.add_argument(
        "--retry-budget",
        type=float,
        default=None,
        help="seconds that re-timing repetitions contended by other processes may add "
        "(default 60, 10 with --quick; 0 disables)",
    )
    parser.add_argument(
        "--no-subprocess", action="store_true", help="skip import / `python -m trainer` timings"
    )
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    chosen = set(args.workloads.split(","))
    selected = [w for w in workloads(args.quick, args.repeats) if w.name in chosen]
    unknown = chosen - {w.name for w in workloads(True, None)}
    if unknown:
        parser.error(f"unknown workload(s): {', '.join(sorted(unknown))}")
    diagnostics = not args.no_diagnostics
    try:  # before anything is timed: every comparison must name variants the run produces
        for w in selected:
            names = [v.name for v in variants_for(w, diagnostics)]
            check_comparisons(w.name, names, diagnostics)
    except ComparisonError as e:
        sys.exit(f"compare.py: error: {e}")

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    # Each Trainer instance traces its own train step and loop, which TensorFlow's retracing
    # detector (keyed by the method, not the instance) reports as "excessive retracing".
    # Real retraces are detected per variant (`tracing_count`) and flagged in the table.
    tf.get_logger().setLevel("ERROR")
    warnings.filterwarnings("ignore", message=".*shuffle=True.*")
    RETRIES.seconds = (
        args.retry_budget if args.retry_budget is not None else (10.0 if args.quick else 60.0)
    )
    t0 = time.perf_counter()

    def log(message: str) -> None:
        print(f"  ... {time.perf_counter() - t0:6.1f} s  {message}", file=sys.stderr, flush=True)

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(
        f"tapeloop benchmark: TF {tf.__version__}, Keras {keras.__version__}, Python "
        f"{platform.python_version()}, {cpu}, {os.cpu_count()} CPUs, "
        f"GPUs: {len(tf.config.list_physical_devices('GPU'))}; intra/inter-op threads: "
        f"{tf.config.threading.get_intra_op_parallelism_threads() or 'default'}/"
        f"{tf.config.threading.get_inter_op_parallelism_threads() or 'default'}; "
        f"TF_ENABLE_ONEDNN_OPTS={os.environ.get('TF_ENABLE_ONEDNN_OPTS', '(unset)')}"
    )
    print(f"trainer from {os.path.dirname(trainer.__file__)} ({source_state()})")
    print(f"TrainerOptions fields: {', '.join(sorted(option_fields()))}")
    print("optimizer Adam(1e-3), sparse CE from logits, random in-memory data (pre-batched)")
    if not args.no_subprocess:
        log("subprocess timings")
        subprocess_timings(1 if args.quick else 3)
    for w in selected:
        results = measure_workload(w, diagnostics, log)
        try:
            report_workload(w, results, diagnostics=diagnostics)
        except ComparisonError as e:
            sys.exit(f"compare.py: error: {e}")
        del results
        keras.backend.clear_session()
    print()
    print(FOOTNOTE)
    print(f"total benchmark wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
