"""Instructions per training step, counted by callgrind: overheads below the timing noise.

On a shared 2-vCPU machine two identical loops differ by 4-8% in time from one run to the
next, so a framework overhead of a few percent cannot be resolved by timing. Instruction
counts are deterministic (two passes of the same loop agree to 0.2%), though an instruction
is not a unit of time: vectorized and memory-bound work differ in cost per instruction.

Usage (from the repository root, with the project installed and valgrind on the PATH):

    # ~75 min on 2 CPU cores (XLA compiles slowly under valgrind), writes callgrind.steps.*
    TF_CPP_MIN_LOG_LEVEL=2 valgrind --tool=callgrind --dump-before=getppid \\
        --callgrind-out-file=callgrind.steps python benchmarks/investigations/instructions.py
    python benchmarks/investigations/instructions.py --summarize callgrind.steps

The run builds four seed-MLP loops (in memory, whole loop under XLA, one TensorFlow thread):
the hand-written loop (`variants.HandArraysXla`), the same returning its mean loss, tapeloop's
`train_arrays` defaults, and those with L2 + DecoupledWeightDecay. Each is compiled and run
once untimed, then each runs `--steps` steps twice, round-robin, each pass ending in a
`getppid()` call that makes callgrind dump its counters (dump 1 is the setup). `--summarize`
prints instructions per step for every pass and the ratios of the second round.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import sys

VARIANTS = ("hand_arrays_xla", "hand_arrays_xla_loss", "tapeloop_arrays", "l2+decoupled_wd")
ROUNDS = 2


def run(steps: int) -> None:
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    # The maintained benchmark's variants and workloads, one folder up.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from variants import HandArraysXla, Tapeloop
    from workloads import ArraysBenchTask, Workload, seed_mlp

    from trainer import L2, DecoupledWeightDecay

    w = Workload("seed_mlp", "", seed_mlp, (784,), 128, 8192, 200, 1)
    variants = [
        HandArraysXla(VARIANTS[0], w, 100),
        HandArraysXla(VARIANTS[1], w, 100, track_loss=True),
        Tapeloop(VARIANTS[2], w, task=ArraysBenchTask),
        Tapeloop(
            VARIANTS[3],
            w,
            task=ArraysBenchTask,
            penalties=lambda: [L2(1e-4), DecoupledWeightDecay(1e-2)],
        ),
    ]
    for v in variants:
        v.build()
        v.run(200)
        v.run(steps)  # compiled, warmed up, untimed
    os.getppid()  # dump 1: the setup
    for _ in range(ROUNDS):
        for v in variants:
            v.run(steps)
            os.getppid()  # a dump: this variant's steps


def summarize(prefix: str, steps: int) -> None:
    def dump_number(path: str) -> int:
        return int(path.rsplit(".", 1)[1])

    dumps = sorted(glob.glob(f"{prefix}.*"), key=dump_number)
    dumps = [d for d in dumps if d.rsplit(".", 1)[1].isdigit() and dump_number(d) >= 2]
    if len(dumps) != ROUNDS * len(VARIANTS):
        sys.exit(f"expected {ROUNDS * len(VARIANTS)} dumps {prefix}.2 ..., found {len(dumps)}")
    counts: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for i, path in enumerate(dumps):
        with open(path) as f:
            total = int(re.search(r"^summary: (\d+)", f.read(), re.M).group(1))
        counts[VARIANTS[i % len(VARIANTS)]].append(total / steps / 1e6)
    print(f"instructions per step (millions), {steps} steps per pass, passes in run order:")
    for name, values in counts.items():
        print(f"  {name:<22}" + "".join(f"{x:10.3f}" for x in values))
    last = {name: values[-1] for name, values in counts.items()}
    print("ratios, last round (A / B - 1):")
    for a, b in (
        ("tapeloop_arrays", "hand_arrays_xla"),
        ("tapeloop_arrays", "hand_arrays_xla_loss"),
        ("hand_arrays_xla_loss", "hand_arrays_xla"),
        ("l2+decoupled_wd", "tapeloop_arrays"),
    ):
        print(f"  {a} vs {b}: {100 * (last[a] / last[b] - 1):+.1f} %")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="steps per timed pass")
    parser.add_argument("--summarize", metavar="PREFIX", help="read PREFIX.2 ... and report")
    args = parser.parse_args()
    if args.steps <= 0 or args.steps % 100:
        parser.error(f"--steps ({args.steps}) must be a positive multiple of 100")
    if args.summarize:
        summarize(args.summarize, args.steps)
    else:
        run(args.steps)


if __name__ == "__main__":
    main()
