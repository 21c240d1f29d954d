"""The report: per-workload tables, and the A-vs-B comparisons (`COMPARISONS`, as data)."""

from __future__ import annotations

import dataclasses
import statistics
import subprocess
from collections.abc import Iterable
from typing import Any

from harness import CONTENDED_CORES, REPO_ROOT, Result, steps_for
from variants import MATMUL_N, Matmul
from workloads import Workload, train_flops, workloads


class ComparisonError(Exception):
    """A comparison names a variant (or workload) that the run does not produce."""


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One line "overhead of `a` over `b`" under a workload's table.

    It is expected on the workloads named in `workloads` (None: every workload), and if
    `diagnostic`, only when the diagnostic variants run. Where it is expected, both variants
    must be among the run's (a variant that failed is reported as such); otherwise
    `check_comparisons` raises, so that a renamed variant cannot silently drop a line.
    """

    label: str
    a: str
    b: str
    workloads: tuple[str, ...] | None = None
    diagnostic: bool = False

    def expected(self, workload: str, diagnostics: bool) -> bool:
        return (self.workloads is None or workload in self.workloads) and (
            diagnostics or not self.diagnostic
        )


SEED = ("seed_mlp",)  # penalties, diagnostics, and tapeloop_spl (more steps than 100 per call)
MLPS = ("seed_mlp", "big_mlp")  # hand_arrays_xla: not on the CNN (XLA:CPU convolutions)
DIAGNOSTICS = (
    "tapeloop_loop_only",
    "hand_100+run",
    "hand_100+run+loss",
    "hand_100+run+loss+acc",
    "hand_100+all+break",
)
COMPARISONS: tuple[Comparison, ...] = (
    Comparison("framework: tapeloop vs hand_loop_100 (same steps/call)", "tapeloop",
               "hand_loop_100"),
    Comparison("tapeloop_spl vs hand_loop_100", "tapeloop_spl", "hand_loop_100", SEED),
    Comparison("tapeloop_fast vs hand_loop_100", "tapeloop_fast", "hand_loop_100"),
    Comparison("tapeloop vs fit_spe100 (same steps/call)", "tapeloop", "fit_spe100"),
    Comparison("framework, in-memory + XLA: tapeloop_arrays vs hand_arrays_xla",
               "tapeloop_arrays", "hand_arrays_xla", MLPS),
    Comparison("defaults (in-memory): tapeloop_arrays vs fit", "tapeloop_arrays", "fit"),
    Comparison("tapeloop_arrays vs fit_spe100", "tapeloop_arrays", "fit_spe100"),
    Comparison("hand_loop_100 vs fit_spe100", "hand_loop_100", "fit_spe100"),
    Comparison("hand_loop (1 step/call) vs hand_loop_100", "hand_loop", "hand_loop_100"),
    *(
        Comparison(f"penalty {name[4:]} vs none (tapeloop_arrays)", name, "tapeloop_arrays", SEED)
        for name in ("pen_l2", "pen_selective_l2", "pen_decoupled_wd", "pen_l2+decoupled_wd")
    ),
    Comparison("strength schedule: pen_l2_cosine vs pen_l2", "pen_l2_cosine", "pen_l2", SEED),
    *(
        Comparison(f"technique {name[5:]} vs off (tapeloop_arrays)", name, "tapeloop_arrays", SEED)
        for name in ("tech_cosine_warmup", "tech_clip", "tech_accumulate_2", "tech_ema",
                     "tech_sam", "tech_asam",
                     "tech_swa", "tech_param_groups", "tech_train_metrics")
    ),
    *(
        Comparison(f"diagnostic {name} vs hand_loop_100", name, "hand_loop_100", SEED, True)
        for name in DIAGNOSTICS
    ),
    Comparison("diagnostic tapeloop_arrays vs hand_arrays_xla_loss", "tapeloop_arrays",
               "hand_arrays_xla_loss", SEED, True),
    Comparison("noise floor: hand_arrays_xla_twin vs hand_arrays_xla (identical)",
               "hand_arrays_xla_twin", "hand_arrays_xla", SEED, True),
    Comparison("diagnostic tapeloop (train()) vs tapeloop_loop_only", "tapeloop",
               "tapeloop_loop_only", SEED, True),
    Comparison("diagnostic tapeloop_loop_only vs hand_100+all+break", "tapeloop_loop_only",
               "hand_100+all+break", SEED, True),
)  # fmt: skip


def check_comparisons(workload: str, variants: Iterable[str], diagnostics: bool) -> None:
    """Raises `ComparisonError` if a comparison names a workload that does not exist, or if
    one expected on `workload` names a variant not in `variants` (what the run produces)."""
    known = {w.name for quick in (True, False) for w in workloads(quick, None)}
    for c in COMPARISONS:
        unknown = sorted(set(c.workloads or ()) - known)
        if unknown:
            raise ComparisonError(
                f"comparison {c.label!r} names unknown workload(s) {', '.join(unknown)} "
                f"(the workloads: {', '.join(sorted(known))}); update report.COMPARISONS"
            )
    names = set(variants)
    for c in COMPARISONS:
        missing = [v for v in (c.a, c.b) if v not in names]
        if missing and c.expected(workload, diagnostics):
            raise ComparisonError(
                f"comparison {c.label!r} is expected on workload {workload!r}"
                f"{' (diagnostics on)' if c.diagnostic else ''}, but the run produced no variant "
                f"named {', '.join(repr(v) for v in missing)} there (its variants: "
                f"{', '.join(sorted(names))}). A variant renamed or dropped? Update "
                "report.COMPARISONS (names, or its workloads= / diagnostic= fields)"
            )


def paired_ratio(a: Result, b: Result) -> float:
    """Median over rounds of a's steps/s / b's steps/s in the same round."""
    return statistics.median(x / y for x, y in zip(a.rates, b.rates))


def paired_overhead(a: Result, b: Result) -> tuple[float, float, float, float, float]:
    """Overheads of a over b in %: wall step time (t_a / t_b - 1 = rate_b / rate_a - 1) as the
    median and range of the per-round pairs, best (highest rate) against best, and this
    process's CPU time per step as the median of the per-round pairs."""
    values = sorted((rb / ra - 1.0) * 100.0 for ra, rb in zip(a.rates, b.rates))
    best = (max(b.rates) / max(a.rates) - 1.0) * 100.0
    cpu = statistics.median((ca / cb - 1.0) * 100.0 for ca, cb in zip(a.cpu_ms, b.cpu_ms))
    return statistics.median(values), values[0], values[-1], best, cpu


