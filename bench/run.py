"""``make bench``: pricing throughput and latency on one core, against a same-run reference.

What is measured (all on 30-line baskets from ``bench.synthetic``):

* **engine**: ``agent.engine.price`` on pre-parsed baskets and members against
  the 200-rule synthetic ruleset: baskets/s, p50 and p99 latency per basket.
  This is the figure the target (>= 5,000 baskets/s) is about.  The engine
  memoises on the ruleset (which rules hold at a moment, which rules touch a
  line), so it is measured three ways: *warm* (the same 400 baskets over and
  over: every lookup hits, the upper bound), *day replay* (2,000 new baskets
  of one member day in time order, caches starting empty: what head office
  auditing a store's day, or a busy POS API, sees) and *cold* (every cache
  emptied before each basket: the lower bound, e.g. the first sale after a
  promotion window opens).
* **request**: what the POS API does per ``POST /v1/price``: decode the JSON
  body, validate it (``parse_basket``), price, serialise (``to_json``).  The
  member comes from the lane's cache, already parsed, as in production.
* **reference**: the same request without pricing: decode, validate, and
  serialise the (precomputed) response document.  It is the unavoidable I/O
  floor of the API on this machine and Python, measured in the same run, so
  the ratio ``engine / reference`` compares across machines where the absolute
  figures do not.
* **scaling**: engine throughput and latency (warm and cold), ruleset load
  time and the memory the compiled ruleset keeps (tracemalloc) for 10, 100,
  200 and 1,000 rules.

The measurements run interleaved, one pass of each per round, so a slow
moment of a shared machine slows them all alike and the ratios hold even when
the absolute figures drift.  Everything runs in this one Python thread, pinned
to the idlest CPU where the OS allows it, so the figures are single-core by
construction.  Results print as one table (progress goes to stderr) and are
written to ``bench/results/latest.json`` with the machine's description, for
comparing commits.  ``--profile`` prints a cProfile of the engine instead.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import datetime as dt
import gc
import json
import os
import platform
import pstats
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic

from agent.basket import Basket, Member, parse_basket, parse_member
from agent.engine import PricedBasket, price
from agent.render import to_json, to_wire
from agent.ruleset import Ruleset, parse_ruleset
from bench.synthetic import LINES_PER_BASKET, Catalogue, make_catalogue, make_requests, make_ruleset

TARGET = 5_000  # baskets/s, engine only, 200 rules, 30 lines (issue 2)
MAIN_RULES = 200
SCALING_RULES = (10, 100, 200, 1_000)
# A member day (the 10th): the busiest kind of day, and the one with the most rules in force.
REPLAY_DAY = dt.date(2026, 12, 10)
REPLAY_BASKETS = 2_000
REPLAY_EVERY = 4  # rounds: a replay pass is long, and one every few rounds samples it enough
RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"


@dataclass(frozen=True, slots=True)
class Case:
    """A ruleset and the requests priced against it, in every form the measurements need."""

    rules: int
    text: str
    ruleset: Ruleset
    load_ms: float
    compiled_kib: float
    bodies: tuple[str, ...]  # the JSON request bodies, as the POS sends them
    parsed: tuple[tuple[Basket, Member | None], ...]
    members: tuple[Member | None, ...]


@dataclass(slots=True)
class Measurement:
    """One thing measured: ``work(i)`` over ``items``, one pass per round it takes part in."""

    key: str
    title: str
    rules: int
    work: Callable[[int], object]
    items: int
    before_pass: Callable[[], None] | None = None  # e.g. empty the caches: every pass starts cold
    every: int = 1  # take part in every n-th round
    warm_up: bool = True  # an untimed pass first
    latencies: list[int] = field(default_factory=list)
    nanoseconds: int = 0

    def figures(self) -> dict[str, float]:
        ordered = sorted(self.latencies)
        seconds = self.nanoseconds / 1e9
        return {
            "baskets": len(ordered),
            "seconds": round(seconds, 3),
            "per_second": round(len(ordered) / seconds, 1),
            "mean_ms": round(sum(ordered) / len(ordered) / 1e6, 4),
            "p50_ms": round(_percentile(ordered, 0.50), 4),
            "p99_ms": round(_percentile(ordered, 0.99), 4),
        }


class Progress:
    """Progress on stderr: one line per step, updated in place on a terminal."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.step = 0
        self.tty = sys.stderr.isatty()
        self.title = ""
        self.last = 0.0

    def start(self, title: str) -> None:
        self.step += 1
        self.title = f"[{self.step}/{self.steps}] {title}"
        self.last = 0.0
        sys.stderr.write(self.title + (" ..." if self.tty else " ...\n"))
        sys.stderr.flush()

    def update(self, text: str) -> None:
        now = time.monotonic()
        if self.tty and now - self.last >= 0.2:
            self.last = now
            sys.stderr.write(f"\r\x1b[K{self.title} ... {text}")
            sys.stderr.flush()
        elif not self.tty and now - self.last >= 5:
            self.last = now
            sys.stderr.write(f"    {text}\n")
            sys.stderr.flush()

    def done(self, text: str) -> None:
        if self.tty:
            sys.stderr.write(f"\r\x1b[K{self.title}: {text}\n")
        else:
            sys.stderr.write(f"    {text}\n")
        sys.stderr.flush()


