"""``flowctl`` end to end: every command runs as a real subprocess against the session nats-server, with a
real worker subprocess hosting ``tests/cli_workflows.py`` under a prefix of its own."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest

from flow_orchestrator import NodeContext, NonRetryableError, RunFailed, Workflow
from flow_orchestrator.runtime._cli import main as cli_main
from flow_orchestrator.testing import LocalEnvironment, eventually

ROOT = Path(__file__).resolve().parent.parent
CLI = "flow_orchestrator.runtime._cli"
HOSTED = "tests.cli_workflows:workflows"

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@dataclass
class WorkerProcess:
    prefix: str
    proc: asyncio.subprocess.Process
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def new_prefix() -> str:
    return f"cli{uuid4().hex[:8]}"


async def flowctl(*args: str, env: Mapping[str, str], within: float = 60.0) -> Result:
    """Run ``flowctl ARGS`` to completion. Output goes to files, so a hung command still shows what it
    printed when it is killed."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            CLI,
            *args,
            cwd=ROOT,
            env=dict(env),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=err,
        )
        try:
            async with asyncio.timeout(within):
                await proc.wait()
        except TimeoutError:
            hung = True
            await _terminate(proc)
        else:
            hung = False
        out.seek(0)
        err.seek(0)
        result = Result(int(proc.returncode or 0), out.read().decode(), err.read().decode())
    if hung:
        raise AssertionError(f"flowctl {' '.join(args)} hung for {within}s:\n{result.out}\n{result.err}")
    return result


