"""Soak: thousands of mixed runs on a 3-node NATS cluster (replicas 3) while a chaos loop SIGKILLs
worker processes and one NATS node; then every run's output and journal is checked.

    python -m bench.soak [--runs 2000] [--workers 3] [--ack-wait 3]

Not part of ``make test``. Prints one JSON line per measurement, writes
``bench/results/soak-<timestamp>.json`` and exits 1 when a run is missing or wrong, a node did not
complete exactly once, or an execution repeated without a lost attempt or a retry to account for it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from bench._harness import event_loop_name, load1, run
from flow_orchestrator import Client, NodeContext, RetryPolicy, StorageSettings, Workflow
from flow_orchestrator.bus import EmbeddedCluster, Names, decode

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MARKERS_ENV = "FLOW_SOAK_MARKERS"
TERMINAL = ("completed", "failed", "cancelled")
Event = tuple[str, str, str, float, dict[str, Any]]  # (run, node, kind, server time, payload)


# --- the workload: three DAG shapes; every action records its execution, then sleeps a little ---------
def _record(ctx: NodeContext) -> None:
    directory = os.environ.get(MARKERS_ENV)
    if directory:
        with open(os.path.join(directory, "executions.log"), "a") as log:
            log.write(f"{ctx.run_id} {ctx.node} {os.getpid()}\n")


async def _step(ctx: NodeContext) -> None:
    _record(ctx)
    await asyncio.sleep(random.uniform(0.01, 0.1))


def _chain() -> Workflow:
    """``s0 -> ... -> s4``; ``s_i`` adds ``i``: the output is ``{"x": x, "acc": x + 10}``."""
    wf = Workflow("soak_chain")

    def step(i: int) -> Any:
        async def action(ctx: NodeContext) -> dict[str, int]:
            await _step(ctx)
            if i == 0:
                return {"x": ctx.input["x"], "acc": ctx.input["x"]}
            prev = ctx.output(f"s{i - 1}")
            return {"x": prev["x"], "acc": prev["acc"] + i}

        return action

    for i in range(5):
        wf.node(f"s{i}", depends_on=[f"s{i - 1}"] if i else [])(step(i))
    return wf


# Nodes that read or write WorkflowData talk to the KV leader, so they may meet a leader election:
# they get a retry policy, as an application would give them.
_DATA_RETRY = RetryPolicy(max_attempts=5, initial=0.5, backoff=2.0)


def _diamond() -> Workflow:
    """``a -> (b, c) -> d``; ``b`` also writes its value to the run's data and ``d`` reads it back."""
    wf = Workflow("soak_diamond")

    @wf.node()
    async def a(ctx: NodeContext) -> dict[str, int]:
        await _step(ctx)
        return {"x": ctx.input["x"]}

    @wf.node(depends_on=[a], retry=_DATA_RETRY)
    async def b(ctx: NodeContext) -> dict[str, int]:
        await _step(ctx)
        value = 2 * ctx.output("a")["x"]
        await ctx.data.set("b", value)
        return {"v": value}

    @wf.node(depends_on=[a])
    async def c(ctx: NodeContext) -> dict[str, int]:
        await _step(ctx)
        return {"v": ctx.output("a")["x"] + 3}

    @wf.node(depends_on=[b, c], retry=_DATA_RETRY)
    async def d(ctx: NodeContext) -> dict[str, int]:
        await _step(ctx)
        return {
            "x": ctx.input["x"],
            "sum": ctx.output("b")["v"] + ctx.output("c")["v"],
            "data": await ctx.data.get_int("b"),
        }

    return wf


def _fan(width: int = 10) -> Workflow:
    """``root -> leaf_0..leaf_9 -> join``; leaf ``i`` returns ``x * i``."""
    wf = Workflow("soak_fan")

    @wf.node()
    async def root(ctx: NodeContext) -> dict[str, int]:
        await _step(ctx)
        return {"x": ctx.input["x"]}

    def leaf(i: int) -> Any:
        async def action(ctx: NodeContext) -> dict[str, int]:
            await _step(ctx)
            return {"v": ctx.output("root")["x"] * i}

        return action

    leaves = [f"leaf_{i}" for i in range(width)]
    for i, name in enumerate(leaves):
        wf.node(name, depends_on=["root"])(leaf(i))

    @wf.node(depends_on=leaves)
    async def join(ctx: NodeContext) -> dict[str, int]:
        await _step(ctx)
        return {"x": ctx.input["x"], "sum": sum(ctx.output(n)["v"] for n in leaves), "count": width}

    return wf


