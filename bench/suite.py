"""``make bench``: every benchmark in turn, one table of every figure with its same-run reference, ratio and target.

``python -m bench.suite [--quick] [--only run,api,...] [--strict] [--compare OLD.json [NEW.json]] [--show FILE]``

Each benchmark runs as its own subprocess (``python -m bench.<name> --output
<file>``), as it runs alone, so each keeps its own process, CPU pinning and
peak-RSS figures; the suite reads the JSON it writes.  While they run, tqdm
bars on stderr show the steps and the current step's last line of progress;
stdout gets one table: a row per figure with its value, the reference
measured in the same run, the ratio to it, the target of the issue that asked
for it, and whether the target is met (or by how much it is missed).

The results, with every benchmark's own JSON inside, the machine (CPU model,
cores, Python, library versions), the git commit, the date and the load the
machine carried during each step, go to ``bench/results/suite-<commit>.json``
and ``bench/results/latest-suite.json`` (git-ignored).  ``--compare OLD.json``
prints old against new per figure after the run; ``--compare OLD.json
NEW.json`` compares two saved runs without running anything; ``--show FILE``
prints a saved run's table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from bench.run import machine

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"
LATEST = RESULTS_DIR / "latest-suite.json"
LIBRARIES = (
    "pydantic",
    "pydantic-core",
    "fastapi",
    "starlette",
    "uvicorn",
    "httptools",
    "httpx",
    "sse-starlette",
    "orjson",
    "psycopg",
    "sqlalchemy",
    "aiomqtt",
    "paho-mqtt",
    "evdev",
    "cryptography",
    "tqdm",
)


@dataclass(frozen=True, slots=True)
class Step:
    name: str  # bench.<name>; also the key of its results
    what: str
    quick: tuple[str, ...]  # the arguments of --quick; a full run passes none (each module's defaults)
    estimate_s: float  # a full run on the 2-core VM, for the progress bar
    quick_estimate_s: float


STEPS = (
    # Estimates: one full and one --quick run on the 2-core VM under load (docs/performance.md), for the bars only.
    Step("run", "engine: baskets/s, rule-count scaling", ("--quick",), 75, 12),
    Step("api", "POS API: price and sale p99, HTTP floor, raw commit, RSS", ("--quick",), 80, 12),
    Step("swipe", "swipe -> member.identified p99", ("--quick",), 65, 13),
    Step("sync", "backlog drain vs raw PostgreSQL upsert", ("--quick",), 100, 12),
    Step(
        "members",
        "1M snapshot apply vs raw bulk load",
        ("--members", "20000", "--rounds", "1", "--pages", "4", "--page-members", "1000"),
        200,
        6,
    ),
    Step("member_scaling", "pricing latency at 10k, 100k, 1M members", ("--quick",), 60, 9),
)


@dataclass(frozen=True, slots=True)
class Figure:
    """One row of the table; ``value`` and ``ratio`` are what ``--compare`` compares."""

    key: str
    group: str
    title: str
    value: float | None
    text: str
    reference: str = ""
    ratio: float | None = None
    ratio_text: str = ""
    target: str = ""
    met: bool | None = None
    status: str = "-"


# --- targets ---------------------------------------------------------------------------------


def at_least(value: float, target: float) -> tuple[bool, str]:
    if value >= target:
        return True, "met"
    return False, f"not met: {1 - value / target:.0%} short"


def at_most(value: float, target: float) -> tuple[bool, str]:
    if value <= target:
        return True, "met"
    return False, f"not met: {value / target - 1:.0%} over"


def _ms(value: float) -> str:
    return f"{value:.2f} ms"


# --- the figures of each benchmark -----------------------------------------------------------------


def figures_run(data: dict[str, Any]) -> list[Figure]:
    group = "engine, one core (bench.run)"
    figs: dict[str, dict[str, Any]] = data["figures"]
    ref = figs["reference"]
    target = data["target"]["baskets_per_second"]
    ref_text = f"{ref['per_second']:,.0f}/s I/O floor"
    out = []
    for key, title, has_target in (
        ("engine_steady", "engine baskets/s, steady state (new day), 200 rules", True),
        ("engine", "engine baskets/s, warm caches, 200 rules", True),
        ("engine_replay", "engine baskets/s, first day after start", False),
        ("engine_cold", "engine baskets/s, cold caches", False),
        ("request", "request baskets/s: json+validate+price+to_json", False),
    ):
        value = figs[key]["per_second"]
        ratio = value / ref["per_second"]
        met, status = at_least(value, target) if has_target else (None, "-")
        out.append(
            Figure(
                f"run.{key}.per_second",
                group,
                title,
                value,
                f"{value:,.0f}/s",
                ref_text,
                ratio,
                f"{ratio:.2f}x",
                f">= {target:,}/s" if has_target else "",
                met,
                status,
            )
        )
    group = "rule-count scaling, p50 / p99 per 30-line basket (bench.run)"
    sizes = sorted({fig["rules"] for fig in figs.values()})
    for state in ("warm", "cold"):

        def of(rules: int, state: str = state) -> dict[str, Any]:
            if rules == data["config"]["rules"]:
                return figs["engine" if state == "warm" else "engine_cold"]
            return figs[f"scaling_{rules}_{state}"]

        first = of(sizes[0])
        for rules in sizes:
            fig = of(rules)
            ratio = fig["p99_ms"] / first["p99_ms"]
            out.append(
                Figure(
                    f"run.rules_{rules}_{state}.p99_ms",
                    group,
                    f"{state} caches, {rules:,} rules",
                    fig["p99_ms"],
                    f"{fig['p50_ms']:.3f} / {fig['p99_ms']:.3f} ms",
                    f"{first['p99_ms']:.3f} ms p99 at {sizes[0]} rules",
                    ratio,
                    f"{ratio:.2f}x",
                )
            )
    return out


def figures_api(data: dict[str, Any]) -> list[Figure]:
    group = f"POS API over HTTP, {data['config']['members']:,} members (bench.api)"
    figs, goals, memory = data["figures"], data["targets"], data["memory_mib"]
    status, raw = figs["status"]["p99_ms"], figs["raw"]["p99_ms"]
    price, sales = figs["price"]["p99_ms"], figs["sales"]["p99_ms"]
    floor = goals["sales_over_floor_p99"]["floor_ms"]
    price_goal, sales_goal = goals["price_over_status_p99"], goals["sales_over_floor_p99"]
    rss_goal = goals["agent_peak_rss_mib"]
    price_met, price_status = at_most(price / status, price_goal["target"])
    sales_met, sales_status = at_most(sales / floor, sales_goal["target"])
    rss_met, rss_status = at_most(memory["peak"], rss_goal["target"])
    return [
        Figure("api.status.p99_ms", group, "GET /v1/status p99 (the HTTP floor)", status, _ms(status)),
        Figure("api.raw.p99_ms", group, "raw sqlite3 WAL+FULL commit p99 (the fsync floor)", raw, _ms(raw)),
        Figure(
            "api.price.p99_ms",
            group,
            "POST /v1/price p99, 30 lines, 200 rules",
            price,
            _ms(price),
            f"status {_ms(status)}",
            price / status,
            f"{price / status:.2f}x",
            f"<= {price_goal['target']:.1f}x status",
            price_met,
            price_status,
        ),
        Figure(
            "api.sales.p99_ms",
            group,
            "POST /v1/sales p99 (durable commit)",
            sales,
            _ms(sales),
            f"status + 3 x raw = {_ms(floor)}",
            sales / floor,
            f"{sales / floor:.2f}x",
            f"<= {sales_goal['target']:.1f}x that",
            sales_met,
            sales_status,
        ),
        Figure(
            "api.rss.peak_mib",
            group,
            "agent peak RSS (VmHWM)",
            memory["peak"],
            f"{memory['peak']:.1f} MiB",
            f"{memory['after_start']:.1f} MiB after start",
            memory["peak"] / memory["after_start"],
            f"{memory['peak'] / memory['after_start']:.2f}x",
            f"<= {rss_goal['target']:.0f} MiB",
            rss_met,
            rss_status,
        ),
    ]


def figures_swipe(data: dict[str, Any]) -> list[Figure]:
    group = f"swipe to event, {data['config']['members']:,} members (bench.swipe)"
    figs, goal = data["figures"], data["targets"]["swipe_p99_ms"]
    swipe, identify, paced = (figs[k]["p99_ms"] for k in ("swipe", "identify", "swipe_paced"))
    met, status = at_most(swipe, goal["target"])
    return [
        Figure(
            "swipe.swipe.p99_ms",
            group,
            "swipe (one write) -> member.identified p99",
            swipe,
            _ms(swipe),
            f"identify -> event {_ms(identify)}",
            swipe / identify,
            f"{swipe / identify:.2f}x",
            f"<= {goal['target']:.0f} ms",
            met,
            status,
        ),
        Figure(
            "swipe.paced.p99_ms",
            group,
            "swipe, paced like a reader -> member.identified p99",
            paced,
            _ms(paced),
            f"identify -> event {_ms(identify)}",
            paced / identify,
            f"{paced / identify:.2f}x",
        ),
    ]


def figures_sync(data: dict[str, Any]) -> list[Figure]:
    group = f"backlog drain, {data['entries']:,} entries (bench.sync)"
    rate = data["pipeline"]["rate_entries_per_s"]
    raw = data["raw_upsert_rows_per_s"]
    goal = data["targets"]["drain_vs_raw"]
    ratio = rate / raw["reference"]
    met, status = at_least(ratio, goal["target"])
    return [
        Figure(
            "sync.drain.per_second",
            group,
            "lane -> broker -> HQ -> PostgreSQL -> ack, entries/s",
            rate,
            f"{rate:,.0f}/s",
            f"raw upsert {raw['reference']:,.0f} rows/s",
            ratio,
            f"{ratio:.2f}x",
            f">= {goal['target']:.1f}x raw",
            met,
            status,
        )
    ]


def figures_members(data: dict[str, Any]) -> list[Figure]:
    config, imports, goals = data["config"], data["imports"], data["targets"]
    group = f"member table apply, {config['members']:,} members (bench.members)"
    reference = data["reference_s"]
    out = []
    for key, title in (("empty", "snapshot import, empty store"), ("over", "snapshot import, over the previous")):
        seconds, goal = imports[key]["seconds"], goals[key]
        met, status = at_most(seconds / reference, goal["limit"])
        out.append(
            Figure(
                f"members.import_{key}.seconds",
                group,
                title,
                seconds,
                f"{seconds:.1f} s",
                f"raw bulk load {reference:.1f} s",
                seconds / reference,
                f"{seconds / reference:.2f}x",
                f"<= {goal['limit']:.1f}x raw",
                met,
                status,
            )
        )
    sales = imports.get("with_sales", {})
    if sales.get("sales"):
        out.append(
            Figure(
                "members.sale_during_import.max_ms",
                group,
                "a sale during an import: p50 / longest",
                sales["max_ms"],
                f"{sales['p50_ms']:.0f} / {sales['max_ms']:.0f} ms",
            )
        )
    deltas = imports.get("deltas", {})
    if deltas.get("available"):
        rate = deltas["members"] / deltas["seconds"]
        out.append(
            Figure(
                "members.deltas.per_second",
                group,
                f"delta apply, {deltas['pages']} pages of {deltas['members'] // deltas['pages']:,}",
                rate,
                f"{rate:,.0f} members/s",
                f"longest page {deltas['page_max_s'] * 1000:.0f} ms",
            )
        )
    out.append(
        Figure(
            "members.rss.peak_mib",
            group,
            "importing process peak RSS",
            imports["peak_rss_mib"],
            f"{imports['peak_rss_mib']:.0f} MiB",
            f"{imports['rss_before_mib']:.0f} MiB before importing",
        )
    )
    return out


def figures_member_scaling(data: dict[str, Any]) -> list[Figure]:
    group = "member-count scaling, p50 / p99 through the POS API (bench.member_scaling)"
    sizes = data["sizes"]
    first = sizes[0]
    out = []
    for kind, title in (("price", "POST /v1/price, member basket"), ("identify", "POST /v1/identify, card")):
        base = first["figures"][kind]
        for size in sizes:
            fig = size["figures"][kind]
            ratio = fig["p99_ms"] / base["p99_ms"]
            out.append(
                Figure(
                    f"member_scaling.{kind}_{size['members']}.p99_ms",
                    group,
                    f"{title}, {size['members']:,} members",
                    fig["p99_ms"],
                    f"{fig['p50_ms']:.2f} / {fig['p99_ms']:.2f} ms",
                    f"{base['p99_ms']:.2f} ms p99 at {first['members']:,}",
                    ratio,
                    f"{ratio:.2f}x",
                )
            )
    for size in sizes:
        out.append(
            Figure(
                f"member_scaling.rss_{size['members']}.peak_mib",
                group,
                f"agent peak RSS, {size['members']:,} members",
                size["peak_rss_mib"],
                f"{size['peak_rss_mib']:.1f} MiB",
                f"{first['peak_rss_mib']:.1f} MiB at {first['members']:,}",
                size["peak_rss_mib"] / first["peak_rss_mib"],
                f"{size['peak_rss_mib'] / first['peak_rss_mib']:.2f}x",
            )
        )
    return out


EXTRACT: dict[str, Callable[[dict[str, Any]], list[Figure]]] = {
    "run": figures_run,
    "api": figures_api,
    "swipe": figures_swipe,
    "sync": figures_sync,
    "members": figures_members,
    "member_scaling": figures_member_scaling,
}


# --- the machine, and the load it carried ------------------------------------------------------


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _first_line(command: Sequence[str]) -> str | None:
    try:
        # Fixed commands naming system tools: only to label the results.
        done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=10)  # noqa: S603
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0] if lines else None


def _lscpu() -> dict[str, str]:
    wanted = {
        "Model name",
        "CPU family",
        "Model",
        "CPU(s)",
        "Thread(s) per core",
        "Core(s) per socket",
        "Hypervisor vendor",
        "L2 cache",
        "L3 cache",
    }
    try:
        done = subprocess.run(["lscpu"], capture_output=True, text=True, check=True, timeout=10)  # noqa: S607
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return {}
    out = {}
    for row in done.stdout.splitlines():
        name, _, value = row.partition(":")
        if name.strip() in wanted:
            out[name.strip()] = value.strip()
    return out


def _memory_gib() -> float | None:
    try:
        for row in Path("/proc/meminfo").read_text(encoding="ascii").splitlines():
            if row.startswith("MemTotal:"):
                return round(int(row.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def describe_machine() -> dict[str, Any]:
    return {
        **machine(),
        "lscpu": _lscpu(),
        "memory_gib": _memory_gib(),
        "kernel": platform.release(),
        "sqlite": sqlite3.sqlite_version,
        "postgresql": _first_line(["psql", "--version"]),
        "mosquitto": _first_line(["mosquitto", "-h"]),
        "libraries": {name: _version(name) for name in LIBRARIES},
    }


def _cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process's finished children)."""
    ticks = os.sysconf("SC_CLK_TCK")
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text(encoding="ascii").split("\n", 1)[0].split()[1:]]
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / ticks  # all but idle and iowait
    except (OSError, ValueError, IndexError):
        busy = float("nan")
    children = os.times()
    return busy, children.children_user + children.children_system


