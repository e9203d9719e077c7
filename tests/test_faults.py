"""Runs survive NATS faults: a server restart, and the loss of a stream leader in a 3-node cluster.

Each test runs ~30 ``relay`` runs on two worker subprocesses, injects the fault while they are in
flight, and then checks, run by run, that the output is right, that every node has exactly one
``completed`` event in the journal, and that a node executed more than once only when the journal
records a ``lost`` attempt for it (DESIGN.md §4, invariants 2 and 3). Workers log at DEBUG to files
in the test's temporary directory, for diagnosis.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors as js_errors
import pytest

from flow_orchestrator import Client, RunHandle, RunNotFound, RunStatus, StorageSettings
from flow_orchestrator.bus import EmbeddedCluster, EmbeddedServer
from flow_orchestrator.testing import eventually
from tests.fault_workflows import RELAY_NODES, relay_expected

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
ACK_WAIT = 3.0  # seconds before a lost attempt's message is redelivered
RUNS = 30
FAULT_AFTER = RUNS * len(RELAY_NODES) // 3  # inject the fault once a third of the executions began
RESULTS_WITHIN = 60.0
# The test's own reads (not the API under test) retry these while the cluster settles.
SETTLING = (AssertionError, LookupError, nats.errors.Error, js_errors.Error, TimeoutError)


class WorkerPool:
    """``flowctl worker tests.fault_workflows:relay`` subprocesses, stopped by PID."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.markers = directory / "markers"
        self.markers.mkdir()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

    def spawn(self, nats_url: str, prefix: str, *, replicas: int = 1) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "FLOW_REPLICAS")}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        env["FLOW_TEST_MARKERS"] = str(self.markers)
        log_path = self.directory / f"worker-{len(self.procs)}.log"
        with open(log_path, "wb") as log:  # a file, not a pipe: DEBUG output must never block a worker
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "flow_orchestrator.runtime._cli",
                    "worker",
                    "tests.fault_workflows:relay",
                    "--nats",
                    nats_url,
                    "--prefix",
                    prefix,
                    "--replicas",
                    str(replicas),
                    "--ack-wait",
                    str(ACK_WAIT),
                    "--log-level",
                    "DEBUG",
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        self.procs.append(proc)
        self.logs.append(log_path)
        return proc

    async def wait_ready(self) -> None:
        def hosting() -> bool:
            for proc, log in zip(self.procs, self.logs, strict=True):
                assert proc.poll() is None, f"worker {proc.pid} exited early:\n{self.tail(log)}"
                if "hosting relay" not in log.read_text(errors="replace"):
                    return False
            return True

        await eventually(hosting, within=30, interval=0.1, message="workers hosting relay")

    def executions(self) -> collections.Counter[tuple[str, str]]:
        path = self.markers / "executions.log"
        lines = path.read_text().splitlines() if path.exists() else []
        return collections.Counter((line.split()[0], line.split()[1]) for line in lines if line)

    def stop_all(self) -> list[tuple[int, int | None]]:
        """SIGTERM each worker; return ``(pid, exit code)``, ``None`` for one that had to be killed."""
        outcomes: list[tuple[int, int | None]] = []
        for proc in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
            try:
                outcomes.append((proc.pid, proc.wait(timeout=30)))
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                outcomes.append((proc.pid, None))
        return outcomes

    def kill_leftovers(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()

    @staticmethod
    def tail(log: Path, lines: int = 40) -> str:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])

    def tails(self) -> str:
        return "\n".join(f"--- {log.name}\n{self.tail(log)}" for log in self.logs)


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[WorkerPool]:
    pool = WorkerPool(tmp_path)
    yield pool
    pool.kill_leftovers()


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    """A server of this test's own (file storage in the test's directory), since it gets restarted."""
    with EmbeddedServer(store_dir=tmp_path / "nats-store") as server:
        yield server


@pytest.fixture(scope="module")
def cluster() -> Iterator[EmbeddedCluster]:
    with EmbeddedCluster(3) as nats_cluster:
        yield nats_cluster


# --- the scenario shared by every fault --------------------------------------------------------------
async def start_runs(client: Client, workers: WorkerPool) -> list[tuple[RunHandle, int]]:
    """Start RUNS relay runs, slightly staggered so the fault finds them at different nodes."""
    started = []
    for x in range(RUNS):
        started.append((await client.start("relay", {"x": x}), x))
        await asyncio.sleep(0.02)

    def enough_in_flight() -> bool:
        return sum(workers.executions().values()) >= FAULT_AFTER

    await eventually(enough_in_flight, within=30, message=f"{FAULT_AFTER} executions begun")
    return started