WORKFLOWS = [_chain(), _diamond(), _fan()]
NODES = {wf.name: tuple(wf.definition.nodes) for wf in WORKFLOWS}
EXPECTED = {
    "soak_chain": lambda x: {"s4": {"x": x, "acc": x + 10}},
    "soak_diamond": lambda x: {"d": {"x": x, "sum": 3 * x + 3, "data": 2 * x}},
    "soak_fan": lambda x: {"join": {"x": x, "sum": 45 * x, "count": 10}},
}


# --- worker processes ---------------------------------------------------------------------------------
class Fleet:
    """``flowctl worker bench.soak:WORKFLOWS`` subprocesses, killed and replaced by PID."""

    def __init__(self, url: str, prefix: str, workdir: Path, ack_wait: float) -> None:
        self.url, self.prefix, self.workdir, self.ack_wait = url, prefix, workdir, ack_wait
        self.markers = workdir / "markers"
        self.markers.mkdir(parents=True)
        self.live: list[subprocess.Popen[bytes]] = []
        self.spawned = 0

    def spawn(self) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "FLOW_REPLICAS")}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        env[MARKERS_ENV] = str(self.markers)
        command = [sys.executable, "-m", "flow_orchestrator.runtime._cli", "worker", "bench.soak:WORKFLOWS"]
        command += ["--nats", self.url, "--prefix", self.prefix, "--replicas", "3"]
        command += ["--ack-wait", str(self.ack_wait), "--log-level", "INFO"]
        # Every attempt announced: the kills' accounting counts a killed worker's running attempts
        # from their started events, and these steps take 10-100 ms.
        command += ["--announce-starts-after", "0"]
        with open(self.workdir / f"worker-{self.spawned}.log", "wb") as log:
            proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.spawned += 1
        self.live.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        self.live.remove(proc)

    async def wait_ready(self, client: Client, within: float = 60.0) -> None:
        """Every workflow registered and every live worker's consumers listening."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            logs = [(self.workdir / f"worker-{i}.log") for i in range(self.spawned)]
            ready = all("hosting" in log.read_text(errors="replace") for log in logs[-len(self.live) :])
            if all(p.poll() is None for p in self.live) and ready:
                for wf in WORKFLOWS:
                    await client.describe(wf.name)
                return
            await asyncio.sleep(0.2)
        raise RuntimeError(f"workers not ready within {within}s; see {self.workdir}")

    def stop_all(self) -> list[int | None]:
        codes: list[int | None] = []
        for proc in self.live:
            os.kill(proc.pid, signal.SIGTERM)
        for proc in self.live:
            try:
                codes.append(proc.wait(timeout=40))
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                codes.append(None)
        self.live.clear()
        return codes


# --- following runs -----------------------------------------------------------------------------------
@dataclass
class Tracker:
    """Which submitted runs finished, and when: live from run events, and by polling the run records
    of whatever a reconnecting client missed."""

    client: Client
    submitted: dict[str, tuple[str, int, float]] = field(default_factory=dict)
    finished: dict[str, tuple[str, float]] = field(default_factory=dict)
    progress: asyncio.Event = field(default_factory=asyncio.Event)
    wave: int = 1
    _poller: asyncio.Task[None] | None = None

    async def start(self) -> None:
        async def on_run_event(msg: Msg) -> None:
            parts = msg.subject.split(".")
            if parts[-1] in TERMINAL and parts[3] in self.submitted:
                self._finish(parts[3], parts[-1], time.time())

        await self.client.bus.nc.subscribe(f"{self.client.names.prefix}.evt.*.*._run.*", cb=on_run_event)
        self._poller = asyncio.create_task(self._poll_forever())

    def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()

    def _finish(self, run_id: str, status: str, at: float) -> None:
        if run_id not in self.finished:
            self.finished[run_id] = (status, at)
            self.progress.set()

    @property
    def in_flight(self) -> int:
        return len(self.submitted) - len(self.finished)

    async def _poll_forever(self) -> None:
        limit = asyncio.Semaphore(32)

        async def check(run_id: str) -> None:
            async with limit:
                try:
                    found = await self.client.store.get(Names.run_key(run_id))
                except Exception:  # a failover in progress: the next poll will see it
                    return
            if found is not None and found.value.get("status") in TERMINAL:
                self._finish(run_id, found.value["status"], float(found.value.get("finished_at") or 0.0))

        while True:
            await asyncio.sleep(2.0)
            now = time.time()
            stale = [r for r, (_, _, at) in self.submitted.items() if r not in self.finished and now - at > 3]
            await asyncio.gather(*(check(r) for r in stale))

    async def wait_until_busy(self, within: float) -> None:
        """Until a fair number of runs are in flight (a tenth of the last wave), or ``within`` s."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while self.in_flight < max(1, self.wave // 10):
                    self.progress.clear()
                    await self.progress.wait()

    async def wait_until(self, in_flight: int, within: float) -> None:
        """Until at most ``in_flight`` submitted runs are unfinished, or ``within`` seconds passed."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while self.in_flight > in_flight:
                    self.progress.clear()
                    await self.progress.wait()


async def submit(client: Client, tracker: Tracker, runs: int, wave: int, rate: float) -> None:
    """Submit a wave of ``wave`` runs every ``wave / rate`` seconds, keeping at most two waves in
    flight; retry a publish that fails during a failover with the same run id (the trigger's
    idempotency key: one run, not two)."""
    kinds = [wf.name for wf in WORKFLOWS]
    tag = uuid.uuid4().hex[:6]
    began = time.monotonic()
    for number, first in enumerate(range(0, runs, wave)):
        await asyncio.sleep(max(0.0, began + number * wave / rate - time.monotonic()))
        await tracker.wait_until(wave, within=600)
        for i in range(first, min(first + wave, runs)):
            workflow, run_id = kinds[i % len(kinds)], f"s{tag}{i:05d}"
            tracker.submitted[run_id] = (workflow, i, time.time())
            tracker.progress.set()
            for _ in range(120):
                try:
                    await client.start(workflow, {"x": i}, run_id=run_id)
                    break
                except Exception:
                    await asyncio.sleep(0.5)
            else:
                raise RuntimeError(f"could not submit run {run_id} for a minute")


# --- chaos --------------------------------------------------------------------------------------------
@dataclass
class Chaos:
    """SIGKILL a random worker every ``interval`` seconds (a replacement starts at once) and, at the
    ``nats_at``-th tick, SIGKILL the events stream's leader node and restart it ``nats_down`` s later.
    Bounded: ``max_worker_kills`` kills and ``max_seconds``; stops when ``done`` is set."""

    cluster: EmbeddedCluster
    fleet: Fleet
    tracker: Tracker
    interval: float
    max_worker_kills: int
    max_seconds: float
    nats_at: int = 3
    nats_down: float = 5.0
    rng: random.Random = field(default_factory=random.Random)
    worker_kills: list[dict[str, Any]] = field(default_factory=list)
    nats_kill: dict[str, Any] | None = None

    async def run(self, done: asyncio.Event) -> None:
        deadline = time.monotonic() + self.max_seconds
        tick = 0
        while time.monotonic() < deadline:
            pause = self.interval * self.rng.uniform(0.8, 1.2)
            try:
                await asyncio.wait_for(done.wait(), pause)
                return
            except TimeoutError:
                pass
            tick += 1
            # Strike while work is in flight (between waves a worker may hold nothing to lose).
            await self.tracker.wait_until_busy(within=self.interval)
            await asyncio.sleep(self.rng.uniform(0.1, 0.4))
            if self.nats_kill is None and tick >= self.nats_at:
                await self.kill_nats_leader()
            elif len(self.worker_kills) < self.max_worker_kills:
                self.kill_worker()
            elif self.nats_kill is not None:
                return

    def kill_worker(self) -> None:
        victim = self.rng.choice(self.fleet.live)
        at = time.time()
        self.fleet.kill(victim)
        replacement = self.fleet.spawn()
        self.worker_kills.append({"at": at, "pid": victim.pid, "replacement_pid": replacement.pid})
        print(json.dumps({"chaos": "worker_killed", "pid": victim.pid, "t": round(at, 3)}), flush=True)

    async def kill_nats_leader(self) -> None:
        client = self.tracker.client
        stream = client.names.events_stream
        leader = (await client.bus.js.stream_info(stream)).cluster
        name = leader.leader if leader is not None else None
        index = int(str(name).rsplit("-n", 1)[1])
        at = time.time()
        await asyncio.to_thread(self.cluster.nodes[index].stop, kill=True)
        print(json.dumps({"chaos": "nats_node_killed", "node": name, "t": round(at, 3)}), flush=True)
        await asyncio.sleep(self.nats_down)
        restarted = time.time()
        await asyncio.to_thread(self.cluster.restart, index)
        self.nats_kill = {
            "at": at,
            "node": name,
            "led": stream,
            "restarted_at": restarted,
            "healthy_after_restart_s": round(time.time() - restarted, 3),
        }


# --- checking -----------------------------------------------------------------------------------------
async def read_journal(client: Client) -> list[Event]:
    """Every event of this soak, oldest first: ``(run, node, kind, at, data)``, read by one consumer."""
    js, names = client.bus.js, client.names
    sub = await js.pull_subscribe(
        f"{names.prefix}.evt.>",
        stream=names.events_stream,
        config=ConsumerConfig(
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=60.0,
            mem_storage=True,
        ),
    )
    events = []
    try:
        pending = (await sub.consumer_info()).num_pending or 0
        while pending > 0:
            for msg in await sub.fetch(min(1000, pending), timeout=10.0):
                parts = msg.subject.split(".")
                at = msg.metadata.timestamp.timestamp() if msg.metadata.timestamp else 0.0
                data = decode(msg.data) if msg.data else {}
                events.append((parts[3], parts[4], parts[5], at, data if isinstance(data, dict) else {}))
                pending = msg.metadata.num_pending or 0
    finally:
        await sub.unsubscribe()
    return events


def _worker_pid(worker_id: str) -> int:
    """Worker ids are ``<host>-<pid>-<random>``."""
    return int(worker_id.rsplit("-", 2)[1])


def recovery_after_worker_kills(
    kills: list[dict[str, Any]], events: list[Event], ack_wait: float, nats_at: float | None
) -> list[dict[str, Any]]:
    """Per kill: the attempts the killed worker had started and not finished, and the ``lost`` events
    that followed within ``ack_wait + 3`` s and before the next chaos action (messages it held,
    detected when their ack wait expired; another cause of a lost attempt in that window would be
    counted too); how long after the kill the first loss was detected and the last affected node
    completed elsewhere."""
    chaos_times = sorted([k["at"] for k in kills] + ([nats_at] if nats_at is not None else []))
    started: dict[tuple[str, str, int], tuple[int, float]] = {}
    completed: dict[tuple[str, str], float] = {}
    lost: list[tuple[str, str, float]] = []
    for run_id, node, kind, at, data in events:
        if kind == "started" and "worker" in data:
            started[(run_id, node, int(data["attempt"]))] = (_worker_pid(str(data["worker"])), at)
        elif kind == "completed" and node != "_run":
            completed[(run_id, node)] = at
        elif kind == "lost":
            lost.append((run_id, node, at))
    report = []
    for kill in kills:
        t = kill["at"]
        until = min([t + ack_wait + 3, *[c for c in chaos_times if c > t]])
        running = {
            (run_id, node)
            for (run_id, node, _), (pid, at) in started.items()
            if pid == kill["pid"] and at <= t < completed.get((run_id, node), 0.0)
        }
        detected = sorted(at - t for _, _, at in lost if t < at <= until)
        affected = running | {(run_id, node) for run_id, node, at in lost if t < at <= until}
        resumed = sorted(completed[key] - t for key in affected if key in completed)
        report.append(
            {
                "pid": kill["pid"],
                "attempts_running": len(running),
                "attempts_lost_after": len(detected),
                "first_loss_detected_s": round(detected[0], 3) if detected else None,
                "all_resumed_s": round(resumed[-1], 3) if resumed else None,
            }
        )
    return report


def recovery_after_nats_kill(kill: dict[str, Any] | None, events: list[Event]) -> dict[str, Any] | None:
    if kill is None:
        return None
    ends = sorted(at for _, node, kind, at, _ in events if node == "_run" and kind == "completed")
    after = [at for at in ends if at > kill["at"]]
    window = [kill["at"], *[at for at in after if at < kill["restarted_at"] + 30]]
    return {
        **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in kill.items()},
        "first_run_completed_after_s": round(after[0] - kill["at"], 3) if after else None,
        "longest_completion_gap_s": round(max(b - a for a, b in itertools.pairwise(window)), 3)
        if len(window) > 1
        else None,
    }


async def verify(client: Client, tracker: Tracker, fleet: Fleet, events: list[Event]) -> dict[str, Any]:
    """Outputs against the expected ones, one completion per (run, node), repeats accounted for."""
    kinds: dict[tuple[str, str], int] = collections.Counter((r, f"{n}.{k}") for r, n, k, _, _ in events)
    lines = (fleet.markers / "executions.log").read_text().splitlines()
    executions = collections.Counter(tuple(line.split()[:2]) for line in lines if line)
    limit = asyncio.Semaphore(32)

    async def record(run_id: str) -> dict[str, Any] | None:
        async with limit:
            found = await client.store.get(Names.run_key(run_id))
        return found.value if found else None

    records = dict(zip(tracker.submitted, await asyncio.gather(*map(record, tracker.submitted)), strict=True))
    wrong, not_once, unexplained, examples = [], 0, 0, []
    for run_id, (workflow, x, _) in tracker.submitted.items():
        found = records[run_id]
        if (
            found is None
            or found.get("status") != "completed"
            or found.get("results") != EXPECTED[workflow](x)
        ):
            wrong.append(run_id)
        if kinds[(run_id, "_run.completed")] != 1:
            not_once += 1
            examples.append(f"{run_id}: {kinds[(run_id, '_run.completed')]} run completions")
        for node in NODES[workflow]:
            done = kinds[(run_id, f"{node}.completed")]
            ran = executions[(run_id, node)]
            allowed = 1 + kinds[(run_id, f"{node}.lost")] + kinds[(run_id, f"{node}.attempt_failed")]
            if done != 1:
                not_once += 1
                examples.append(f"{run_id}/{node}: {done} completions")
            if ran == 0 or ran > allowed:
                unexplained += 1
                examples.append(f"{run_id}/{node}: {ran} executions, {allowed - 1} lost or failed attempts")
    dlq = await client.bus.js.stream_info(client.names.dlq_stream)
    # What made attempts fail (the node's policy retried them): expected under chaos are the NATS
    # node's kill (a KV read or write during the election) and timeouts; anything else is a finding.
    failures: dict[str, tuple[int, str]] = {}
    for _, _, kind, _, payload in events:
        if kind == "attempt_failed":
            error = payload.get("error") or {}
            name = str(error.get("type"))
            count, example = failures.get(name, (0, str(error.get("message"))[:200]))
            failures[name] = (count + 1, example)
    return {
        "node_executions": sum(executions.values()),
        "node_completions": sum(
            v for (_, kind), v in kinds.items() if kind.endswith(".completed") and kind != "_run.completed"
        ),
        "repeated_executions": sum(n - 1 for n in executions.values() if n > 1),
        "nodes_not_completed_exactly_once": not_once,
        "unexplained_repeats": unexplained,
        "lost_data_runs": len(wrong),
        "attempts_lost": sum(v for (_, kind), v in kinds.items() if kind.endswith(".lost")),
        "attempts_failed": sum(v for (_, kind), v in kinds.items() if kind.endswith(".attempt_failed")),
        "attempts_failed_by_error": {
            kind: {"count": count, "example": text} for kind, (count, text) in failures.items()
        },
        "dead_letters": dlq.state.messages,
        "examples": examples[:20] + [f"wrong or missing output: {r}" for r in wrong[:20]],
    }


# --- the soak -----------------------------------------------------------------------------------------
@dataclass
class Outcome:
    began: float = 0.0
    ended: float = 0.0
    events: list[Event] = field(default_factory=list)
    late_announcements: int = 0
    checks: dict[str, Any] = field(default_factory=dict)
    exit_codes: list[int | None] = field(default_factory=list)


async def drive(args: argparse.Namespace, cluster: EmbeddedCluster, fleet: Fleet, outcome: Outcome) -> Chaos:
    """Start the workers, submit every run under chaos, wait for them, read and check the journal."""
    for _ in range(args.workers):
        fleet.spawn()
    client = await Client.connect(cluster.url, prefix=fleet.prefix, storage=StorageSettings(replicas=3))
    try:
        await fleet.wait_ready(client)
        tracker = Tracker(client, wave=args.wave)
        await tracker.start()
        chaos = Chaos(
            cluster,
            fleet,
            tracker,
            interval=args.chaos_interval,
            max_worker_kills=args.max_worker_kills,
            max_seconds=args.chaos_seconds,
            nats_at=args.nats_at,
            rng=random.Random(args.seed),
        )
        done = asyncio.Event()
        outcome.began = time.time()
        chaos_task = asyncio.create_task(chaos.run(done))
        await submit(client, tracker, args.runs, args.wave, args.rate)
        await tracker.wait_until(0, within=args.timeout)
        outcome.ended = max((at for _, at in tracker.finished.values()), default=time.time())
        done.set()
        await chaos_task
        await fleet.wait_ready(client)  # replacements started: SIGTERM must find them serving
        tracker.stop()
        outcome.events, outcome.late_announcements = await settled_journal(client, tracker, args.settle)
        outcome.checks = await verify(client, tracker, fleet, outcome.events)
        outcome.checks["runs_unfinished"] = args.runs - len(tracker.finished)
        outcome.checks["runs_completed"] = sum(1 for st, _ in tracker.finished.values() if st == "completed")
    finally:
        await client.close()
    return chaos


async def settled_journal(client: Client, tracker: Tracker, within: float) -> tuple[list[Event], int]:
    """The journal once every finished run's end is announced in it (a run's record is written before
    its ``_run`` event: a failover between the two delays the event until the redelivery), or after
    ``within`` seconds. Also returns how many announcements were still missing at the first read."""
    deadline = time.monotonic() + within
    first_missing = None
    while True:
        events = await read_journal(client)
        announced = {run for run, node, kind, _, _ in events if node == "_run" and kind in TERMINAL}
        missing = len(set(tracker.finished) - announced)
        first_missing = missing if first_missing is None else first_missing
        if not missing or time.monotonic() > deadline:
            return events, first_missing
        await asyncio.sleep(2.0)


def engine_revision() -> str:
    """The last commit of the engine, flagged when its files have uncommitted changes."""
    git = ["git", "-C", str(ROOT)]
    log = [*git, "log", "-1", "--format=%h", "--", "flow_orchestrator"]
    sha = subprocess.run(log, check=False, capture_output=True)
    dirty = subprocess.run([*git, "diff", "--quiet", "HEAD", "--", "flow_orchestrator"], check=False)
    revision = sha.stdout.decode().strip() or "unknown"
    return f"engine {revision}{'+uncommitted' if dirty.returncode else ''}"


def dump_events(path: Path, events: list[Event]) -> None:
    with open(path, "w") as dump:
        dump.writelines(json.dumps(event, default=str) + "\n" for event in events)


async def soak(args: argparse.Namespace) -> int:
    load_before = load1()
    workdir = Path(tempfile.mkdtemp(prefix="flow-soak-"))
    cluster = EmbeddedCluster(3)
    await asyncio.to_thread(cluster.start)
    fleet = Fleet(cluster.url, f"soak{uuid.uuid4().hex[:6]}", workdir, args.ack_wait)
    outcome = Outcome()
    try:
        chaos = await drive(args, cluster, fleet, outcome)
    finally:
        outcome.exit_codes = fleet.stop_all()
        await asyncio.to_thread(cluster.stop)
    dump_events(workdir / "events.jsonl", outcome.events)  # for post-mortems (kept with --keep)
    notes = (
        f"3-node cluster, replicas 3, file storage; {args.workers} worker processes, ack wait "
        f"{args.ack_wait}s; {event_loop_name()}; {os.cpu_count()} cpus; python {platform.python_version()}; "
        f"{engine_revision()}; load1 before={load_before:.2f} after={load1():.2f}"
    )
    document = report(args, outcome, chaos, notes)
    document["logs"] = str(workdir) if not document["ok"] or args.keep else None
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"soak-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps({"notes": notes, "ok": document["ok"], "results": str(path.relative_to(ROOT))}))
    for example in document["examples"]:
        print(f"  {example}", file=sys.stderr)
    if document["logs"] is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if document["ok"] else 1


def report(args: argparse.Namespace, outcome: Outcome, chaos: Chaos, notes: str) -> dict[str, Any]:
    """Print one JSON line per measurement; return the results document."""
    checks = outcome.checks
    nats_at = chaos.nats_kill["at"] if chaos.nats_kill else None
    worker_recovery = recovery_after_worker_kills(chaos.worker_kills, outcome.events, args.ack_wait, nats_at)
    nats = recovery_after_nats_kill(chaos.nats_kill, outcome.events) or {}
    firsts = [k["first_loss_detected_s"] for k in worker_recovery if k["first_loss_detected_s"] is not None]
    lasts = [k["all_resumed_s"] for k in worker_recovery if k["all_resumed_s"] is not None]
    elapsed = max(outcome.ended - outcome.began, 1e-9)
    measurements: list[tuple[str, Any, str]] = [
        ("runs_submitted", args.runs, "runs"),
        ("runs_completed", checks["runs_completed"], "runs"),
        ("runs_unfinished", checks["runs_unfinished"], "runs"),
        ("time_to_finish", round(elapsed, 3), "s"),
        ("throughput", round(checks["runs_completed"] / elapsed, 2), "runs/s"),
        *[
            (name, checks[name], "count")
            for name in checks
            if name not in ("examples", "runs_completed", "runs_unfinished")
        ],
        ("run_ends_announced_late", outcome.late_announcements, "runs"),
        ("worker_kills", len(chaos.worker_kills), "count"),
        ("worker_kill_attempts_running", sum(k["attempts_running"] for k in worker_recovery), "count"),
        ("worker_kill_attempts_lost_after", sum(k["attempts_lost_after"] for k in worker_recovery), "count"),
        ("worker_kill_loss_detected_median", _median(firsts), "s"),
        ("worker_kill_recovery_all_median", _median(lasts), "s"),
        ("worker_kill_recovery_all_max", max(lasts) if lasts else None, "s"),
        ("nats_leader_kill_first_run_completed_after", nats.get("first_run_completed_after_s"), "s"),
        ("nats_leader_kill_longest_completion_gap", nats.get("longest_completion_gap_s"), "s"),
        ("workers_exit_codes_on_sigterm", outcome.exit_codes, "codes"),
    ]
    lines = [
        {"system": "flow-orchestrator", "workload": "soak", "metric": name, "value": value, "unit": unit}
        for name, value, unit in measurements
    ]
    for line in lines:
        print(json.dumps(line), flush=True)
    ok = not (
        checks["lost_data_runs"]
        or checks["nodes_not_completed_exactly_once"]
        or checks["unexplained_repeats"]
        or checks["runs_unfinished"]
    )
    return {
        "command": " ".join(["python -m bench.soak", *sys.argv[1:]]),
        "notes": notes,
        "ok": ok,
        "measurements": lines,
        "worker_kills": [{**k, **r} for k, r in zip(chaos.worker_kills, worker_recovery, strict=True)],
        "nats_kill": nats or None,
        "examples": checks["examples"],
    }


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument(
        "--ack-wait", type=float, default=3.0, help="workers' ack wait (lost-attempt detection)"
    )
    parser.add_argument("--wave", type=int, help="runs per wave (default runs/20, 10 to 100)")
    parser.add_argument("--rate", type=float, help="runs per second (default: spread over the chaos plan)")
    parser.add_argument("--chaos-interval", type=float, default=6.0, help="seconds between chaos actions")
    parser.add_argument("--max-worker-kills", type=int, default=8)
    parser.add_argument("--nats-at", type=int, default=3, help="the chaos tick that kills the NATS leader")
    parser.add_argument("--chaos-seconds", type=float, default=300.0, help="the chaos loop's time bound")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for every run")
    parser.add_argument("--settle", type=float, default=60.0, help="seconds to wait for late run events")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the worker logs and execution markers")
    args = parser.parse_args(argv)
    # By default the submissions last as long as the chaos plan (every worker kill and the NATS kill).
    planned = args.chaos_interval * (args.max_worker_kills + 2)
    args.rate = args.rate or args.runs / planned
    args.wave = args.wave or min(100, max(10, args.runs // 20))
    return int(run(soak(args)))


if __name__ == "__main__":
    raise SystemExit(main())