def _percentile(ordered: Sequence[int], fraction: float) -> float:
    index = min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))
    return ordered[index] / 1e6


def run_rounds(measurements: Sequence[Measurement], budget_seconds: float, progress: Progress) -> int:
    """One timed pass of each measurement per round, until ``budget_seconds`` have passed.

    Whole passes keep each mix of baskets identical between rounds and runs.
    Each call is timed on its own for the latency percentiles; throughput is
    the calls over the summed wall time of that measurement's passes.
    Returns the number of rounds.
    """
    for m in measurements:
        if m.warm_up:
            for i in range(m.items):
                m.work(i)
    gc.collect()
    clock = time.perf_counter_ns
    started = clock()
    deadline = started + int(budget_seconds * 1e9)
    rounds = 0
    while rounds == 0 or clock() < deadline:
        for m in measurements:
            if rounds % m.every:
                continue
            if m.before_pass is not None:
                m.before_pass()
            work, latencies = m.work, m.latencies
            pass_started = clock()
            for i in range(m.items):
                t0 = clock()
                work(i)
                latencies.append(clock() - t0)
            m.nanoseconds += clock() - pass_started
        rounds += 1
        elapsed = (clock() - started) / 1e9
        progress.update(f"round {rounds}, {elapsed:.0f} of {budget_seconds:.0f} s")
    return rounds


def _compiled_kib(text: str) -> float:
    """Memory the compiled ruleset keeps alive (tracemalloc; measured apart from the timing)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        ruleset = parse_ruleset(text)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    del ruleset
    return round((after - before) / 1024, 1)


def ruleset_caches(ruleset: Ruleset) -> list[dict[Any, Any]]:
    """The memo tables the engine keeps on a ruleset (``identity_cache``, ``day_cache``, ...).

    Found by name (every dict attribute ending in ``_cache``) so that the
    benchmark keeps measuring a true cold start when the engine grows another.
    """
    names = (name for name in dir(ruleset) if name.endswith("_cache"))
    return [value for value in (getattr(ruleset, name) for name in names) if isinstance(value, dict)]


def clear_caches(ruleset: Ruleset) -> None:
    for cache in ruleset_caches(ruleset):
        cache.clear()


def engine_worker(case: Case, *, cold: bool) -> Callable[[int], object]:
    """``price`` on the i-th parsed basket; ``cold`` empties the ruleset's caches first."""
    ruleset = case.ruleset
    parsed = case.parsed
    if cold:
        clears = [cache.clear for cache in ruleset_caches(ruleset)]

        def work_cold(i: int) -> object:
            for clear in clears:
                clear()
            basket, member = parsed[i]
            return price(basket, member, ruleset)

        return work_cold

    def work(i: int) -> object:
        basket, member = parsed[i]
        return price(basket, member, ruleset)

    return work


def build_case(rules: int, seed: int, catalogue: Catalogue, baskets: int, day: dt.date | None = None) -> Case:
    synthetic = make_ruleset(rules, seed, catalogue)
    loads = []
    for _ in range(3):
        t0 = time.perf_counter()
        ruleset = parse_ruleset(synthetic.text, source=f"synthetic-{rules}")
        loads.append(time.perf_counter() - t0)
    requests = make_requests(baskets, seed, catalogue, synthetic.coupon_codes, day=day)
    bodies = tuple(json.dumps(basket, ensure_ascii=False) for basket, _ in requests)
    members = tuple(None if member is None else parse_member(member) for _, member in requests)
    parsed = tuple((parse_basket(json.loads(body)), member) for body, member in zip(bodies, members, strict=True))
    return Case(
        rules,
        synthetic.text,
        ruleset,
        round(min(loads) * 1000, 2),
        _compiled_kib(synthetic.text),
        bodies,
        parsed,
        members,
    )


