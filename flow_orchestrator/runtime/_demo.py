"""``flowctl demo``: an order workflow shaped as a diamond with a flaky payment step, run end to end
against a real server and a real worker process, so a newcomer sees retries and the live view at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field
from rich.console import Console
from rich.text import Text

from flow_orchestrator.bus._server import EmbeddedServer
from flow_orchestrator.runtime._client import Client
from flow_orchestrator.runtime._context import NodeContext
from flow_orchestrator.runtime._retry import RetryPolicy
from flow_orchestrator.runtime._status import RunStatus
from flow_orchestrator.runtime._view import make_console, render_graph_text, watch_run
from flow_orchestrator.runtime._workflow import Workflow

DEMO_PREFIX = "demo"
FLAKY_ATTEMPTS = 2
WORKER_READY_TIMEOUT = 30.0
WORKER_STOP_TIMEOUT = 30.0
RUN_TIMEOUT = 60.0
CONNECT_TIMEOUT = 10.0
# The worker process must import this very package, even from a source checkout that is not installed.
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


class OrderIn(BaseModel):
    order_id: str
    amount: float = Field(gt=0, allow_inf_nan=False)
    items: list[str]


order = Workflow("order", input_model=OrderIn)


@order.node()
async def validate(ctx: NodeContext) -> dict[str, Any]:
    request: OrderIn = ctx.input
    await asyncio.sleep(0.15)
    await ctx.data.set("order", request.model_dump())
    return {"order_id": request.order_id, "total": round(request.amount, 2), "lines": len(request.items)}


@order.node(depends_on=[validate])
def reserve_stock(ctx: NodeContext) -> dict[str, Any]:
    # A plain function on purpose: the worker runs it in its thread pool, so blocking here is fine.
    time.sleep(0.25)
    return {"reserved": ctx.output("validate")["lines"], "warehouse": "ams-1"}


@order.node(depends_on=[validate], retry=RetryPolicy(max_attempts=4, initial=0.3, backoff=2.0, jitter=0.1))
async def charge_payment(ctx: NodeContext) -> dict[str, Any]:
    await asyncio.sleep(0.1)
    # Keyed on the attempt number rather than a counter, so the flakiness is the same on any worker.
    if ctx.attempt <= FLAKY_ATTEMPTS:
        raise RuntimeError("payment gateway timeout (simulated)")
    charge = {"charge_id": f"ch-{ctx.idempotency_key}", "amount": ctx.output("validate")["total"]}
    await ctx.data.set("payment", charge)
    return charge


@order.node(depends_on=[reserve_stock, charge_payment])
async def ship(ctx: NodeContext) -> dict[str, Any]:
    placed = await ctx.data.get_dict("order")
    await asyncio.sleep(0.2)
    tracking = f"TRK-{placed['order_id']}-{ctx.output('reserve_stock')['warehouse']}"
    await ctx.data.set("tracking", tracking)
    return {"tracking": tracking, "charge_id": ctx.output("charge_payment")["charge_id"]}


@order.node(depends_on=[ship])
async def notify(ctx: NodeContext) -> dict[str, Any]:
    tracking = await ctx.data.get_str("tracking")
    payment = await ctx.data.get_dict("payment")
    await asyncio.sleep(0.05)
    return {
        "message": f"order {ctx.input.order_id} charged {payment['amount']:.2f} and shipped ({tracking})",
        "tracking": tracking,
    }


demo_workflows = [order]
DEMO_INPUT = {"order_id": "A-1001", "amount": 42.5, "items": ["keyboard", "mouse", "usb-cable"]}


async def run_demo(nats_url: str | None, *, prefix: str = DEMO_PREFIX, console: Console | None = None) -> int:
    """Run one order end to end; returns the exit code (0 when the run completed).

    Without ``nats_url`` it starts an embedded server with a throw-away store. The worker is a separate
    process (``flowctl worker``), stopped by its PID with SIGTERM so it drains like in production.
    """
    console = console or make_console()
    server: EmbeddedServer | None = None
    worker: asyncio.subprocess.Process | None = None
    worker_log = Path(tempfile.mkstemp(prefix="flow-demo-worker-", suffix=".log")[1])
    with _sigterm_cancels() as terminated:
        try:
            if nats_url is None:
                server = EmbeddedServer()
                nats_url = await asyncio.to_thread(server.start)
                console.print(f"started an embedded nats-server at {nats_url} (pid {server.pid})")
            async with await connect_client(nats_url, prefix) as client:
                worker = await _start_worker(nats_url, prefix, worker_log)
                console.print(f"started a worker process (pid {worker.pid}) hosting workflow {order.name!r}")
                console.print(Text(render_graph_text(order.definition)))
                await _wait_until_registered(client, worker, worker_log)
                handle = await client.start(order, DEMO_INPUT)
                console.print(Text(f"started run {handle.run_id} with input {json.dumps(DEMO_INPUT)}"))
                try:
                    async with asyncio.timeout(RUN_TIMEOUT):
                        snapshot = await watch_run(client, handle, console)
                except TimeoutError:
                    raise DemoError(f"run {handle.run_id} did not finish within {RUN_TIMEOUT:g}s") from None
        except DemoError as exc:
            console.print(Text(f"demo failed: {exc}", style="bold red"))
            if worker is not None:
                console.print(Text(f"last lines of the worker's log:\n{_tail(worker_log)}"))
            return 1
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not terminated() or task is None:
                raise
            task.uncancel()  # handled: the cleanup below must run uncancelled
            console.print("demo stopped by SIGTERM")
            return 128 + signal.SIGTERM
        finally:
            if worker is not None:
                code = await _stop_worker(worker)
                console.print(f"worker {worker.pid} drained and exited with code {code}")
            if server is not None:
                await asyncio.to_thread(server.stop)
            await asyncio.to_thread(worker_log.unlink, missing_ok=True)
    if snapshot.status is not RunStatus.COMPLETED:
        return 1
    attempts = snapshot.nodes["charge_payment"].attempts
    console.print(
        f"run {snapshot.run_id} completed; charge_payment took {attempts} attempts "
        f"({FLAKY_ATTEMPTS} simulated gateway timeouts, then success)"
    )
    return 0


@contextlib.contextmanager
def _sigterm_cancels() -> Iterator[Callable[[], bool]]:
    """Make SIGTERM cancel the demo as Ctrl-C does, so its cleanup still stops the worker and the server
    (SIGTERM's default would end this process at once and leave both running). Yields "was it SIGTERM?"."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    received = False

    def on_sigterm() -> None:
        nonlocal received
        received = True
        if task is not None:
            task.cancel()

    try:
        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    except (NotImplementedError, RuntimeError):  # no signal handlers here (Windows, a non-main thread)
        yield lambda: False
        return
    try:
        yield lambda: received
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


class DemoError(RuntimeError):
    """The demo could not run: no server, its worker died or never became ready, or the run hung."""


async def connect_client(nats_url: str, prefix: str) -> Client:
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            return await Client.connect(nats_url, prefix=prefix)
    except TimeoutError:
        raise DemoError(f"no answer from NATS at {nats_url} within {CONNECT_TIMEOUT:g}s") from None


async def _start_worker(nats_url: str, prefix: str, log_path: Path) -> asyncio.subprocess.Process:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
    with log_path.open("wb") as log:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "flow_orchestrator.runtime._cli",
            "worker",
            "flow_orchestrator.examples:order",  # what deploy/ runs, so `make demo` exercises it too
            "--nats",
            nats_url,
            "--prefix",
            prefix,
            "--log-level",
            "INFO",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
        )


async def _wait_until_registered(client: Client, worker: asyncio.subprocess.Process, log_path: Path) -> None:
    """Wait for the worker's registration, failing fast (with its log) if the worker dies first."""
    deadline = time.monotonic() + WORKER_READY_TIMEOUT
    while time.monotonic() < deadline:
        if worker.returncode is not None:
            raise DemoError(f"the demo worker exited with code {worker.returncode}:\n{_tail(log_path)}")
        # The worker logs "hosting" once its actors listen (the CLI runs it at INFO for this).
        if b"hosting" in await asyncio.to_thread(log_path.read_bytes):
            await client.describe(order.name)
            return
        await asyncio.sleep(0.05)
    raise DemoError(f"the demo worker was not ready within {WORKER_READY_TIMEOUT}s:\n{_tail(log_path)}")


async def _stop_worker(worker: asyncio.subprocess.Process) -> int:
    if worker.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(worker.wait(), WORKER_STOP_TIMEOUT)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGKILL)
            await worker.wait()
    return int(worker.returncode or 0)


def _tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