# --- running the steps ------------------------------------------------------------------------


class StepBars:
    """tqdm bars on stderr: the steps, and the current step's time against its estimate with its last line.

    Off a terminal, a line per step instead (bars drawn with carriage returns make a log unreadable).
    """

    def __init__(self, steps: int) -> None:
        self.tty = sys.stderr.isatty()
        self.steps = steps
        self.overall = tqdm(total=steps, desc="make bench", unit="step", file=sys.stderr, disable=not self.tty)
        self.bar: tqdm[Any] | None = None
        self.number = 0

    def start(self, step: Step, estimate: float) -> None:
        self.number += 1
        if not self.tty:
            print(
                f"[{self.number}/{self.steps}] bench.{step.name}: {step.what} (about {estimate:.0f} s)", file=sys.stderr
            )
            return
        self.bar = tqdm(
            total=round(estimate),
            desc=f"bench.{step.name}",
            unit="s",
            file=sys.stderr,
            leave=False,
            bar_format="{desc:<21}{bar:20} {elapsed} of ~{total} s {postfix}",
        )

    def tick(self, elapsed: float, line: str) -> None:
        if self.bar is not None:
            self.bar.n = min(round(elapsed), self.bar.total - 1)
            self.bar.set_postfix_str(line[-70:], refresh=False)
            self.bar.refresh()

    def done(self, step: Step, seconds: float, code: int) -> None:
        verdict = "done" if code == 0 else f"FAILED (exit {code})"
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            self.overall.write(f"bench.{step.name}: {verdict} in {seconds:.0f} s", file=sys.stderr)
        else:
            print(f"    {verdict} in {seconds:.0f} s", file=sys.stderr)
        self.overall.update(1)

    def close(self) -> None:
        self.overall.close()


