"""An OTLP/HTTP trace receiver for tests: it decodes each export with opentelemetry-proto, as Jaeger
would receive it, and keeps every span with its resource."""

from __future__ import annotations

import gzip
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


class Receiver(ThreadingHTTPServer):
    """Accepts OTLP/HTTP trace exports on 127.0.0.1 and keeps every span with its resource.

    ``refusals`` are answered first, one per request, as (status, headers), without decoding;
    ``requests`` records each request's path, headers and decoded request."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), OtlpHandler)
        self.spans: list[dict[str, Any]] = []
        self.refusals: list[tuple[int, dict[str, str]]] = []
        self.requests: list[tuple[str, dict[str, str], ExportTraceServiceRequest | None]] = []
        self.lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class OtlpHandler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with self.server.lock:
            refusal = self.server.refusals.pop(0) if self.server.refusals else None
        if self.path != "/v1/traces" or refusal is not None:
            self.server.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}, None))
            status, headers = refusal or (404, {})
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        encoding = self.headers.get("Content-Encoding")
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        request = ExportTraceServiceRequest.FromString(body)
        self.server.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}, request))
        found = []
        for resource_spans in request.resource_spans:
            resource = {kv.key: value_of(kv.value) for kv in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    found.append(
                        {
                            "name": span.name,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent": span.parent_span_id.hex(),
                            "status": span.status.code,
                            "events": [event.name for event in span.events],
                            "kind": span.kind,
                            "links": [(link.trace_id.hex(), link.span_id.hex()) for link in span.links],
                            "scope": scope_spans.scope.name,
                            "status_message": span.status.message,
                            "attributes": {kv.key: value_of(kv.value) for kv in span.attributes},
                            "resource": resource,
                        }
                    )
        with self.server.lock:
            self.server.spans.extend(found)
        reply = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def value_of(value: Any) -> Any:
    return getattr(value, value.WhichOneof("value")) if value.WhichOneof("value") else None
