"""Benchmark plumbing: the NATS set-ups (one server or a 3-node cluster), worker subprocesses stopped by
PID, the raw-hop floor, statistics and the JSON line format of BENCH-SPEC."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import nats.errors
from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig

from flow_orchestrator.bus import EmbeddedCluster, EmbeddedServer

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def event_loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def run(coro: Any) -> Any:
    """Run the benchmark's coroutine on uvloop when installed, as workers do."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


@dataclass(frozen=True, slots=True)
class Deployment:
    """Where a benchmark runs: the URL(s) to connect to and the replica count its streams use."""

    name: str
    url: str
    replicas: int
    description: str
    server_pids: tuple[int, ...] = ()


async def settle(url: str, prefix: str, replicas: int, within: float = 30.0) -> None:
    """Provision the deployment's streams and bucket from a client and wait until each has a leader,
    its replicas are current and KV reads answer. On a fresh 3-node cluster a worker that starts
    before this can fail its first KV read (no responders yet); benchmarks measure runs, not that."""
    from flow_orchestrator import Client, StorageSettings

    client = await Client.connect(url, prefix=prefix, storage=StorageSettings(replicas=replicas))
    names = client.names
    streams = (names.triggers_stream, names.events_stream, names.dlq_stream, f"KV_{names.state_bucket}")
    deadline = time.monotonic() + within
    try:
        while True:
            try:
                for stream in streams:
                    info = await client.bus.js.stream_info(stream)
                    peers = info.cluster.replicas or [] if info.cluster else []
                    if replicas > 1 and (
                        info.cluster is None
                        or not info.cluster.leader
                        or len(peers) != replicas - 1
                        or not all(p.current and not p.offline for p in peers)
                    ):
                        raise RuntimeError(f"{stream} not replicated yet")
                await client.store.get("settle.probe")
                return
            except (RuntimeError, nats.errors.Error) as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"deployment not ready within {within} s: {exc}") from exc
                await asyncio.sleep(0.1)
    finally:
        await client.close()


def cpu_seconds(pids: list[int]) -> tuple[float, float]:
    """User + system CPU seconds so far of these processes, and of their children (Linux /proc)."""
    own = children = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            kids = [  # a child belongs to the thread that started it
                int(c)
                for task in Path(f"/proc/{pid}/task").iterdir()
                for c in (task / "children").read_text().split()
            ]
        except OSError:
            continue
        own += (int(fields[11]) + int(fields[12])) / tick
        children += sum(cpu_seconds(kids))
    return own, children


class CpuMeter:
    """CPU spent by the bus servers, the workers and this process (the client) between two reads."""

    def __init__(self, servers: tuple[int, ...], workers: list[int]) -> None:
        self._groups = {"server": list(servers), "workers": workers, "client": [os.getpid()]}
        self._start = self._read()

    def _read(self) -> dict[str, float]:
        # Own CPU only: this process's children are the servers and workers, counted on their own.
        return {name: cpu_seconds(pids)[0] for name, pids in self._groups.items()}

    def ms_per(self, count: int) -> dict[str, float]:
        """Milliseconds of CPU per ``count`` (node executions) since this meter was made."""
        now = self._read()
        return {name: round((now[name] - self._start[name]) * 1000 / count, 3) for name in now}


@contextmanager
def embedded_server() -> Iterator[EmbeddedServer]:
    server = EmbeddedServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def deployment(cluster: bool) -> Iterator[Deployment]:
    """One local server (replicas 1) or a 3-node loopback cluster (replicas 3), file storage both."""
    if not cluster:
        with embedded_server() as server:
            pids: tuple[int, ...] = (server.pid,) if server.pid else ()
            yield Deployment("single", server.url, 1, "1 server, replicas=1, file storage", pids)
        return
    with EmbeddedCluster(3) as nodes:
        pids = tuple(node.pid for node in nodes.nodes if node.pid)
        yield Deployment("cluster", nodes.url, 3, "3-node cluster (loopback), replicas=3, file storage", pids)


@dataclass(frozen=True, slots=True)
class WorkerProcess:
    """A worker subprocess and the file its output goes to (read it when something went wrong)."""

    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_errors(self) -> int:
        """How many tracebacks the worker printed (the library logs nothing itself: these are
        unhandled errors reported by the event loop)."""
        return self.log.read_text(errors="replace").count("Traceback (most recent call last)")


