"""tapeloop against a jitted JAX + optax loop on the seed MLP in memory, and both against the
time of the step's two large matmuls.

Usage (from the repository root, with the project installed; JAX is not a dependency of
tapeloop: install it into any virtual environment and name its Python):

    python3 -m venv /tmp/jax && /tmp/jax/bin/pip install jax optax
    TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/investigations/jax_mlp.py \\
        --jax_python=/tmp/jax/bin/python
    # ~2 min on 2 CPU cores; more rounds, the XLA programs' op counts, a per-kernel profile:
    TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/investigations/jax_mlp.py \\
        --jax_python=/tmp/jax/bin/python --rounds 7 --hlo --profile

The workload is the seed article's MLP (784-64(relu)-10), batch 128, Adam(1e-3), sparse
cross-entropy from logits, on 8,192 random examples held in memory, 100 steps per call:

  tapeloop         a `Trainer` with `train_arrays` and default options (batches gathered
                   in-graph in a fresh shuffled order each epoch, the whole 100-step loop one
                   XLA computation), timed through `trainer.train_loop.run(100)`
  tapeloop_l2_dwd  the same with `L2(1e-4)` and `DecoupledWeightDecay(1e-4)`
  tf_matmuls       the step's two 128x784x64 matmuls (the first layer's forward product and
                   its kernel gradient), nothing else, in a 100-step XLA loop
  jax              `jax.jit` of a 100-step `lax.fori_loop`: batches cut in order with
                   `dynamic_slice` (no shuffle: less work than tapeloop's gather), the same
                   model, Glorot-uniform init, `optax.adam(1e-3)`
  jax_matmuls      the two matmuls in JAX, as `tf_matmuls`

Each round runs one fresh process per framework, the order alternated from round to round;
in a process, every variant is built and warmed up (traced, compiled), then timed in
repetitions of `--steps` steps, variants interleaved, its median kept. The summary gives the
medians over rounds and the median of the per-round ratios. `--hlo` counts the fusions,
copies and dots in the body of each loop as XLA optimized it (one iteration = one step).
`--profile` lists tapeloop's costliest XLA kernels per step (`profiling.kernel_times`).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

EXAMPLES, FEATURES, HIDDEN, CLASSES, BATCH, PER_CALL = 8192, 784, 64, 10, 128, 100
TF_VARIANTS = ("tapeloop", "tapeloop_l2_dwd", "tf_matmuls")
JAX_VARIANTS = ("jax", "jax_matmuls")
HERE = os.path.dirname(os.path.abspath(__file__))
BENCHMARKS = os.path.dirname(HERE)  # profiling.py, shared with the maintained tasks.py


def data():
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((EXAMPLES, FEATURES), dtype=np.float32)
    return x, rng.integers(0, CLASSES, EXAMPLES).astype(np.int32)


# ---- the TensorFlow process -------------------------------------------------------------


def tf_variants() -> dict:
    """Name: a function running PER_CALL steps and waiting for them."""
    sys.path.insert(0, os.path.dirname(BENCHMARKS))  # the repository: its `trainer`
    import keras
    import tensorflow as tf

    from trainer import L2, DecoupledWeightDecay, Trainer, TrainerOptions

    x, y = data()

    class SeedMlp(Trainer):
        def build_model(self):
            return keras.Sequential(
                [
                    keras.Input((FEATURES,)),
                    keras.layers.Dense(HIDDEN, activation="relu"),
                    keras.layers.Dense(CLASSES),
                ]
            )

        def train_arrays(self):
            return x, y

        def compute_loss(self, labels, outputs):
            return keras.losses.sparse_categorical_crossentropy(labels, outputs, from_logits=True)

    def tapeloop(penalties):
        options = TrainerOptions(batch_size=BATCH, steps_per_loop=PER_CALL, train_steps=10**9)
        loop = SeedMlp(options, penalties=penalties).train_loop
        return lambda: loop.run(PER_CALL)  # reads the losses back: waits for the steps

    batch = tf.constant(x[:BATCH])
    kernel = tf.Variable(tf.random.normal((FEATURES, HIDDEN), seed=1) * 0.05)

    @tf.function(jit_compile=True)
    def matmuls():
        def body(i, w):
            hidden = batch @ w
            return i + 1, w - 1e-6 * tf.matmul(batch, hidden, transpose_a=True)

        _, w = tf.while_loop(lambda i, w: i < PER_CALL, body, [0, kernel.read_value()])
        kernel.assign(w)
        return w[0, 0]

    return {
        "tapeloop": tapeloop([]),
        "tapeloop_l2_dwd": tapeloop([L2(1e-4), DecoupledWeightDecay(1e-4)]),
        "tf_matmuls": lambda: float(matmuls()),
    }


# ---- the JAX process (no TensorFlow imported) -------------------------------------------


def jax_variants() -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    x_np, y_np = data()
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))

    def glorot(key, shape):
        limit = np.sqrt(6 / sum(shape))
        return jax.random.uniform(key, shape, jnp.float32, -limit, limit)

    params = {
        "w1": glorot(k1, (FEATURES, HIDDEN)),
        "b1": jnp.zeros(HIDDEN),
        "w2": glorot(k2, (HIDDEN, CLASSES)),
        "b2": jnp.zeros(CLASSES),
    }
    optimizer = optax.adam(1e-3)
    batches = EXAMPLES // BATCH

    def loss_fn(p, xb, yb):
        logits = jax.nn.relu(xb @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    @jax.jit
    def train(p, state, start):
        def body(i, carry):
            p, state, total = carry
            offset = ((start + i) % batches) * BATCH
            xb = jax.lax.dynamic_slice_in_dim(x, offset, BATCH)
            yb = jax.lax.dynamic_slice_in_dim(y, offset, BATCH)
            loss, grads = jax.value_and_grad(loss_fn)(p, xb, yb)
            updates, state = optimizer.update(grads, state, p)
            return optax.apply_updates(p, updates), state, total + loss

        return jax.lax.fori_loop(0, PER_CALL, body, (p, state, 0.0))

    carry = {"p": params, "state": optimizer.init(params), "step": 0}

    def run_train():
        p, state, total = train(carry["p"], carry["state"], carry["step"])
        carry.update(p=p, state=state, step=carry["step"] + PER_CALL)
        float(total)  # waits, as tapeloop's read-back of the losses does

    batch = x[:BATCH]

    @jax.jit
    def matmuls(w):
        def body(i, w):
            return w - 1e-6 * (batch.T @ (batch @ w))

        return jax.lax.fori_loop(0, PER_CALL, body, w)

    kernel = {"w": params["w1"]}

    def run_matmuls():
        kernel["w"] = matmuls(kernel["w"]).block_until_ready()

    return {"jax": run_train, "jax_matmuls": run_matmuls}


def worker(framework: str, steps: int, reps: int, profile: bool) -> None:
    """Builds, warms up and times this framework's variants; prints one RESULT line."""
    variants = tf_variants() if framework == "tf" else jax_variants()
    for run in variants.values():
        for _ in range(3):
            run()
    calls = max(1, steps // PER_CALL)
    rates = collections.defaultdict(list)
    names = list(variants)
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            start = time.perf_counter()
            for _ in range(calls):
                variants[name]()
            rates[name].append(calls * PER_CALL / (time.perf_counter() - start))
    result = {"rates": {n: statistics.median(r) for n, r in rates.items()}}
    if profile and framework == "tf":
        from profiling import kernel_times, top_kernels

        result["profile"] = {}
        for name in ("tapeloop", "tapeloop_l2_dwd"):

            def run(name=name):
                for _ in range(calls):
                    variants[name]()

            result["profile"][name] = top_kernels(kernel_times(run, calls * PER_CALL))
    print("RESULT " + json.dumps(result), flush=True)


# ---- the driver ---------------------------------------------------------------------------


def spawn(python: str, framework: str, args, extra_env: dict | None = None) -> dict:
    command = [python, os.path.abspath(__file__), f"--worker={framework}"]
    command += [f"--steps={args.steps}", f"--reps={args.reps}"]
    command += ["--profile"] if args.profile and framework == "tf" else []
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(extra_env or {})}
    out = subprocess.run(command, env=env, capture_output=True, text=True, cwd=HERE)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
    sys.exit(f"jax_mlp.py: the {framework} process failed (exit {out.returncode}): {tail}")