async def _terminate(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM first, so the command can stop the processes it started; SIGKILL if it does not exit."""
    os.kill(proc.pid, signal.SIGTERM)
    try:
        async with asyncio.timeout(15):
            await proc.wait()
    except TimeoutError:
        os.kill(proc.pid, signal.SIGKILL)
        await proc.wait()


async def stop_worker(worker: WorkerProcess) -> int:
    """SIGTERM by PID; the worker must drain and exit by itself within 30 s."""
    if worker.proc.returncode is None:
        os.kill(worker.proc.pid, signal.SIGTERM)
    try:
        async with asyncio.timeout(30):
            return await worker.proc.wait()
    except TimeoutError:
        worker.proc.kill()
        await worker.proc.wait()
        raise AssertionError(f"worker did not drain within 30s:\n{worker.text()}") from None


@contextlib.asynccontextmanager
async def flowctl_worker(target: str, env: dict[str, str], log: Path) -> AsyncIterator[WorkerProcess]:
    """A ``flowctl worker TARGET`` subprocess on a fresh prefix; on exit it must drain and exit 0."""
    prefix = new_prefix()
    with log.open("wb") as sink:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            CLI,
            "worker",
            target,
            "--prefix",
            prefix,
            cwd=ROOT,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=sink,
            stderr=sink,
        )
    started = WorkerProcess(prefix, proc, log)
    try:
        # The worker logs "hosting ..." once every actor listens.
        await eventually(
            lambda: "hosting" in started.text() or proc.returncode is not None,
            within=30,
            message="worker start",
        )
        assert proc.returncode is None, f"worker exited early:\n{started.text()}"
        yield started
    finally:
        code = await stop_worker(started)
    assert code == 0, f"worker exited with {code}:\n{started.text()}"


@pytest.fixture
async def worker(subprocess_env: dict[str, str], tmp_path: Path) -> AsyncIterator[WorkerProcess]:
    async with flowctl_worker(HOSTED, subprocess_env, tmp_path / "worker.log") as started:
        yield started


# --- graph (no server) ---------------------------------------------------------------------------
async def test_graph_prints_text_and_mermaid(subprocess_env: dict[str, str]) -> None:
    text = await flowctl("graph", "tests.cli_workflows:wf", "--format", "text", env=subprocess_env)
    assert text.code == 0, text.err
    lines = text.out.splitlines()
    assert lines[0] == "workflow cli_sum: 4 node(s), input SumIn"
    assert [line.split()[0] for line in lines[1:]] == ["parse", "double", "square", "total"]
    assert re.search(r"^    double\s+<- parse\s+\[retry x3\]$", text.out, re.M)
    assert re.search(r"^    square\s+<- parse\s+\[sync\]$", text.out, re.M)
    assert re.search(r"^      total\s+<- double, square$", text.out, re.M)
    assert "graph TD" not in text.out

    mermaid = await flowctl("graph", "tests.cli_workflows:wf", "--format", "mermaid", env=subprocess_env)
    assert mermaid.code == 0, mermaid.err
    lines = mermaid.out.splitlines()
    assert lines[0] == "graph TD"
    for edge in ("parse --> double", "parse --> square", "double --> total", "square --> total"):
        assert f"    {edge}" in lines
    assert '    total["total"]' in lines

    both = await flowctl("graph", HOSTED, env=subprocess_env)
    assert both.code == 0, both.err
    assert both.out.count("graph TD") == 3
    assert "workflow cli_fail: 3 node(s)" in both.out


async def test_bad_targets_and_inputs_are_usage_errors(subprocess_env: dict[str, str]) -> None:
    missing = await flowctl("graph", "tests.cli_workflows:nope", env=subprocess_env)
    assert missing.code == 2
    assert "has no attribute 'nope'" in missing.err
    not_a_workflow = await flowctl("graph", "tests.cli_workflows:SumIn", env=subprocess_env)
    assert not_a_workflow.code == 2
    assert "not a Workflow" in not_a_workflow.err
    no_colon = await flowctl("graph", "tests.cli_workflows", env=subprocess_env)
    assert no_colon.code == 2
    assert "MODULE:ATTR" in no_colon.err
    bad_json = await flowctl(
        "run", "cli_sum", "--input", "{nope", "--prefix", new_prefix(), env=subprocess_env
    )
    assert bad_json.code == 2
    assert "--input must be JSON" in bad_json.err
    unknown_command = await flowctl("launch", env=subprocess_env)
    assert unknown_command.code == 2
    deep = await flowctl("trigger", "cli_sum", "--input", "[" * 5000 + "]" * 5000, env=subprocess_env)
    assert deep.code == 2
    assert "--input must be JSON" in deep.err


@pytest.mark.parametrize(
    "args",
    [
        ("worker", "tests.cli_workflows:wf", "--concurrency", "0"),
        ("worker", "tests.cli_workflows:wf", "--max-deliver", "-1"),
        ("worker", "tests.cli_workflows:wf", "--ack-wait", "0"),
        ("run", "cli_sum", "--timeout", "nan"),
        ("runs", "--limit", "-1"),
        ("dlq", "replay", "0"),
        ("--replicas", "0", "runs"),
    ],
)
def test_out_of_range_options_are_usage_errors_before_anything_happens(
    args: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(list(args)) == 2
    # argparse refuses them (nothing is connected or published), naming the option and the bound.
    assert re.search(r"error: argument [^:]+: must be ", capsys.readouterr().err)


async def test_unknown_workflow_exits_2_with_a_clear_message(subprocess_env: dict[str, str]) -> None:
    result = await flowctl(
        "run", "no_such_flow", "--input", "{}", "--json", "--prefix", new_prefix(), env=subprocess_env
    )
    assert result.code == 2
    assert result.out == ""
    assert "no worker has registered workflow 'no_such_flow'" in result.err
    assert "flowctl worker" in result.err


# --- with a worker -------------------------------------------------------------------------------
async def test_run_json_reports_nodes_attempts_and_outputs(
    worker: WorkerProcess, subprocess_env: dict[str, str]
) -> None:
    result = await flowctl(
        "run",
        "cli_sum",
        "--input",
        '{"a": 3, "b": 4}',
        "--json",
        "--prefix",
        worker.prefix,
        env=subprocess_env,
    )
    assert result.code == 0, result.err
    document = result.json()  # the whole of stdout is one JSON document
    assert set(document) == {"run_id", "workflow", "status", "error", "nodes", "outputs"}
    assert document["workflow"] == "cli_sum"
    assert document["status"] == "completed"
    assert document["error"] is None
    assert list(document["nodes"]) == ["parse", "double", "square", "total"]
    assert {n["status"] for n in document["nodes"].values()} == {"completed"}
    assert {name: n["attempts"] for name, n in document["nodes"].items()} == {
        "parse": 1,
        "double": 2,
        "square": 1,
        "total": 1,
    }
    assert all(n["duration_ms"] is not None and n["duration_ms"] >= 0 for n in document["nodes"].values())
    assert document["outputs"]["total"] == {"total": 22, "inputs": {"a": 3, "b": 4}}


async def test_run_text_shows_the_table_and_the_result(
    worker: WorkerProcess, subprocess_env: dict[str, str]
) -> None:
    result = await flowctl(
        "run", "cli_sum", "--input", '{"a": 1, "b": 2}', "--prefix", worker.prefix, env=subprocess_env
    )
    assert result.code == 0, result.err
    # Not a terminal: one line per change, then the final table and the result.
    assert re.search(r"^\s+[\d.]+s\s+double\s+completed \(attempt 2\)$", result.out, re.M)
    assert re.search(r"run \w+ completed$", result.out, re.M)
    assert re.search(r"double\W+completed\W+2\b", result.out)
    assert '"total": 6' in result.out
    assert "\x1b[" not in result.out  # no terminal escapes in logs


async def test_failing_run_exits_1_with_the_failed_node(
    worker: WorkerProcess, subprocess_env: dict[str, str]
) -> None:
    result = await flowctl("run", "cli_fail", "--json", "--prefix", worker.prefix, env=subprocess_env)
    assert result.code == 1, result.err
    document = result.json()
    assert document["status"] == "failed"
    assert document["error"] == {
        "node": "explode",
        "type": "ValueError",
        "message": "boom: the widget is missing",
    }
    assert document["nodes"]["start"]["status"] == "completed"
    assert document["nodes"]["explode"] == {
        "status": "failed",
        "attempts": 1,
        "error": "boom: the widget is missing",
        "duration_ms": document["nodes"]["explode"]["duration_ms"],
    }
    assert document["nodes"]["after"]["status"] == "skipped"
    assert document["outputs"] == {"start": "started"}


async def test_invalid_payload_exits_2_instead_of_waiting(
    worker: WorkerProcess, subprocess_env: dict[str, str]
) -> None:
    result = await flowctl(
        "run",
        "cli_sum",
        "--input",
        '{"a": "three", "b": 4}',
        "--json",
        "--prefix",
        worker.prefix,
        env=subprocess_env,
        within=30,
    )
    assert result.code == 2
    assert result.out == ""
    assert "does not match SumIn" in result.err


async def test_trigger_then_status_then_runs(worker: WorkerProcess, subprocess_env: dict[str, str]) -> None:
    prefix = ("--prefix", worker.prefix)
    fired = await flowctl(
        "trigger",
        "cli_sum",
        "--input",
        '{"a": 5, "b": 5}',
        "--run-id",
        "order-42",
        *prefix,
        env=subprocess_env,
    )
    assert fired.code == 0, fired.err
    assert fired.out.strip() == "order-42"

    async def completed() -> dict[str, Any] | None:
        status = await flowctl("status", "order-42", "--json", *prefix, env=subprocess_env)
        assert status.code == 0, status.err
        document: dict[str, Any] = status.json()
        return document if document["status"] == "completed" else None

    document = await eventually(completed, within=30, message="run order-42 completed")
    assert document["run_id"] == "order-42"
    assert document["outputs"]["total"]["total"] == 35

    text = await flowctl("status", "order-42", *prefix, env=subprocess_env)
    assert text.code == 0
    assert re.search(r"total\W+completed\W+1\b", text.out)

    failed = await flowctl("run", "cli_fail", "--json", *prefix, env=subprocess_env)
    listed = await flowctl("runs", "--json", *prefix, env=subprocess_env)
    assert listed.code == 0, listed.err
    runs = listed.json()
    assert {r["run_id"] for r in runs} == {"order-42", failed.json()["run_id"]}
    assert all({"run_id", "workflow", "status", "created_at", "finished_at"} <= set(r) for r in runs)
    assert runs[0]["run_id"] == failed.json()["run_id"]  # newest first

    only_failed = await flowctl("runs", "--json", "--status", "failed", *prefix, env=subprocess_env)
    assert [(r["workflow"], r["status"]) for r in only_failed.json()] == [("cli_fail", "failed")]
    only_sum = await flowctl("runs", "--json", "--workflow", "cli_sum", *prefix, env=subprocess_env)
    assert [r["run_id"] for r in only_sum.json()] == ["order-42"]

    missing = await flowctl("status", "never-started", *prefix, env=subprocess_env)
    assert missing.code == 2
    assert "no run with id 'never-started'" in missing.err


async def test_cancel_a_running_run(worker: WorkerProcess, subprocess_env: dict[str, str]) -> None:
    prefix = ("--prefix", worker.prefix)
    fired = await flowctl("trigger", "cli_slow", "--input", '{"seconds": 20}', *prefix, env=subprocess_env)
    run_id = fired.out.strip()

    async def napping() -> bool:
        status = await flowctl("status", run_id, "--json", *prefix, env=subprocess_env)
        return status.code == 0 and status.json()["nodes"]["nap"]["status"] == "running"

    await eventually(napping, within=30, message="nap running")
    cancelled = await flowctl("cancel", run_id, "--reason", "changed my mind", *prefix, env=subprocess_env)
    assert cancelled.code == 0, cancelled.err

    async def is_cancelled() -> dict[str, Any] | None:
        document: dict[str, Any] = (
            await flowctl("status", run_id, "--json", *prefix, env=subprocess_env)
        ).json()
        return document if document["status"] == "cancelled" else None

    document = await eventually(is_cancelled, within=30, message="run cancelled")
    assert document["error"]["message"] == "changed my mind"
    assert document["nodes"]["wake"]["status"] == "cancelled"
    again = await flowctl("cancel", run_id, *prefix, env=subprocess_env)
    assert again.code == 1
    assert "already cancelled" in again.err


async def test_run_timeout_exits_1_with_the_unfinished_snapshot(
    worker: WorkerProcess, subprocess_env: dict[str, str]
) -> None:
    result = await flowctl(
        "run",
        "cli_slow",
        "--input",
        '{"seconds": 2}',
        "--timeout",
        "0.5",
        "--json",
        "--prefix",
        worker.prefix,
        env=subprocess_env,
    )
    assert result.code == 1
    assert "did not finish within 0.5s" in result.err
    assert result.json()["status"] == "running"


async def test_sigterm_drains_the_in_flight_attempt(
    worker: WorkerProcess, subprocess_env: dict[str, str]
) -> None:
    prefix = ("--prefix", worker.prefix)
    run_id = (
        await flowctl("trigger", "cli_slow", "--input", '{"seconds": 1.5}', *prefix, env=subprocess_env)
    ).out.strip()

    async def napping() -> bool:
        status = await flowctl("status", run_id, "--json", *prefix, env=subprocess_env)
        return status.code == 0 and status.json()["nodes"]["nap"]["status"] == "running"

    await eventually(napping, within=30, message="nap running")
    assert await stop_worker(worker) == 0
    # The attempt in flight finished before the worker exited: drained, not abandoned.
    document = (await flowctl("status", run_id, "--json", *prefix, env=subprocess_env)).json()
    assert document["nodes"]["nap"]["status"] == "completed"
    assert document["status"] == "running"  # nobody is left to run `wake`
    assert "stopped" in worker.text()


# --- the server ----------------------------------------------------------------------------------
async def test_server_serves_until_sigterm(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    out = tmp_path / "server.out"
    store = tmp_path / "store"
    with out.open("wb") as sink:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            CLI,
            "server",
            "--port",
            "-1",
            "--store-dir",
            str(store),
            cwd=ROOT,
            env=subprocess_env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=sink,
            stderr=sink,
        )
    try:
        ready = await eventually(
            lambda: re.search(r"pid (\d+),.* listening on (nats://\S+)", out.read_text()),
            within=30,
            message="server listening",
        )
        child_pid, url = int(ready.group(1)), ready.group(2)
        listed = await flowctl("runs", "--json", "--nats", url, "--prefix", new_prefix(), env=subprocess_env)
        assert listed.code == 0, listed.err
        assert listed.json() == []
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        async with asyncio.timeout(30):
            code = await proc.wait()
    assert code == 0, out.read_text()
    assert store.is_dir()  # an explicit store directory is kept
    with pytest.raises(ProcessLookupError):
        os.kill(child_pid, 0)  # the nats-server child stopped with it


# --- the demo ------------------------------------------------------------------------------------
async def test_demo_runs_the_order_workflow(nats_url: str, subprocess_env: dict[str, str]) -> None:
    result = await flowctl(
        "demo", "--nats", nats_url, "--prefix", f"demo{uuid4().hex[:8]}", env=subprocess_env, within=100
    )
    assert result.code == 0, result.out + result.err
    assert re.search(r"charge_payment\W+completed\W+3\b", result.out), result.out
    assert re.search(
        r"charge_payment\s+retrying \(attempt 2\) RuntimeError: payment gateway timeout", result.out
    )
    assert "charge_payment took 3 attempts" in result.out
    assert "drained and exited with code 0" in result.out
    assert '"tracking": "TRK-A-1001-ams-1"' in result.out


async def test_sigterm_stops_the_demo_and_its_worker(
    nats_url: str, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "demo.out"
    with out.open("wb") as sink:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            CLI,
            "demo",
            "--nats",
            nats_url,
            "--prefix",
            f"demo{uuid4().hex[:8]}",
            cwd=ROOT,
            env=subprocess_env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=sink,
            stderr=sink,
        )
    try:
        started = await eventually(
            lambda: (
                re.search(r"worker process \(pid (\d+)\)", out.read_text())
                if "running" in out.read_text()
                else None
            ),
            within=30,
            message="demo run in progress",
        )
    finally:
        await _terminate(proc)
    assert proc.returncode == 128 + signal.SIGTERM, out.read_text()
    assert "demo stopped by SIGTERM" in out.read_text()
    assert "drained and exited with code 0" in out.read_text()
    with pytest.raises(ProcessLookupError):
        os.kill(int(started.group(1)), 0)  # the worker process is gone too


async def test_unreachable_server_is_a_clear_error_not_a_hang(subprocess_env: dict[str, str]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"nats://127.0.0.1:{sock.getsockname()[1]}"
    for args in (["worker", "tests.cli_workflows:wf"], ["runs"]):
        result = await flowctl(*args, "--nats", dead, env=subprocess_env, within=30)
        assert result.code == 2, result
        assert f"cannot reach NATS at {dead}" in result.err


async def test_dead_letter_and_retry_commands(env_factory: Any, subprocess_env: dict[str, str]) -> None:
    prefix = new_prefix()
    local: LocalEnvironment = await env_factory([failing_once], prefix=prefix, unknown_workflow_grace=0.2)
    await local.client.bus.js.publish(
        local.names.trigger("nobody"),
        b'{"a": 1}',
        headers={"Nats-Msg-Id": "dlq-cli-1", "Content-Type": "application/json"},
    )
    listed = await eventually(lambda: _dead_letters_json(prefix, subprocess_env), within=20)
    [letter] = listed
    assert letter["reason"] == "unknown_workflow"
    assert letter["headers"]["Nats-Msg-Id"] == "dlq-cli-1"
    text = await flowctl("dlq", "--prefix", prefix, env=subprocess_env)
    assert "unknown_workflow" in text.out
    replayed = await flowctl("dlq", "replay", str(letter["id"]), "--prefix", prefix, env=subprocess_env)
    assert replayed.code == 0, replayed
    assert "run dlq-cli-1" in replayed.out
    missing = await flowctl("dlq", "replay", "99999", "--prefix", prefix, env=subprocess_env)
    assert missing.code == 2
    assert "no dead letter 99999" in missing.err

    handle = await local.client.start("failing_once", {})
    with pytest.raises(RunFailed):
        await handle.result()
    retried = await flowctl("retry", handle.run_id, "--wait", "--prefix", prefix, env=subprocess_env)
    assert retried.code == 0, retried
    assert "new attempts for flaky" in retried.out
    again = await flowctl("retry", handle.run_id, "--prefix", prefix, env=subprocess_env)
    assert again.code == 2
    assert "only a failed run can be retried" in again.err


async def _dead_letters_json(prefix: str, env: dict[str, str]) -> list[dict[str, Any]] | None:
    result = await flowctl("dlq", "list", "--json", "--prefix", prefix, env=env)
    assert result.code == 0, result
    letters: list[dict[str, Any]] = json.loads(result.out)
    return letters or None


failing_once = Workflow("failing_once")
_failures: dict[str, int] = {}


@failing_once.node()
async def flaky(ctx: NodeContext) -> str:
    _failures[ctx.run_id] = _failures.get(ctx.run_id, 0) + 1
    if _failures[ctx.run_id] == 1:
        raise NonRetryableError("fails the first time only")
    return "ok"
