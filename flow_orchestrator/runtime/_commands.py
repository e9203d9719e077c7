"""What each ``flowctl`` command does, given its parsed arguments; ``_cli`` parses and sets exit codes.

Commands return their exit code; typed errors (``FlowError``) propagate for the CLI to print.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import signal
import sys
import threading
from typing import Any

from rich.console import Console

from flow_orchestrator._errors import FlowError, RunNotFound
from flow_orchestrator.bus._connection import DEFAULT_URL
from flow_orchestrator.bus._server import EmbeddedServer
from flow_orchestrator.bus._streams import StorageSettings
from flow_orchestrator.runtime._client import Client, RunSnapshot
from flow_orchestrator.runtime._interceptors import LoggingInterceptor
from flow_orchestrator.runtime._status import RunStatus
from flow_orchestrator.runtime._telemetry import configure_telemetry
from flow_orchestrator.runtime._timeline import build_timeline, render_timeline
from flow_orchestrator.runtime._view import (
    make_console,
    render_graph_mermaid,
    render_graph_text,
    render_result,
    render_runs,
    render_snapshot,
    watch_run,
)
from flow_orchestrator.runtime._worker import Worker
from flow_orchestrator.runtime._workflow import Workflow

CONNECT_TIMEOUT = 10.0


class UsageError(FlowError):
    """The command line asks for something impossible (bad MODULE:ATTR, bad JSON, unreachable server)."""


def load_workflows(target: str) -> list[Workflow]:
    """Import ``MODULE:ATTR`` (a Workflow, or a list/tuple of them) with the current directory on the path."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise UsageError(f"expected MODULE:ATTR (for example myapp.flows:order), got {target!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        found: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise UsageError(f"cannot import module {module_name!r}: {exc}") from exc
    for part in attr.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise UsageError(f"module {module_name!r} has no attribute {attr!r}") from None
    items = [found] if isinstance(found, Workflow) else found
    if not isinstance(items, list | tuple) or not items or not all(isinstance(w, Workflow) for w in items):
        raise UsageError(f"{target} is {found!r:.80}, not a Workflow or a list of Workflows")
    for workflow in items:
        _ = workflow.definition  # validate now: a broken DAG is a usage error, not a crash later
    return list(items)


def positive_int(text: str) -> int:
    """A count option (``argparse`` type): a whole number, 1 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {text!r}")
    return value


def seconds(text: str, *, zero: bool = True) -> float:
    """A duration option (``argparse`` type): a number of seconds, 0 or more (finite)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (0 <= value < float("inf")) or (value == 0 and not zero):  # also refuses nan
        expected = "0 or more" if zero else "more than 0"
        raise argparse.ArgumentTypeError(f"must be {expected} seconds, got {text!r}")
    return value


def positive_seconds(text: str) -> float:
    """A duration option that must be more than 0 seconds."""
    return seconds(text, zero=False)


def _parse_input(text: str | None) -> Any:
    if text is None:
        return None
    try:
        if text.startswith("@"):
            with open(text[1:], encoding="utf-8") as source:
                return json.load(source)
        return json.loads(text)
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON, or a 5,000-digit number
        raise UsageError(f"--input must be JSON or @FILE holding JSON: {exc}") from exc


def _nats_url(args: argparse.Namespace) -> str:
    return str(args.nats or os.environ.get("NATS_URL") or DEFAULT_URL)


def _replicas(args: argparse.Namespace) -> int:
    if args.replicas is not None:
        return int(args.replicas)
    raw = os.environ.get("FLOW_REPLICAS", "1")
    try:
        return int(raw)
    except ValueError:
        raise UsageError(f"FLOW_REPLICAS must be a number of replicas, got {raw!r}") from None


async def connect_client(args: argparse.Namespace) -> Client:
    url = _nats_url(args)
    storage = StorageSettings(replicas=_replicas(args))
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            return await Client.connect(url, prefix=args.prefix, storage=storage)
    except TimeoutError:
        raise UsageError(
            f"cannot reach NATS at {url} within {CONNECT_TIMEOUT:g}s; start one with `flowctl server` "
            "or pass --nats / set NATS_URL"
        ) from None


def _print_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, default=str) + "\n")
    sys.stdout.flush()