def own_ruleset(case: Case) -> Case:
    """The same case with a ruleset object of its own, so emptying its caches leaves the other's warm."""
    return dataclasses.replace(case, ruleset=parse_ruleset(case.text, source=f"synthetic-{case.rules}"))


def check_outputs(case: Case) -> dict[str, float]:
    """Price every basket once, check lines sum to totals, and describe the workload."""
    lines = discounted = discounts = basket_discounts = points = 0
    basket_stage = {r.id for r in case.ruleset.rules if r.stage == "basket"}
    for basket, member in case.parsed:
        priced: PricedBasket = price(basket, member, case.ruleset)
        if sum(pl.net_fen for pl in priced.lines) != priced.net_fen:
            raise AssertionError(f"lines do not sum to the total for {case.rules} rules")
        for pl in priced.lines:
            lines += 1
            discounted += bool(pl.discounts)
            discounts += len(pl.discounts)
            basket_discounts += sum(d.rule_id in basket_stage for d in pl.discounts)
        points += bool(priced.points)
    n = len(case.parsed)
    return {
        "lines_discounted_share": round(discounted / lines, 3),
        "discounts_per_line": round(discounts / lines, 2),
        "basket_rule_discounts_per_basket": round(basket_discounts / n, 2),
        "baskets_with_points_share": round(points / n, 3),
        "member_share": round(sum(m is not None for m in case.members) / n, 3),
    }


def _git(*args: str) -> str | None:
    """Output of a git command in this checkout, or None (no git, not a checkout)."""
    command = ["git", "-C", str(Path(__file__).resolve().parent), *args]
    try:
        # A fixed command, no user input: it only labels the results with the commit measured.
        done = subprocess.run(command, capture_output=True, text=True, check=True)  # noqa: S603
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.strip()


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for row in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if row.startswith("model name"):
                cpu = row.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    status = _git("status", "--porcelain")
    return {
        "cpu_model": cpu,
        "cpus_online": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "pydantic": pydantic.VERSION,
        "git_commit": _git("rev-parse", "HEAD") or None,
        "git_dirty": None if status is None else bool(status),
    }


def _idle_ticks() -> dict[int, int]:
    """Idle + iowait ticks per CPU from /proc/stat (Linux); empty elsewhere."""
    ticks = {}
    try:
        rows = Path("/proc/stat").read_text(encoding="ascii").splitlines()
    except OSError:
        return {}
    for row in rows:
        name, *fields = row.split()
        if name.startswith("cpu") and name[3:].isdigit() and len(fields) >= 5:
            ticks[int(name[3:])] = int(fields[3]) + int(fields[4])
    return ticks


def pin_to_one_cpu() -> int | None:
    """Pin this process to the idlest allowed CPU (Linux); returns it, or None where not possible.

    The idlest, not the first: on a shared machine another busy process would
    otherwise halve the figures, and pinning then keeps the scheduler from
    moving the benchmark between cores mid-measurement.
    """
    if not hasattr(os, "sched_setaffinity"):
        return None
    try:
        allowed = os.sched_getaffinity(0)
        before = _idle_ticks()
        time.sleep(0.3)
        after = _idle_ticks()
        idle = {cpu: after.get(cpu, 0) - before.get(cpu, 0) for cpu in allowed}
        cpu = max(sorted(allowed), key=lambda c: idle[c])  # ties: the lowest number
        os.sched_setaffinity(0, {cpu})
    except OSError:
        return None
    return cpu


def _row(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))


def render_table(results: dict[str, Any]) -> str:
    """The one table: every measurement, its ratio to the reference, and per ruleset size its load cost."""
    ref = results["figures"]["reference"]["per_second"]
    sizes = {point["rules"]: point for point in results["rulesets"]}
    headers = ("measurement", "rules", "baskets/s", "p50 ms", "p99 ms", "vs ref", "load ms", "KiB")
    rows: list[tuple[str, ...]] = []
    shown_size: set[int] = set()
    for fig in results["figures"].values():
        rules = fig["rules"]
        load = kib = ""
        if rules not in shown_size:
            shown_size.add(rules)
            load, kib = f"{sizes[rules]['load_ms']:.1f}", f"{sizes[rules]['compiled_kib']:,.0f}"
        rows.append(
            (
                fig["title"],
                str(rules),
                f"{fig['per_second']:,.0f}",
                f"{fig['p50_ms']:.3f}",
                f"{fig['p99_ms']:.3f}",
                f"{fig['per_second'] / ref:.2f}x",
                load,
                kib,
            )
        )
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = [_row(headers, widths), _row(["-" * w for w in widths], widths)]
    lines += [_row(r, widths) for r in rows]
    return "\n".join(lines)