def _pump(stream: IO[str], log: IO[str], last: list[str]) -> None:
    for line in stream:
        log.write(line)
        log.flush()
        if line.strip():
            last[0] = line.strip()


def run_step(step: Step, *, quick: bool, work: Path, bars: StepBars) -> dict[str, Any]:
    estimate = step.quick_estimate_s if quick else step.estimate_s
    output = work / f"{step.name}.json"
    log_path = work / f"{step.name}.log"
    command = [sys.executable, "-m", f"bench.{step.name}", *(step.quick if quick else ()), "--output", str(output)]
    bars.start(step, estimate)
    busy0, own0 = _cpu_seconds()
    loads = [os.getloadavg()[0]]
    started = time.monotonic()
    last = [""]
    environ = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log_path.open("w", encoding="utf-8") as log:
        # This interpreter and one of this package's modules, with fixed arguments.
        process = subprocess.Popen(  # noqa: S603
            command, cwd=REPO_ROOT, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert process.stdout is not None
        assert process.stderr is not None
        reader = threading.Thread(target=_pump, args=(process.stderr, log, last), daemon=True)
        reader.start()
        table: list[str] = []
        stdout_reader = threading.Thread(target=lambda: table.extend(process.stdout or ()), daemon=True)
        stdout_reader.start()
        next_load = started + 5
        while process.poll() is None:
            time.sleep(0.5)
            now = time.monotonic()
            bars.tick(now - started, last[0])
            if now >= next_load:
                loads.append(os.getloadavg()[0])
                next_load = now + 5
        reader.join(10)
        stdout_reader.join(10)
    seconds = time.monotonic() - started
    busy1, own1 = _cpu_seconds()
    loads.append(os.getloadavg()[0])
    code = process.returncode
    bars.done(step, seconds, code)
    record: dict[str, Any] = {
        "command": [f"python -m bench.{step.name}", *command[3:-2]],
        "exit_code": code,
        "seconds": round(seconds, 1),
        # What else the machine did meanwhile: its busy CPU time less the benchmark's own (its finished
        # children's; a system service it used, such as PostgreSQL, counts as other work).
        "machine": {
            "load_average_mean": round(sum(loads) / len(loads), 2),
            "load_average_max": round(max(loads), 2),
            "busy_cores": round((busy1 - busy0) / seconds, 2),
            "benchmark_cores": round((own1 - own0) / seconds, 2),
            "other_cores": round(max(0.0, (busy1 - busy0) - (own1 - own0)) / seconds, 2),
        },
        "report": "".join(table),
    }
    if code == 0 and output.exists():
        record["results"] = json.loads(output.read_text(encoding="utf-8"))
    else:
        record["stderr_tail"] = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-30:]
    return record


