"""The suite's printed table, the issue's targets checked against one run, and the chart."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench._measure import Measurement


@dataclass(frozen=True, slots=True)
class Row:
    config: str  # "single", "cluster" or "asyncio-floor"
    measurement: Measurement
    raw_hop_ms: float | None = None
    cpu_ms_per_step: dict[str, float] | None = None  # CPU per node execution: server, workers, client


@dataclass(frozen=True, slots=True)
class Target:
    text: str
    value: str
    met: bool


def _find(rows: list[Row], config: str, workflow: str) -> Measurement | None:
    for row in rows:
        if row.config == config and row.measurement.workload.workflow == workflow:
            return row.measurement
    return None


def table(rows: list[Row]) -> str:
    header = (
        f"{'config':<14}{'workload':<16}{'median ms':>11}{'p90 ms':>10}{'runs/s':>10}{'steps/s':>10}"
        f"{'per-step ms':>13}{'x floor':>9}{'/ hop':>7}"
    )
    out = [header, "-" * len(header)]
    hops: dict[str, float] = {}
    for row in rows:
        m = row.measurement
        floor = _find(rows, "asyncio-floor", m.workload.workflow)
        ratio = ""
        if floor is not None and row.config != "asyncio-floor":
            mine, theirs = (m.total_s, floor.total_s) if m.workload.batch else (m.median_ms, floor.median_ms)
            ratio = f"{mine / theirs:.0f}x" if mine / theirs >= 10 else f"{mine / theirs:.2f}x"
        per_hop = ""
        if row.raw_hop_ms and m.workload.workflow == "chain20":
            per_hop = f"{m.overhead_per_step_ms / row.raw_hop_ms:.1f}"
        if row.raw_hop_ms is not None:
            hops[row.config] = row.raw_hop_ms
        out.append(
            f"{row.config:<14}{m.workload.id:<16}{m.median_ms:>11.3f}{_p90(m):>10.3f}"
            f"{m.throughput_runs_s:>10.1f}{m.steps_s:>10.0f}{m.overhead_per_step_ms:>13.4f}"
            f"{ratio:>9}{per_hop:>7}"
        )
    for config, hop in hops.items():
        out.append(f"{config:<14}{'raw JS hop':<16}{hop:>11.3f}")
    out.append("")
    out.append(f"{'CPU ms per node execution':<30}{'server(s)':>10}{'workers':>10}{'client':>10}")
    for row in rows:
        if row.cpu_ms_per_step is not None:
            cpu = row.cpu_ms_per_step
            out.append(
                f"{row.config:<14}{row.measurement.workload.id:<16}"
                f"{cpu['server']:>10.3f}{cpu['workers']:>10.3f}{cpu['client']:>10.3f}"
            )
    out.append(
        "per-step: W1 median/20; W2 median/102; W3 batch time/node executions; W4 (median - 50 ms)/52. "
        "x floor: median (W3: batch time) over the asyncio floor's; / hop: W1 per-step over the raw hop."
    )
    return "\n".join(out)


def _p90(m: Measurement) -> float:
    ordered = sorted(m.samples_ms)
    return ordered[min(len(ordered) - 1, max(0, round(0.9 * (len(ordered) - 1))))]


def targets(rows: list[Row]) -> list[Target]:
    """The targets of issue 5, judged on the single-server figures (and cluster vs single)."""
    found: list[Target] = []
    chain = _find(rows, "single", "chain20")
    if chain is not None:
        per_step = chain.overhead_per_step_ms
        found.append(Target("W1 chain20 per-step <= 1.0 ms", f"{per_step:.3f} ms", per_step <= 1.0))
    fan = _find(rows, "single", "fan100")
    if fan is not None:
        found.append(Target("W2 fan100 median <= 40 ms", f"{fan.median_ms:.1f} ms", fan.median_ms <= 40))
    diamond = _find(rows, "single", "diamond4")
    if diamond is not None:
        found.append(
            Target(
                "W3 diamond x500 >= 2,500 node executions/s",
                f"{diamond.steps_s:,.0f}/s",
                diamond.steps_s >= 2500,
            )
        )
    io = _find(rows, "single", "io50")
    if io is not None:
        found.append(Target("W4 io50 median <= 65 ms", f"{io.median_ms:.1f} ms", io.median_ms <= 65))
    cluster_chain = _find(rows, "cluster", "chain20")
    if chain is not None and cluster_chain is not None:
        ratio = cluster_chain.overhead_per_step_ms / chain.overhead_per_step_ms
        found.append(
            Target(
                "cluster per-step <= 2x single (W1)",
                f"{cluster_chain.overhead_per_step_ms:.3f} ms = {ratio:.2f}x",
                ratio <= 2.0,
            )
        )
    return found


def targets_text(found: list[Target]) -> str:
    return "\n".join(f"{'met    ' if t.met else 'NOT met'}  {t.text:<45} {t.value}" for t in found)


def chart(rows: list[Row], path: Path) -> Path:
    """Per workload, median latency (W3: median per-run completion) of each config; log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = [c for c in ("single", "cluster", "asyncio-floor") if any(r.config == c for r in rows)]
    labels = {
        "single": "1 server, replicas 1",
        "cluster": "3-node cluster, replicas 3",
        "asyncio-floor": "asyncio floor (no bus)",
    }
    workloads = []
    for row in rows:
        if row.measurement.workload.id not in workloads:
            workloads.append(row.measurement.workload.id)
    width = 0.8 / len(configs)
    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=120)
    for k, config in enumerate(configs):
        xs, ys = [], []
        for i, workload in enumerate(workloads):
            m = next(
                (r.measurement for r in rows if r.config == config and r.measurement.workload.id == workload),
                None,
            )
            if m is not None:
                xs.append(i + (k - (len(configs) - 1) / 2) * width)
                ys.append(m.median_ms)
        bars = ax.bar(xs, ys, width, label=labels[config])
        ax.bar_label(bars, labels=[_short(y) for y in ys], fontsize=7, padding=2)
    ax.set_yscale("log")
    ax.set_xticks(range(len(workloads)), workloads)
    ax.set_ylabel("median latency, ms (log scale)")
    ax.set_title("Flow Orchestrator benchmark suite: median latency per workload")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _short(ms: float) -> str:
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.3g}"