async def collect_results(
    client: Client, runs: list[tuple[RunHandle, int]], workers: WorkerPool
) -> list[str]:
    """Wait for every run through ``handle.result()``; return what went wrong (a wrong output, or a
    ``result()`` that raised), after checking in the run records that every run did complete."""
    try:
        async with asyncio.timeout(RESULTS_WITHIN):
            outcomes = await asyncio.gather(*(handle.result() for handle, _ in runs), return_exceptions=True)
    except TimeoutError:
        raise AssertionError(
            f"runs did not all finish within {RESULTS_WITHIN}s:\n"
            + await describe_unfinished(client, runs)
            + "\n"
            + workers.tails()
        ) from None
    problems = []
    for (handle, x), outcome in zip(runs, outcomes, strict=True):
        if isinstance(outcome, BaseException):
            snapshot = await eventually(handle.status, within=30, retry_on=SETTLING)
            problems.append(
                f"{handle.run_id}: result() raised {type(outcome).__name__}: {outcome!s:.200}; "
                f"a status read just after found it {snapshot.status.value}, results {dict(snapshot.results)}"
            )
        elif outcome != relay_expected(x):
            problems.append(f"{handle.run_id}: output {outcome}, expected {relay_expected(x)}")

    async def all_completed() -> bool:
        for handle, _ in runs:
            status = (await handle.status()).status
            assert status is RunStatus.COMPLETED, f"{handle.run_id} is {status.value}"
        return True

    await eventually(all_completed, within=30, retry_on=SETTLING, message="every run record completed")
    return problems


async def describe_unfinished(client: Client, runs: list[tuple[RunHandle, int]]) -> str:
    lines = []
    for handle, _ in runs:
        try:
            status = (await handle.status()).status.value
        except RunNotFound:
            status = "no record"
        if status == "completed":
            continue
        journal = await client.journal(handle.run_id, "relay")
        events = " ".join(f"{e['node']}.{e['kind']}" for e in journal)
        lines.append(f"{handle.run_id}: {status}: {events}")
    return "\n".join(lines)


async def check_exactly_once(
    client: Client, runs: list[tuple[RunHandle, int]], workers: WorkerPool
) -> list[str]:
    """Per (run, node): exactly one ``completed`` event, and executions == 1 unless attempts were lost
    (a repeat is legitimate only when a ``lost`` event in the journal accounts for it)."""
    executions = workers.executions()
    run_ids = {handle.run_id for handle, _ in runs}

    async def journals_now() -> list[list[dict[str, Any]]]:
        return list(await asyncio.gather(*(client.journal(handle.run_id, "relay") for handle, _ in runs)))

    async def announced() -> bool:
        # A run's record is its truth and its terminal event follows the record write: when that
        # publish fails (the events stream electing a leader), the supervisor's message comes back
        # and announces again, up to ~10 s later. result() may return from the record (a client
        # that reconnected looks it up) before that, so wait for the announcements, then check.
        return all(
            any(e["node"] == "_run" and e["kind"] == "completed" for e in j) for j in await journals_now()
        )

    with contextlib.suppress(AssertionError):  # still missing after this: reported below, exactly
        await eventually(announced, within=60, interval=0.5)
    journals = await journals_now()
    problems: list[str] = []
    duplicates: dict[str, int] = {}
    lost_total = 0
    strangers = sorted({run for run, _ in executions} - run_ids)
    if strangers:
        problems.append(f"executions for runs never started: {strangers}")
    for (handle, _), journal in zip(runs, journals, strict=True):
        run_id = handle.run_id
        completed = collections.Counter(e["node"] for e in journal if e["kind"] == "completed")
        lost = collections.Counter(e["node"] for e in journal if e["kind"] == "lost")
        lost_total += sum(lost.values())
        if completed["_run"] != 1:
            problems.append(f"{run_id}: {completed['_run']} run-level completed events")
        for node in RELAY_NODES:
            ran = executions[(run_id, node)]
            if completed[node] != 1:
                problems.append(f"{run_id}/{node}: {completed[node]} completed events")
            if ran == 0:
                problems.append(f"{run_id}/{node}: completed without any execution")
            if ran > 1:
                duplicates[f"{run_id}/{node}"] = ran
                if ran - 1 > lost[node]:
                    history = [(e["kind"], e["data"].get("attempt")) for e in journal if e["node"] == node]
                    problems.append(
                        f"{run_id}/{node}: executed {ran} times but the journal has {lost[node]} lost "
                        f"attempt(s): {history}"
                    )
    summary = {
        "runs": len(runs),
        "executions": sum(executions.values()),
        "repeated": duplicates,
        "lost_events": lost_total,
    }
    print(f"exactly-once check: {summary}")
    return problems


def stop_workers(workers: WorkerPool) -> list[str]:
    """Every worker outlived the fault and exits 0 on SIGTERM (it drains); else what went wrong."""
    problems = [
        f"worker {proc.pid} died during the fault with code {proc.returncode}"
        for proc in workers.procs
        if proc.poll() is not None
    ]
    problems += [
        f"worker {pid} exited with {code} on SIGTERM" for pid, code in workers.stop_all() if code != 0
    ]
    return problems + ([workers.tails()] if problems else [])


async def run_scenario(
    client: Client, workers: WorkerPool, fault: Callable[[], Awaitable[None]]
) -> tuple[list[tuple[RunHandle, int]], list[str]]:
    await workers.wait_ready()
    runs = await start_runs(client, workers)
    begun = sum(workers.executions().values())
    assert begun < len(runs) * len(RELAY_NODES), "every node ran before the fault: nothing was in flight"
    await fault()
    return runs, await collect_results(client, runs, workers)