@contextmanager
def worker_processes(
    url: str,
    target: str,
    prefix: str,
    count: int,
    *,
    replicas: int = 1,
    concurrency: int | None = None,
    max_in_flight: int | None = None,
    kill: bool = False,
    env: dict[str, str] | None = None,
    ready_timeout: float = 60.0,
    options: Sequence[str] = (),
    root: Path | None = None,
) -> Iterator[list[WorkerProcess]]:
    """``count`` worker subprocesses hosting ``target``; stopped by PID afterwards, with SIGTERM (a
    drain) or, when ``kill``, SIGKILL (for benchmarks that leave work in flight on purpose).

    Their output goes to files, never to a pipe nobody reads: a worker that prints a lot must not
    block on a full pipe in the middle of a measurement. The files are removed afterwards unless a
    worker printed a traceback. ``options`` are further ``Worker`` arguments, ``KEY=VALUE`` each;
    ``root`` runs the workers from another checkout of the repository (its engine and its bench)."""
    tree, child_env = checkout_env(root or ROOT, env)
    args = [sys.executable, "-m", "bench._worker", url, target, prefix, "--replicas", str(replicas)]
    if concurrency is not None:
        args += ["--concurrency", str(concurrency)]
    if max_in_flight is not None:
        args += ["--max-in-flight", str(max_in_flight)]
    for option in options:
        args += ["--option", option]
    logs = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    workers = []
    for i in range(count):
        log = logs / f"worker{i}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(args, env=child_env, cwd=tree, stdout=out, stderr=subprocess.STDOUT)
        workers.append(WorkerProcess(proc, log))
    try:
        for worker in workers:
            _wait_ready(worker, ready_timeout)
        yield workers
    finally:
        for worker in workers:
            if worker.proc.poll() is None:
                os.kill(worker.pid, signal.SIGKILL if kill else signal.SIGTERM)
        for worker in workers:
            try:
                worker.proc.wait(40)
            except subprocess.TimeoutExpired:
                os.kill(worker.pid, signal.SIGKILL)
                worker.proc.wait()
        if not any(worker.log_errors() for worker in workers):
            shutil.rmtree(logs, ignore_errors=True)  # kept when a worker reported errors


def checkout_env(root: Path, env: dict[str, str] | None = None) -> tuple[Path, dict[str, str]]:
    """The directory and environment in which a ``python -m`` child runs ``root``'s engine and bench.

    The child must start in ``root``: ``-m`` puts the working directory first on ``sys.path``,
    ahead of ``PYTHONPATH``, so a child started here would import this checkout's engine whatever
    the path said (every ``--b-tree`` comparison before this check compared an engine with itself).
    A child of the same environment says which engine it imports, before any is trusted."""
    tree = root.resolve()
    path = os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")])
    child_env = {**os.environ, "PYTHONPATH": path, **(env or {})}
    found = subprocess.run(
        [sys.executable, "-c", "import flow_orchestrator; print(flow_orchestrator.__file__)"],
        env=child_env,
        cwd=tree,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not Path(found).resolve().is_relative_to(tree):
        raise RuntimeError(f"workers meant to run the engine of {tree} would import {found}")
    return tree, child_env


def _wait_ready(worker: WorkerProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = worker.log.read_text(errors="replace")
        if "ready" in text.splitlines():
            return
        if worker.proc.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"worker {worker.pid} failed to start:\n{worker.log.read_text(errors='replace')}")


async def raw_hop_ms(url: str, hops: int = 20, rounds: int = 40, replicas: int = 1) -> float:
    """The floor: the median cost of one JetStream hop (publish with ack, push delivery to another
    connection, ack, publish the next), the least any durable step on this bus can cost."""
    servers = url.split(",")
    pub = await nats.connect(servers)
    sub_conn = await nats.connect(servers)
    js, sjs = pub.jetstream(), sub_conn.jetstream()
    stream = f"HOP{uuid.uuid4().hex[:6].upper()}"
    await js.add_stream(
        StreamConfig(name=stream, subjects=[f"{stream}.>"], storage=StorageType.FILE, num_replicas=replicas)
    )
    done: asyncio.Queue[float] = asyncio.Queue()

    async def relay(msg: Any) -> None:
        n = int(msg.subject.rsplit(".", 1)[1])
        await msg.ack()
        if n + 1 < hops:
            await sjs.publish(f"{stream}.hop.{n + 1}", b"x")
        else:
            done.put_nowait(time.perf_counter())

    await sjs.subscribe(
        f"{stream}.hop.*",
        durable="relay",
        cb=relay,
        manual_ack=True,
        config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT),
    )
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        await js.publish(f"{stream}.hop.0", b"x")
        end = await done.get()
        samples.append((end - start) / hops * 1000)
    await js.delete_stream(stream)
    await pub.close()
    await sub_conn.close()
    return statistics.median(samples)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def load1() -> float:
    return os.getloadavg()[0]


def engine_revision() -> str:
    """The commit the benchmarked engine came from, flagged when its files have uncommitted changes
    (the tree moves while benchmarks run: say which code a figure belongs to)."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "diff", "--quiet", "HEAD", "--", "flow_orchestrator"], cwd=ROOT, check=False
        ).returncode
    except (OSError, subprocess.CalledProcessError):
        return "engine revision unknown"
    return f"engine {sha}{'+uncommitted' if dirty else ''}"


def result_line(
    workload: str,
    samples_ms: list[float],
    notes: str,
    *,
    system: str = "flow-orchestrator",
    engine: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    line: dict[str, Any] = {
        "system": system,
        "workload": workload,
        "median_ms": round(statistics.median(samples_ms), 3),
        "p90_ms": round(percentile(samples_ms, 0.9), 3),
        "min_ms": round(min(samples_ms), 3),
        "runs": len(samples_ms),
    }
    line.update(extra)
    line["notes"] = f"{notes}; {engine_revision()}; python {platform.python_version()}; load1={load1():.2f}"
    return line


def write_results(name: str, lines: list[dict[str, Any]], directory: Path = RESULTS) -> Path:
    """One JSON object per line (BENCH-SPEC), in ``<directory>/<name>-<timestamp>.jsonl``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path