def profile(case: Case, top: int) -> None:
    """Print where the engine's time goes, warm and cold (cProfile, by own time and cumulative)."""
    for cold in (False, True):
        work = engine_worker(case, cold=cold)
        for i in range(len(case.parsed)):
            work(i)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(3):
            for i in range(len(case.parsed)):
                work(i)
        profiler.disable()
        print(
            f"=== engine, {'cold' if cold else 'warm'} caches, {case.rules} rules, {3 * len(case.parsed)} baskets ==="
        )
        stats = pstats.Stats(profiler, stream=sys.stdout)
        stats.strip_dirs().sort_stats("tottime").print_stats(top)
        stats.sort_stats("cumulative").print_stats(top)


def measurements_for(
    cases: dict[int, Case], replay: Case, yesterday: Case, responses: Sequence[dict[str, Any]]
) -> list[Measurement]:
    """What the table shows, in its order; the 200-rule scaling rows are the main engine rows."""
    case = cases[MAIN_RULES]
    cold_case = own_ruleset(case)
    steady = own_ruleset(replay)

    def after_yesterday() -> None:
        # A lane runs for months: what it learnt yesterday (which rules touch which goods) is
        # still true today; only what depends on the moment (the rules in force) is new.
        clear_caches(steady.ruleset)
        for basket, member in yesterday.parsed:
            price(basket, member, steady.ruleset)

    def request(i: int) -> object:
        basket = parse_basket(json.loads(case.bodies[i]))
        return to_json(price(basket, case.members[i], case.ruleset))

    def reference(i: int) -> object:
        parse_basket(json.loads(case.bodies[i]))
        return json.dumps(responses[i], ensure_ascii=False, separators=(",", ":"))

    items = len(case.parsed)
    out = [
        Measurement(
            "engine_steady",
            "engine, steady state (new day)",
            MAIN_RULES,
            engine_worker(steady, cold=False),
            len(steady.parsed),
            before_pass=after_yesterday,
            every=REPLAY_EVERY,
            warm_up=False,
        ),
        Measurement("engine", "engine, warm caches", MAIN_RULES, engine_worker(case, cold=False), items),
        Measurement(
            "engine_replay",
            "engine, first day after start",
            MAIN_RULES,
            engine_worker(replay, cold=False),
            len(replay.parsed),
            before_pass=lambda: clear_caches(replay.ruleset),
            every=REPLAY_EVERY,
            warm_up=False,
        ),
        Measurement("engine_cold", "engine, cold caches", MAIN_RULES, engine_worker(cold_case, cold=True), items),
        Measurement("request", "request: json+validate+price+to_json", MAIN_RULES, request, items),
        Measurement("reference", "reference: json+validate+dumps", MAIN_RULES, reference, items),
    ]
    for n, scase in cases.items():
        if n == MAIN_RULES:
            continue
        out.append(
            Measurement(f"scaling_{n}_warm", f"scaling: warm, {n} rules", n, engine_worker(scase, cold=False), items)
        )
        cold = own_ruleset(scase)
        out.append(
            Measurement(f"scaling_{n}_cold", f"scaling: cold, {n} rules", n, engine_worker(cold, cold=True), items)
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--baskets", type=int, default=400, help="distinct baskets per ruleset (default 400)")
    parser.add_argument("--seconds", type=float, default=50.0, help="time for the measuring rounds (default 50)")
    parser.add_argument("--quick", action="store_true", help="a few seconds in all, for a smoke test")
    parser.add_argument("--strict", action="store_true", help="exit 1 when the steady-state engine misses the target")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the engine and exit")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"JSON results (default {RESULTS})")
    args = parser.parse_args(argv)
    seconds = 1.0 if args.quick else args.seconds
    baskets = 100 if args.quick else args.baskets
    replay_baskets = REPLAY_BASKETS // 4 if args.quick else REPLAY_BASKETS

    cpu = pin_to_one_cpu()
    catalogue = make_catalogue(args.seed)
    if args.profile:
        profile(build_case(MAIN_RULES, args.seed, catalogue, baskets), 30)
        return 0

    progress = Progress(3)
    progress.start(f"generating and loading rulesets ({', '.join(map(str, SCALING_RULES))} rules) and baskets")
    cases = {n: build_case(n, args.seed, catalogue, baskets) for n in SCALING_RULES}
    case = cases[MAIN_RULES]
    replay = build_case(MAIN_RULES, args.seed, catalogue, replay_baskets, day=REPLAY_DAY)
    yesterday = build_case(MAIN_RULES, args.seed + 1, catalogue, replay_baskets, day=REPLAY_DAY - dt.timedelta(days=1))
    workload = {n: check_outputs(c) for n, c in cases.items()}
    check_outputs(replay)
    clear_caches(replay.ruleset)
    responses = [to_wire(price(b, m, case.ruleset)) for b, m in case.parsed]
    measurements = measurements_for(cases, replay, yesterday, responses)
    progress.done(f"{MAIN_RULES}-rule ruleset loads in {case.load_ms:.1f} ms; every output checked")

    # The fixtures (rulesets, baskets, responses) live for the whole run; freezing them keeps the
    # collector from re-scanning them, so each figure counts the garbage of the code measured and
    # not the size of the harness's heap.
    gc.collect()
    gc.freeze()
    progress.start(f"measuring: {len(measurements)} measurements, interleaved, about {seconds:.0f} s")
    rounds = run_rounds(measurements, seconds, progress)
    progress.done(f"{rounds} rounds")

    figures: dict[str, dict[str, Any]] = {
        m.key: {"title": m.title, "rules": m.rules, **m.figures()} for m in measurements
    }
    ref = figures["reference"]["per_second"]
    verdicts = {
        key: {"baskets_per_second": figures[key]["per_second"], "pass": figures[key]["per_second"] >= TARGET}
        for key in ("engine_steady", "engine", "engine_replay", "engine_cold")
    }
    results: dict[str, Any] = {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {**machine(), "pinned_cpu": cpu},
        "config": {
            "seed": args.seed,
            "rules": MAIN_RULES,
            "lines_per_basket": LINES_PER_BASKET,
            "distinct_baskets": len(case.parsed),
            "replay": {"day": REPLAY_DAY.isoformat(), "baskets": len(replay.parsed), "every_rounds": REPLAY_EVERY},
            "catalogue": {"categories": len(catalogue.categories), "skus": len(catalogue.skus)},
            "seconds": seconds,
            "rounds": rounds,
        },
        "workload": {str(n): w for n, w in workload.items()},
        "figures": figures,
        "ratios_to_reference": {key: round(fig["per_second"] / ref, 3) for key, fig in figures.items()},
        "rulesets": [{"rules": c.rules, "load_ms": c.load_ms, "compiled_kib": c.compiled_kib} for c in cases.values()],
        "target": {"baskets_per_second": TARGET, **verdicts},
    }
    progress.start(f"writing {args.output}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    progress.done("written")

    info = results["machine"]
    main_load = workload[MAIN_RULES]
    print(
        f"Pricing benchmark: {LINES_PER_BASKET}-line baskets ({len(case.parsed)} distinct), synthetic rulesets "
        f"(seed {args.seed}, {len(catalogue.categories)} categories, {len(catalogue.skus):,} SKUs)"
    )
    where = f"pinned to CPU {cpu}" if cpu is not None else "not pinned"
    print(
        f"One core: a single Python thread, {where}.  {info['cpu_model']}, "
        f"{info['implementation']} {info['python']}, pydantic {info['pydantic']}; {rounds} interleaved rounds"
    )
    print(
        f"Workload ({MAIN_RULES} rules): {main_load['lines_discounted_share']:.0%} of lines discounted, "
        f"{main_load['discounts_per_line']} discounts per line, {main_load['member_share']:.0%} member baskets"
    )
    print()
    print(render_table(results))
    print()
    print(
        f"steady:     {len(replay.parsed):,} new baskets of one member day in time order, after a previous day's "
        "(the target's row)"
    )
    print("warm:       the same baskets over and over, every cache hit (upper bound)")
    print("first day:  the same new baskets with every cache empty at the start (a lane just restarted)")
    print("cold:       the ruleset's caches emptied before each basket (lower bound)")
    print("vs ref:     baskets/s over the reference's: decode + validate + serialise the response, no pricing")
    for key, label in (
        ("engine_steady", "steady state"),
        ("engine", "warm caches"),
        ("engine_replay", "first day after start"),
        ("engine_cold", "cold caches"),
    ):
        value = verdicts[key]["baskets_per_second"]
        print(
            f"{'PASS' if verdicts[key]['pass'] else 'FAIL'}: engine, {label}: {value:,.0f} baskets/s with "
            f"{MAIN_RULES} rules; target >= {TARGET:,} ({value / TARGET:.2f}x)"
        )
    print(f"Results: {args.output}")
    return 1 if args.strict and not verdicts["engine_steady"]["pass"] else 0


if __name__ == "__main__":
    sys.exit(main())