# --- commands ------------------------------------------------------------------------------------
def server(args: argparse.Namespace) -> int:
    """Foreground server: the signal handlers only set an event, so the ``with`` block always stops
    the nats-server child it started (by PID), whichever signal arrives."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with EmbeddedServer(host=args.host, port=args.port, store_dir=args.store_dir) as embedded:
            where = f"pid {embedded.pid}, JetStream store {embedded.store_dir}"
            print(f"nats-server ({where}) listening on {embedded.url}", flush=True)
            print("press Ctrl-C to stop", flush=True)
            while not stop.wait(0.5):
                pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


async def worker(args: argparse.Namespace) -> int:
    # Tracing and metrics are off unless OTEL_* variables (or --metrics-port) turn them on.
    telemetry = configure_telemetry("flow-worker", metrics_port=args.metrics_port)
    host = Worker(
        load_workflows(args.target),
        nats_url=_nats_url(args),
        prefix=args.prefix,
        storage=StorageSettings(replicas=_replicas(args)),
        concurrency=args.concurrency,
        max_in_flight=args.max_in_flight,
        ack_wait=args.ack_wait,
        max_deliver=args.max_deliver,
        announce_starts_after=args.announce_starts_after,
        # One compact log line per attempt outcome (at INFO, the worker's default level), with the
        # run's fields and trace id on it; tracing and metrics when OTEL_* turns them on.
        interceptors=[LoggingInterceptor(), *(telemetry.interceptors if telemetry else ())],
    )
    try:
        await host.run()  # until SIGINT/SIGTERM, then it drains
    finally:
        if telemetry is not None:
            await asyncio.to_thread(telemetry.shutdown)
    return 0


async def run(args: argparse.Namespace) -> int:
    payload = _parse_input(args.input)
    console = make_console()
    async with await connect_client(args) as client:
        handle = await client.start(args.workflow, payload, run_id=args.run_id)
        try:
            # A rejected trigger (invalid payload...) raises its typed error from either wait.
            async with asyncio.timeout(args.timeout):
                if args.json:
                    await handle.wait()
                    snapshot: RunSnapshot = await handle.status()
                else:
                    snapshot = await watch_run(client, handle, console)
        except TimeoutError:
            print(f"flowctl: run {handle.run_id} did not finish within {args.timeout}s", file=sys.stderr)
            await _show_unfinished(client, handle.run_id, as_json=args.json, console=console)
            return 1
    if args.json:
        _print_json(snapshot.to_json())
    return 0 if snapshot.status is RunStatus.COMPLETED else 1


async def _show_unfinished(client: Client, run_id: str, *, as_json: bool, console: Console) -> None:
    try:
        snapshot = await client.snapshot(run_id)
    except RunNotFound:
        print(
            f"flowctl: no worker accepted run {run_id} yet (is one running with this --prefix?)",
            file=sys.stderr,
        )
        if as_json:
            _print_json(None)
        return
    if as_json:
        _print_json(snapshot.to_json())
    else:
        console.print(render_snapshot(snapshot))


async def trigger(args: argparse.Namespace) -> int:
    payload = _parse_input(args.input)
    async with await connect_client(args) as client:
        handle = await client.start(args.workflow, payload, run_id=args.run_id)
    print(handle.run_id)
    return 0


async def status(args: argparse.Namespace) -> int:
    async with await connect_client(args) as client:
        snapshot = await client.snapshot(args.run_id)
    if args.json:
        _print_json(snapshot.to_json())
    else:
        console = make_console()
        console.print(render_snapshot(snapshot))
        if snapshot.status is not RunStatus.RUNNING:
            console.print(render_result(snapshot))
    return 0


async def watch(args: argparse.Namespace) -> int:
    """Follow a run live until it ends; exit 0 if it completed, 1 otherwise (or on --timeout)."""
    console = make_console()
    async with await connect_client(args) as client:
        handle = await client.handle_for(args.run_id)
        try:
            async with asyncio.timeout(args.timeout):
                snapshot = await watch_run(client, handle, console)
        except TimeoutError:
            print(f"flowctl: run {handle.run_id} did not finish within {args.timeout}s", file=sys.stderr)
            return 1
    return 0 if snapshot.status is RunStatus.COMPLETED else 1


async def show(args: argparse.Namespace) -> int:
    """A run's timeline: one row per node attempt on the run's time axis, its status and trace id."""
    async with await connect_client(args) as client:
        handle = await client.handle_for(args.run_id)
        # Read after the record, so a run that just ended shows every attempt the record counts.
        record = await client._run_record(handle.run_id) or {}
        events = await client.journal(handle.run_id, handle.workflow)
        order = (await client.describe(handle.workflow))["order"]
    timeline = build_timeline(handle.run_id, record, events, order)
    if args.json:
        _print_json(timeline.to_json())
    else:
        make_console().print(render_timeline(timeline))
    return 0


async def runs(args: argparse.Namespace) -> int:
    async with await connect_client(args) as client:
        found = await client.list_runs(workflow=args.workflow, status=args.status, limit=args.limit)
    if args.json:
        keys = ("run_id", "workflow", "status", "created_at", "finished_at", "error")
        _print_json([{key: item.get(key) for key in keys} for item in found])
    else:
        make_console().print(render_runs(found))
    return 0


async def cancel(args: argparse.Namespace) -> int:
    async with await connect_client(args) as client:
        snapshot = await client.snapshot(args.run_id)
        if snapshot.status is not RunStatus.RUNNING:
            print(
                f"flowctl: run {args.run_id} already {snapshot.status.value}; nothing to cancel",
                file=sys.stderr,
            )
            return 1
        await client.get_handle(args.run_id, snapshot.workflow).cancel(args.reason)
    print(f"cancellation of run {args.run_id} ({snapshot.workflow}) requested")
    return 0


def graph(args: argparse.Namespace) -> int:
    blocks: list[str] = []
    for workflow in load_workflows(args.target):
        if args.format in ("text", "both"):
            blocks.append(render_graph_text(workflow.definition))
        if args.format in ("mermaid", "both"):
            blocks.append(render_graph_mermaid(workflow.definition))
    print("\n\n".join(blocks))
    return 0


async def demo(args: argparse.Namespace) -> int:
    from flow_orchestrator.runtime._demo import run_demo  # noqa: PLC0415 - only the demo needs its workflow

    # Only an explicit --nats: the demo must work anywhere, whatever NATS_URL points at.
    return await run_demo(args.nats, prefix=args.prefix if args.prefix_given else "demo")
