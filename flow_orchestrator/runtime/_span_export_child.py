"""The span export process: ``python -m flow_orchestrator.runtime._span_export_child --ack-fd N
EXPORTER...``, started by :class:`~flow_orchestrator.runtime._span_export.ExportProcessSpanProcessor`
(no package module imports this one, so ``-m`` runs it cleanly)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

import msgpack
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import SpanExporter

from flow_orchestrator.runtime._span_export import FLUSH, rebuild
from flow_orchestrator.runtime._telemetry import span_exporter

log = logging.getLogger("flow_orchestrator.telemetry")
NICENESS = 10


class _Partial:
    """A binary stream whose ``read(n)`` returns what has arrived (up to ``n`` bytes) instead of
    waiting for all ``n``: the unpacker must see each frame as soon as the worker writes it."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def read(self, size: int) -> bytes:
        return self._stream.read1(size)  # type: ignore[no-any-return]


def serve(exporters: Sequence[SpanExporter], ack_fd: int, stream: Any) -> None:
    """Export every frame read from ``stream`` until it ends; answer flush frames on ``ack_fd``."""
    unpacker = msgpack.Unpacker(_Partial(stream), raw=False, max_buffer_size=256 * 1024 * 1024)
    resource: Resource | None = None
    for frame in unpacker:
        if resource is None:
            attributes, schema_url = frame
            resource = Resource(attributes, schema_url)
        elif frame == FLUSH:
            for exporter in exporters:
                exporter.force_flush()
            os.write(ack_fd, b".")
        else:
            try:
                spans = [rebuild(values, resource) for values in frame]
            except Exception:  # a frame we cannot read costs its spans, not the process
                log.exception("span export: dropped a batch of %d spans it could not read", len(frame))
                continue
            for exporter in exporters:
                try:
                    exporter.export(spans)
                except Exception:  # an exporter's failure must not stop the others or the stream
                    log.exception("span exporter %s failed", type(exporter).__name__)
    for exporter in exporters:
        exporter.shutdown()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flow_orchestrator.runtime._span_export_child")
    parser.add_argument("--ack-fd", type=int, required=True)
    parser.add_argument("exporters", nargs="+", choices=("otlp", "console"))
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker decides when we stop: it closes the pipe
    # Exporting is batch work nobody waits on: on a busy machine the worker's steps go first.
    with contextlib.suppress(OSError):
        os.nice(NICENESS)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve([span_exporter(name) for name in args.exporters], args.ack_fd, sys.stdin.buffer)


if __name__ == "__main__":
    main()