GROUP_TITLES = {
    "penalty": "-- penalties: tapeloop_arrays (defaults, in-memory; none = that row)",
    "technique": "-- techniques: tapeloop_arrays with one option on (off = that row)",
    "diagnostic": "-- diagnostics: hand_loop_100 plus tapeloop's extra work, piece by piece; "
    "tapeloop's in-graph loop alone",
}
FOOTNOTE = (
    "x fit / x spe100: median per-round ratio of steps/s to fit / fit_spe100 (>1 = faster). "
    "CPU ms: this process's CPU time per step (all its threads), median. "
    "x floor: measured step time / (FLOPs per step / best sustained matmul GFLOP/s). "
    "~trace s: first call (100 steps, 5 on the big workloads; fit: one execution) minus "
    "its steps at the median rate. ops/step: graph ops in one "
    "iteration of the in-graph loop, before Grappler. cont.: repetitions during which "
    f"other processes used more than {CONTENDED_CORES} core (after re-timing)."
)


def fmt_rate(x: float) -> str:
    return f"{x:.1f}" if x < 100 else f"{x:.0f}"


def print_table(w: Workload, results: list[Result], floor_s: float, print_=print) -> None:
    """The variants' table (matmuls left out): one row per variant, by group."""
    by_name = {r.variant.name: r for r in results if r.error is None}
    fit, fit100 = by_name.get("fit"), by_name.get("fit_spe100")
    header = (
        f"{'variant':<22}{'steps/call':>10}{'first call s':>13}{'~trace s':>9}"
        f"{'steps/s med':>12}{'[min .. max]':>18}{'ms/step':>9}{'CPU ms':>8}"
        f"{'x fit':>7}{'x spe100':>9}"
        f"{'x floor':>8}{'ops/step':>9}{'cont.':>6}  notes"
    )
    print_(header)
    print_("-" * len(header))
    group = "main"
    for r in results:
        v = r.variant
        if isinstance(v, Matmul):
            continue
        if v.group != group:
            group = v.group
            print_(GROUP_TITLES.get(group, f"-- {group}"))
        if r.error:
            print_(f"{v.name:<22}  FAILED: {r.error}")
            continue
        med = r.median
        trace = r.first_call_s - r.first_steps / med
        spread = f"[{fmt_rate(min(r.rates))} .. {fmt_rate(max(r.rates))}]"
        notes = [v.note] if v.note else []
        if r.steps != steps_for(r):
            notes.append(f"slow: timed {r.steps} steps/repetition after the first")
        if (
            r.traces_after_timing is not None
            and r.traces_after_warmup is not None
            and r.traces_after_timing != r.traces_after_warmup
        ):
            notes.append(
                f"RETRACED during timing ({r.traces_after_warmup}->{r.traces_after_timing})"
            )
        print_(
            f"{v.name:<22}{v.steps_per_call:>10}{r.first_call_s:>13.2f}{trace:>9.2f}"
            f"{fmt_rate(med):>12}{spread:>18}"
            f"{1e3 / med:>9.3f}{statistics.median(r.cpu_ms):>8.3f}"
            f"{(paired_ratio(r, fit) if fit else float('nan')):>7.2f}"
            f"{(paired_ratio(r, fit100) if fit100 else float('nan')):>9.2f}"
            f"{(1.0 / med) / floor_s:>8.1f}"
            f"{(str(r.loop_ops) if r.loop_ops is not None else '-'):>9}"
            f"{sum(f > CONTENDED_CORES for f in r.foreign):>6}"
            f"  {'; '.join(notes)}"
        )


