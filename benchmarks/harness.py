"""The timing harness: warm-up, round-robin timed rounds, contention retries, `Result`s."""

from __future__ import annotations

import dataclasses
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from variants import Fit, Matmul, Variant, variants_for
from workloads import Workload

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTENDED_CORES = 0.3  # other processes' CPU use (in cores) that marks a repetition contended
MAX_REPETITION_S = 5.0  # a variant slower than this per repetition times fewer steps after


@dataclasses.dataclass
class Result:
    variant: Variant
    first_call_s: float = 0.0
    rates: list[float] = dataclasses.field(default_factory=list)  # steps/s per round
    foreign: list[float] = dataclasses.field(default_factory=list)  # others' CPU, in cores
    cpu_ms: list[float] = dataclasses.field(default_factory=list)  # this process's CPU ms/step
    retries: int = 0
    first_steps: int = 0
    steps: int = 0  # timed steps per repetition (fewer for a very slow variant)
    traces_after_warmup: int | None = None
    traces_after_timing: int | None = None
    loop_ops: int | None = None
    error: str | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.rates)


def steps_for(result: Result) -> int:
    """Timed steps per repetition (matmul: matmuls), before any slow-variant reduction."""
    v = result.variant
    return v.workload.matmul_calls if isinstance(v, Matmul) else v.workload.steps


def while_body_ops(concrete) -> int | None:
    """Nodes in the body of the first While loop of a concrete function's graph, counting
    the nodes of functions it calls (recursively); before Grappler's rewrites."""
    graph_def = concrete.graph.as_graph_def()
    library = {f.signature.name: f for f in graph_def.library.function}
    # The first While in the graph, else in the functions it calls (e.g. an XLA-compiled loop).
    nodes = list(graph_def.node)
    body = None
    for node in nodes:
        if node.op in ("While", "StatelessWhile"):
            body = node.attr["body"].func.name
            break
        called = [v.func.name for v in node.attr.values() if v.HasField("func")]
        nodes += [n for name in called if name in library for n in library[name].node_def]
    if body is None:
        return None

    def count(name: str, seen: tuple[str, ...] = ()) -> int:
        if name not in library or name in seen:
            return 0
        total = 0
        for node in library[name].node_def:
            total += 1
            if node.op in library:
                total += count(node.op, (*seen, name))
            for value in node.attr.values():
                if value.HasField("func"):
                    total += count(value.func.name, (*seen, name))
        return total

    return count(body)


def cpu_ticks() -> tuple[int, int] | None:
    """(busy clock ticks of the whole machine, of this process), from /proc; None elsewhere."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(
                int, f.readline().split()[1:9]
            )
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return user + nice + system + irq + softirq + steal, int(fields[11]) + int(fields[12])
    except (OSError, ValueError, IndexError):
        return None


def timed_run(variant: Variant, steps: int) -> tuple[float, float, float]:
    """(steps/s, this process's CPU ms per step, other processes' CPU use in cores meanwhile)."""
    before = cpu_ticks()
    cpu_start = time.process_time()
    start = time.perf_counter()
    variant.run(steps)
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    after = cpu_ticks()
    foreign = float("nan")
    if before and after:
        ticks = (after[0] - before[0]) - (after[1] - before[1])
        foreign = max(ticks, 0) / os.sysconf("SC_CLK_TCK") / wall
    return steps / wall, 1e3 * cpu / steps, foreign


@dataclasses.dataclass
class RetryBudget:
    """Re-timing of contended repetitions: at most `per_repetition` times each, and at most
    `seconds` added to the whole run."""

    seconds: float = 0.0
    per_repetition: int = 2


RETRIES = RetryBudget()


def warm_up(r: Result, log: Callable[[str], None]) -> None:
    """Builds `r`'s variant and makes its first (tracing, compiling) call, timed apart."""
    v, w = r.variant, r.variant.workload
    try:
        v.build()
        # The first call traces and compiles. In-graph loops take their step count as a
        # tensor, so it may run fewer steps than later calls (`first_steps`); fit runs a
        # whole execution (steps_per_execution steps).
        first = min(v.steps_per_call, w.first_steps) if v.in_graph_loop else v.steps_per_call
        first = 1 if isinstance(v, Matmul) else first
        start = time.perf_counter()
        v.run(first)
        r.first_call_s = time.perf_counter() - start
        r.first_steps = first
        if first == 1:
            v.run(first)  # cheap: anything lazily built on the first call is built
        r.steps = steps_for(r)
        concrete = v.loop_function()
        r.loop_ops = while_body_ops(concrete) if concrete is not None else None
        r.traces_after_warmup = v.tracing_count()
    except Exception as e:  # a variant that breaks is reported, the others still run
        r.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        log(f"  {v.name}: FAILED in warm-up: {r.error}")