# --- a server restart ------------------------------------------------------------------------------
async def test_runs_survive_a_nats_server_restart(own_server: EmbeddedServer, workers: WorkerPool) -> None:
    prefix = f"f{uuid.uuid4().hex[:8]}"
    for _ in range(2):
        workers.spawn(own_server.url, prefix)
    client = await Client.connect(own_server.url, prefix=prefix)
    try:

        async def restart() -> None:
            await asyncio.to_thread(own_server.restart)

        runs, problems = await run_scenario(client, workers, restart)
        problems += await check_exactly_once(client, runs, workers)
    finally:
        await client.close()
    problems += stop_workers(workers)
    assert problems == [], "\n".join(problems)


# --- a cluster losing a leader ---------------------------------------------------------------------
def node_index(server_name: str) -> int:
    """``flow-n1`` -> 1 (EmbeddedCluster names its servers ``<name>-n<i>``)."""
    return int(server_name.rsplit("-n", 1)[1])


async def leader_of(client: Client, stream: str) -> int:
    info = await client.bus.js.stream_info(stream)
    assert info.cluster is not None, f"{stream} is not clustered"
    assert info.cluster.leader, f"{stream} has no leader"
    return node_index(info.cluster.leader)


def kv_stream(client: Client) -> str:
    return f"KV_{client.names.state_bucket}"


async def assert_cluster_healthy(cluster: EmbeddedCluster, client: Client) -> None:
    for index in range(cluster.size):
        await asyncio.to_thread(cluster.wait_healthy, index)

    async def replicated() -> bool:
        for stream in (client.names.events_stream, client.names.triggers_stream, kv_stream(client)):
            info = await client.bus.js.stream_info(stream)
            cluster_info = info.cluster
            assert cluster_info is not None, f"{stream} is not clustered"
            assert cluster_info.leader, f"{stream}: no leader"
            peers = cluster_info.replicas or []
            assert len(peers) == cluster.size - 1, f"{stream}: peers {peers}"
            assert all(p.current and not p.offline for p in peers), f"{stream}: peers {peers}"
        return True

    await eventually(
        replicated, within=30, interval=0.2, retry_on=SETTLING, message="every stream has 3 current replicas"
    )


async def separate_leaders(client: Client, stream: str, other: str) -> None:
    """Move ``other``'s leadership off ``stream``'s leader, so killing that node hits ``stream`` alone."""
    for _ in range(5):
        if await leader_of(client, other) != await leader_of(client, stream):
            return
        await client.bus.nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{other}", b"", timeout=5)
        await asyncio.sleep(0.5)
    raise AssertionError(f"{other} kept sharing its leader with {stream}")


async def cluster_scenario(
    cluster: EmbeddedCluster, workers: WorkerPool, victim_stream: Callable[[Client], str], *, alone: bool
) -> None:
    """Kill the leader of ``victim_stream`` (with SIGKILL) while runs are in flight; with ``alone``,
    first make sure that node does not also lead the events stream."""
    prefix = f"f{uuid.uuid4().hex[:8]}"
    for _ in range(2):
        workers.spawn(cluster.url, prefix, replicas=3)
    client = await Client.connect(cluster.url, prefix=prefix, storage=StorageSettings(replicas=3))
    victim: list[int] = []
    try:
        await workers.wait_ready()
        events = client.names.events_stream
        assert (await client.bus.js.stream_info(events)).config.num_replicas == 3
        if alone:
            await separate_leaders(client, victim_stream(client), events)

        async def kill_leader() -> None:
            index = await leader_of(client, victim_stream(client))
            also_events = await leader_of(client, events) == index
            victim.append(index)
            print(
                f"killing node {index}, leader of {victim_stream(client)} (events leader too: {also_events})"
            )
            await asyncio.to_thread(cluster.nodes[index].stop, kill=True)

        runs, problems = await run_scenario(client, workers, kill_leader)
        await asyncio.to_thread(cluster.restart, victim[0])
        await assert_cluster_healthy(cluster, client)
        # The healed cluster still runs work, and its journal answers for everything.
        after = [(await client.start("relay", {"x": x}), x) for x in range(100, 103)]
        problems += await collect_results(client, after, workers)
        problems += await check_exactly_once(client, runs + after, workers)
    finally:
        await client.close()
        if victim and cluster.nodes[victim[0]].pid is None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(cluster.restart, victim[0])
    problems += stop_workers(workers)
    assert problems == [], "\n".join(problems)


async def test_runs_survive_killing_the_events_stream_leader(
    cluster: EmbeddedCluster, workers: WorkerPool
) -> None:
    await cluster_scenario(cluster, workers, lambda client: client.names.events_stream, alone=False)


async def test_runs_survive_killing_the_state_bucket_leader(
    cluster: EmbeddedCluster, workers: WorkerPool
) -> None:
    await cluster_scenario(cluster, workers, kv_stream, alone=True)