def loop_body_counts(paths: list[str]) -> dict[str, int] | None:
    """Fusions, copies and matrix products in the body of the while loop with the most
    products, over these modules XLA dumped after optimization: what one train step executes.
    `dot` counts XLA's own dots (Eigen calls on CPU), `library` the fusions XLA hands to a
    kernel library (YNNPACK's in JAX's XLA), `fusion` the others."""
    best = None
    for path in paths:
        with open(path) as f:
            text = f.read()
        computations = {}
        for block in re.split(r"\n(?=\S)", text):
            header = re.match(r"(?:ENTRY )?%?(\S+) ", block)
            if header:
                computations[header.group(1)] = block
        for body in set(re.findall(r"body=%?([\w.\-]+)", text)):
            ops = collections.Counter()
            for line in computations.get(body, "").splitlines():
                op = re.search(r"= (?:\([^=]*?\)|\S+) (fusion|copy|dot)\(", line)
                if op:
                    ops["library" if "kind=kCustom" in line else op.group(1)] += 1
            if best is None or ops["dot"] + ops["library"] > best["dot"] + best["library"]:
                best = {k: ops[k] for k in ("fusion", "library", "dot", "copy")}
    return best


def hlo_counts(args) -> None:
    print("\nXLA's optimized loop body (one train step): ops that run")
    for framework, python in (("tf", sys.executable), ("jax", args.jax_python)):
        with tempfile.TemporaryDirectory() as dump:
            flags = f"--xla_dump_to={dump} --xla_dump_hlo_as_text"
            one = argparse.Namespace(steps=PER_CALL, reps=1, profile=False)
            spawn(python, framework, one, {"XLA_FLAGS": flags})
            # Every variant's loop is dumped: count each variant's own module alone.
            for name in TF_VARIANTS if framework == "tf" else JAX_VARIANTS:
                print(f"  {name:<16} {loop_body_counts(_modules_of(dump, name))}")