def time_repetition(r: Result) -> None:
    """Times one repetition of `r`'s variant (again if contended, while the budget lasts)."""
    steps = r.steps
    rate, cpu_ms, foreign = timed_run(r.variant, steps)
    # Another process took a share of the cores: time it again, while the budget lasts;
    # keep the least contended try.
    for _ in range(RETRIES.per_repetition):
        if not (foreign > CONTENDED_CORES and RETRIES.seconds > 0):
            break
        start = time.perf_counter()
        again = timed_run(r.variant, steps)
        RETRIES.seconds -= time.perf_counter() - start
        r.retries += 1
        if again[2] < foreign:
            rate, cpu_ms, foreign = again
    r.rates.append(rate)
    r.cpu_ms.append(cpu_ms)
    r.foreign.append(foreign)
    if steps / rate > MAX_REPETITION_S:  # a slow variant: time fewer steps from now on
        least = r.variant.steps_per_call if isinstance(r.variant, Fit) else 1
        r.steps = max(least, int(steps * MAX_REPETITION_S / 2 * rate / steps))


def measure_workload(w: Workload, diagnostics: bool, log: Callable[[str], None]) -> list[Result]:
    """`variants_for(w, diagnostics)` warmed up, then timed in `w.repeats` rounds, each round
    every variant once, the order rotated each round so that machine noise hits all alike."""
    w.dataset = w.make_dataset()
    results = [Result(v) for v in variants_for(w, diagnostics)]
    log(f"[{w.name}] building and warming up {len(results)} variants")
    for r in results:
        warm_up(r, log)
    live = [r for r in results if r.error is None]
    load_before = os.getloadavg()[0]
    for round_index in range(w.repeats):
        shift = round_index % len(live)
        order = live[shift:] + live[:shift]  # rotated: no variant always first or last
        for r in order:
            time_repetition(r)
        log(f"[{w.name}] round {round_index + 1}/{w.repeats} done")
    w.load = (load_before, os.getloadavg()[0])
    for r in live:
        r.traces_after_timing = r.variant.tracing_count()
    return results


def subprocess_timings(import_runs: int, print_=print) -> None:
    """`import trainer` and `python -m trainer` (the default task), each in a fresh process."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    code = "import time;t=time.time();import trainer;print(time.time()-t)"
    times = []
    for _ in range(import_runs):
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, cwd=REPO_ROOT, capture_output=True, text=True
        )
        if out.returncode != 0:
            print_(f"import trainer FAILED: {out.stderr.strip().splitlines()[-1:]}")
            break
        times.append(float(out.stdout.strip().splitlines()[-1]))
    if times:
        print_(
            f"import trainer (fresh subprocess, {len(times)} run(s)): median "
            f"{statistics.median(times):.2f} s [{min(times):.2f} .. {max(times):.2f}]"
        )
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "trainer"], env=env, cwd=REPO_ROOT, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    tail = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
    steps = next((ln for ln in reversed(tail) if "steps/s" in ln), "")
    print_(
        f"python -m trainer (default task, TF_CPP_MIN_LOG_LEVEL=2): wall {wall:.1f} s, "
        f"exit {out.returncode}"
        + (f"; last progress line: {steps.strip()[-110:]}" if steps else "")
    )