def collect_figures(steps: dict[str, dict[str, Any]]) -> list[Figure]:
    out: list[Figure] = []
    for name, record in steps.items():
        if "results" in record:
            out += EXTRACT[name](record["results"])
        else:
            out.append(
                Figure(f"{name}.failed", f"bench.{name}", "the benchmark failed", None, f"exit {record['exit_code']}")
            )
    return out


# --- the table ---------------------------------------------------------------------------------


def render(results: dict[str, Any]) -> str:
    info = results["machine"]
    cpu = info.get("lscpu", {})
    head = [
        (
            f"make bench at {str(info.get('git_commit'))[:12]}"
            f"{' (uncommitted changes)' if info.get('git_dirty') else ''}"
            f", {results['started']}, {'--quick (smoke test: rough figures)' if results['quick'] else 'full run'}"
            f", {results['seconds'] / 60:.1f} min"
        ),
        (
            f"{cpu.get('Model name', info['cpu_model'])} (family {cpu.get('CPU family', '?')} model "
            f"{cpu.get('Model', '?')}), {info['cpus_online']} cores, {cpu.get('Hypervisor vendor', 'no')} hypervisor, "
            f"{info.get('memory_gib')} GiB; {info['implementation']} {info['python']}, SQLite {info.get('sqlite')}, "
            f"{info.get('postgresql')}"
        ),
    ]
    loads = ", ".join(
        f"{name} {record['machine']['load_average_mean']:.1f} (other work {record['machine']['other_cores']:.1f} cores)"
        for name, record in results["steps"].items()
    )
    head.append(f"load average during each step: {loads}")
    headers = ("figure", "value", "same-run reference", "ratio", "target", "status")
    rows: list[tuple[str, ...] | str] = []
    group = None
    for fig in (Figure(**f) for f in results["figures"]):
        if fig.group != group:
            group = fig.group
            rows.append(group)
        rows.append(("  " + fig.title, fig.text, fig.reference, fig.ratio_text, fig.target, fig.status))
    cells = [r for r in rows if isinstance(r, tuple)]
    widths = [max(len(headers[i]), *(len(r[i]) for r in cells)) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i in (0, 5) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()

    out = [*head, "", line(headers), line(["-" * w for w in widths])]
    for row in rows:
        out.append(row if isinstance(row, str) else line(row))
    missed = [f for f in results["figures"] if f["met"] is False]
    failed = [name for name, record in results["steps"].items() if record["exit_code"] != 0]
    out.append("")
    targets = [f for f in results["figures"] if f["met"] is not None]
    out.append(f"targets: {len(targets) - len(missed)} of {len(targets)} met (docs/performance.md says why not)")
    if failed:
        out.append(f"FAILED: {', '.join('bench.' + n for n in failed)} (the end of their stderr is in the JSON)")
    return "\n".join(out)


def compare(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Old against new per figure: the values, their change, and the ratios to the same-run references."""
    olds = {f["key"]: f for f in old["figures"]}
    head = (
        f"old: {str(old['machine'].get('git_commit'))[:12]} {old['started']}"
        f"{' --quick' if old['quick'] else ''}; new: {str(new['machine'].get('git_commit'))[:12]} {new['started']}"
        f"{' --quick' if new['quick'] else ''}"
    )
    headers = ("figure", "old", "new", "new/old", "old ratio", "new ratio")
    rows = []
    for fig in new["figures"]:
        title = f"{fig['key'].split('.', 1)[0]}: {fig['title']}"  # the benchmark's name: titles repeat across groups
        before = olds.get(fig["key"])
        if before is None:
            rows.append((title, "-", fig["text"], "", "", fig["ratio_text"]))
            continue
        change = "" if not before["value"] or fig["value"] is None else f"{fig['value'] / before['value']:.2f}x"
        rows.append((title, before["text"], fig["text"], change, before["ratio_text"], fig["ratio_text"]))
    widths = [max(len(headers[i]), *(len(r[i]) for r in rows)) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))

    news = {g["key"] for g in new["figures"]}
    gone = sorted({f["key"].split(".", 1)[0] for f in old["figures"] if f["key"] not in news})
    out = [head, "", line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]
    if gone:
        out += ["", f"figures only in the old run, not compared: {', '.join('bench.' + n for n in gone)}"]
    return "\n".join(out)


def _load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def _names(text: str) -> tuple[str, ...]:
    names = tuple(n.strip().removeprefix("bench.") for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in EXTRACT]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown benchmarks {unknown}; choose from {', '.join(EXTRACT)}")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.suite", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="every benchmark's smoke-test size: a minute or two")
    parser.add_argument("--only", type=_names, help=f"a comma-separated subset of: {', '.join(EXTRACT)}")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument(
        "--compare", type=Path, nargs="+", metavar="JSON", help="OLD: compare after the run; OLD NEW: compare only"
    )
    parser.add_argument("--show", type=Path, metavar="JSON", help="print a saved run's table and exit")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help=f"where results go (default {RESULTS_DIR})")
    args = parser.parse_args(argv)
    if args.show is not None:
        print(render(_load(args.show)))
        return 0
    if args.compare is not None and len(args.compare) > 2:
        parser.error("--compare takes OLD.json, or OLD.json NEW.json")
    if args.compare is not None and len(args.compare) == 2:
        print(compare(_load(args.compare[0]), _load(args.compare[1])))
        return 0
    old = _load(args.compare[0]) if args.compare else None  # read first: a bad path fails before a long run

    steps = [s for s in STEPS if args.only is None or s.name in args.only]
    started = dt.datetime.now(dt.UTC)
    clock = time.monotonic()
    info = describe_machine()
    records: dict[str, dict[str, Any]] = {}
    bars = StepBars(len(steps))
    with tempfile.TemporaryDirectory(prefix="bench-suite-") as tmp:
        try:
            for step in steps:
                records[step.name] = run_step(step, quick=args.quick, work=Path(tmp), bars=bars)
                if records[step.name]["exit_code"] != 0:
                    tail = "\n".join(records[step.name]["stderr_tail"])
                    print(f"bench.{step.name} failed; the end of its stderr:\n{tail}", file=sys.stderr)
        finally:
            bars.close()
    results = {
        "started": started.isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - clock, 1),
        "quick": args.quick,
        "machine": info,
        "figures": [asdict(f) for f in collect_figures(records)],
        "steps": records,
    }
    commit = (info.get("git_commit") or "unknown")[:12]
    name = f"suite-{commit}{'-dirty' if info.get('git_dirty') else ''}{'-quick' if args.quick else ''}.json"
    text = json.dumps(results, indent=2) + "\n"
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / name).write_text(text, encoding="utf-8")
    (args.results / LATEST.name).write_text(text, encoding="utf-8")
    print(render(results))
    print(f"\nResults: {args.results / name} (and {LATEST.name}); each benchmark's own output is in them")
    if old is not None:
        print()
        print(compare(old, results))
    if any(r["exit_code"] != 0 for r in records.values()):
        return 2
    missed = any(f["met"] is False for f in results["figures"])
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