def _modules_of(dump: str, name: str) -> list[str]:
    """The dumped, optimized modules of `name`'s loop."""
    patterns = {
        "tapeloop": "*_steps_*",
        "tapeloop_l2_dwd": "*_steps_*",
        "tf_matmuls": "*_matmuls_*",
        "jax": "*jit_train*",
        "jax_matmuls": "*jit_matmuls*",
    }
    paths = sorted(glob.glob(os.path.join(dump, patterns[name] + "after_optimizations.txt")))
    if name.startswith("tapeloop") and len(paths) >= 2:  # built in this order
        paths = [paths[TF_VARIANTS.index(name)]]
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jax_python", default=sys.executable,
                        help="a Python that can import jax and optax")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=5, help="process pairs, alternated")
    parser.add_argument("--steps", type=int, default=3000, help="steps per timed repetition")
    parser.add_argument("--reps", type=int, default=3, help="repetitions per variant/process")
    parser.add_argument("--hlo", action="store_true", help="count the loop bodies' XLA ops")
    parser.add_argument("--profile", action="store_true", help="tapeloop's costliest kernels")
    parser.add_argument("--worker", choices=("tf", "jax"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        sys.path.insert(0, BENCHMARKS)
        worker(args.worker, args.steps, args.reps, args.profile)
        return
    check = subprocess.run([args.jax_python, "-c", "import jax, optax"], capture_output=True)
    if check.returncode != 0:
        print(f"jax_mlp.py: --jax_python={args.jax_python} cannot import jax and optax; "
              "pass a Python that can (python3 -m venv /tmp/jax && /tmp/jax/bin/pip install "
              "jax optax)", file=sys.stderr)  # fmt: skip
        sys.exit(2)
    version = subprocess.run(
        [args.jax_python, "-c", "import jax, optax; print(jax.__version__, optax.__version__)"],
        capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    import tensorflow as tf

    print(f"TF {tf.__version__}, JAX {version[0]}, optax {version[1]}; {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.1f} at start")  # fmt: skip
    rounds = collections.defaultdict(list)
    profile = None
    for index in range(args.rounds):
        order = [("tf", sys.executable), ("jax", args.jax_python)]
        for framework, python in order if index % 2 == 0 else order[::-1]:
            result = spawn(python, framework, args)
            for name, rate in result["rates"].items():
                rounds[name].append(rate)
            profile = result.get("profile", profile)
        line = ", ".join(f"{n} {rounds[n][-1]:.0f}" for n in (*TF_VARIANTS, *JAX_VARIANTS))
        print(f"round {index + 1}/{args.rounds}: steps/s {line}", flush=True)
    report(rounds)
    if profile:
        for name, lines in profile.items():
            print(f"\n{name}: the costliest XLA kernels (profiled)\n" + "\n".join(lines))
    if args.hlo:
        hlo_counts(args)
    print(f"load average {os.getloadavg()[0]:.1f} at the end; a shared machine: noisy numbers")


def report(rounds: dict[str, list[float]]) -> None:
    print(f"\n{'variant':<16} {'steps/s':>8} {'ms/step':>8}  rounds")
    for name in (*TF_VARIANTS, *JAX_VARIANTS):
        rates = rounds[name]
        median = statistics.median(rates)
        listed = " ".join(f"{r:.0f}" for r in rates)
        print(f"{name:<16} {median:8.0f} {1000 / median:8.3f}  [{listed}]")

    def ratio(a: str, b: str) -> str:
        ratios = [x / y for x, y in zip(rounds[a], rounds[b])]
        return (f"{statistics.median(ratios):.2f}x (median of per-round ratios; range "
                f"{min(ratios):.2f}-{max(ratios):.2f})")  # fmt: skip

    print(f"\ntapeloop / jax (steps/s): {ratio('tapeloop', 'jax')}")
    print(f"tapeloop_l2_dwd / tapeloop: {ratio('tapeloop_l2_dwd', 'tapeloop')}")
    print(
        f"step over its two matmuls: tapeloop {ratio('tf_matmuls', 'tapeloop')}; "
        f"jax {ratio('jax_matmuls', 'jax')}"
    )
    print(f"the two matmuls, tf / jax: {ratio('tf_matmuls', 'jax_matmuls')}")


if __name__ == "__main__":
    main()
