"""A local HTTP server speaking the few Kubernetes API endpoints `codi2 provision` uses, recording every
request: server-side apply (PATCH, application/apply-patch+yaml), GET of the pod, DELETE. No real API
server can run on the machines this project is built on. Test-only."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    content_type: str | None


@dataclass
class FakeKube:
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    changes: int = 0
    pod_gets_before_ready: int = 2
    _version: int = 0
    _pod_gets: int = 0

    def handle(self, method: str, raw_path: str, body: bytes, content_type: str | None) -> tuple[int, dict]:
        url = urlparse(raw_path)
        self.requests.append(Request(method, url.path, parse_qs(url.query), content_type))
        if method == "PATCH":
            applied = json.loads(body)
            stored = self.objects.get(url.path)
            if stored is None or stored["applied"] != applied:
                self.changes += 1
                self._version += 1
                self.objects[url.path] = {"applied": applied, "version": str(self._version)}
            return 200, self._view(url.path)
        if url.path not in self.objects:
            return 404, {
                "kind": "Status",
                "apiVersion": "v1",
                "status": "Failure",
                "reason": "NotFound",
                "code": 404,
                "message": f"{url.path} not found",
                "metadata": {},
            }
        if method == "DELETE":
            del self.objects[url.path]
            return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}}
        if url.path.endswith("/pods/workspace"):
            self._pod_gets += 1
        return 200, self._view(url.path)

    def _view(self, path: str) -> dict[str, Any]:
        stored = self.objects[path]
        obj = json.loads(json.dumps(stored["applied"]))
        obj["metadata"]["resourceVersion"] = stored["version"]
        obj["metadata"]["uid"] = f"uid-{abs(hash(path)) % 10**8}"
        if obj["kind"] == "Pod":
            ready = self._pod_gets > self.pod_gets_before_ready
            obj["status"] = {
                "phase": "Running" if ready else "Pending",
                "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            }
        return obj


class FakeKubeServer:
    def __init__(self) -> None:
        self.kube = FakeKube()
        kube = self.kube

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                status, payload = kube.handle(
                    self.command, self.path, self.rfile.read(length), self.headers.get("Content-Type")
                )
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PATCH = do_DELETE = _serve

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FakeKubeServer:
        self._thread.start()
        return self

    def __exit__(self, *args: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def config(self) -> dict[str, Any]:
        """A kubeconfig pointing at this server."""
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": "test-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
            "current-context": "fake",
        }

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(json.dumps(self.config()))
        return path