def report_workload(
    w: Workload,
    results: list[Result],
    *,
    diagnostics: bool,
    print_=print,
) -> dict[str, Any]:
    """Prints `w`'s header, table and comparisons; returns the GFLOP/s and the overheads.

    Raises:
      ComparisonError: a comparison expected on `w` names a variant the run did not produce.
    """
    check_comparisons(w.name, [r.variant.name for r in results], diagnostics)
    by_name = {r.variant.name: r for r in results if r.error is None}
    macs, flops = train_flops(w)
    gflops = {}
    for name in ("matmul", "matmul_xla"):
        if name in by_name:
            per_call = 2 * MATMUL_N**3
            gflops[name] = by_name[name].median * per_call / 1e9
    sustained = max(gflops.values()) if gflops else float("nan")
    floor_s = flops / (sustained * 1e9)
    print_()
    print_(f"=== {w.title}: batch {w.batch_size}, {w.steps} timed steps x {w.repeats} rounds ===")
    print_(
        f"FLOPs/step = 3 x 2 x forward MACs/example x batch = 6 x {macs:,} x {w.batch_size} "
        f"= {flops / 1e9:.3f} GFLOP (Dense+Conv only; an upper estimate: the first layer's "
        "input gradient is not computed)"
    )
    print_(
        "sustained matmul (2048^2 float32, median): "
        + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in gflops.items())
        + f"; floor uses {sustained:.1f} GFLOP/s -> {floor_s * 1e3:.3f} ms/step"
    )
    foreign = [f for r in by_name.values() for f in r.foreign if f == f]  # not NaN
    if foreign:
        contended = sum(f > CONTENDED_CORES for f in foreign)
        retries = sum(r.retries for r in by_name.values())
        print_(
            "other processes' CPU during the timed repetitions: median "
            f"{statistics.median(foreign):.2f} cores, max {max(foreign):.2f}; {contended} of "
            f"{len(foreign)} repetitions contended "
            f"(> {CONTENDED_CORES} core) after {retries} re-timings; 1-min load average "
            f"{w.load[0]:.2f} -> {w.load[1]:.2f}"
        )
    print_table(w, results, floor_s, print_)
    summary: dict[str, Any] = {"gflops": gflops}
    lines = []
    failed = {r.variant.name: r.error for r in results if r.error is not None}
    for c in COMPARISONS:
        if not c.expected(w.name, diagnostics):
            continue
        broken = [v for v in (c.a, c.b) if v in failed]
        if broken:  # its row says FAILED; the comparison says so too, rather than vanish
            lines.append(f"  {c.label:<60}not measured: {', '.join(broken)} FAILED in warm-up")
            continue
        med, lo, hi, best, cpu = paired_overhead(by_name[c.a], by_name[c.b])
        summary[f"{c.a} vs {c.b}"] = med
        lines.append(
            f"  {c.label:<60}{med:+7.1f} %  [{lo:+6.1f} .. {hi:+6.1f}]  best/best {best:+6.1f} %"
            f"  CPU/step {cpu:+6.1f} %"
        )
    if lines:
        print_(
            "overhead of A over B (t_A / t_B - 1; positive: A is slower): wall step time, "
            "median of the per-round pairs [their range]; A's best round against B's best; "
            "CPU time per step, median of the per-round pairs:"
        )
        for line in lines:
            print_(line)
    return summary


def source_state() -> str:
    """The commit, and how many files of trainer/ differ from it (a benchmark of work in
    progress says so)."""
    try:
        head = subprocess.run(
            ["git", "-C", REPO_ROOT, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", REPO_ROOT, "status", "--porcelain", "--", "trainer"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return "no git"
    return f"commit {head}" + (f", {len(dirty)} uncommitted file(s) in trainer/" if dirty else "")
