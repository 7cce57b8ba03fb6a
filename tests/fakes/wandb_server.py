"""A FAKE Weights & Biases backend for tests and local trials. It stands in for the W&B servers
(api.wandb.ai), a boundary we cannot reach offline; it is not W&B: it keeps everything in memory,
accepts any API key (or, with ``refuse_keys=True``, none: every GraphQL request gets HTTP 401),
and checks only the shapes the real client relies on.

It answers enough of the protocol for the real client (Python SDK + bundled ``wandb-core``,
observed with wandb 0.31.0), pointed at it through ``WANDB_BASE_URL``, to run
``init -> log -> finish`` online, to continue a run by id (``init(id=..., resume="allow")``), and
to log, resolve and download artifacts (tests/fakes/wandb_artifacts.py documents those operations):

- ``POST /graphql``: ``Viewer`` / ``GetDefaultEntity`` (entity ``fake-entity``),
  ``ServerFeaturesQuery`` (no optional features), ``RunResumeStatus``, ``UpsertBucket``,
  ``CreateRunFiles`` (upload URLs point back here), and the artifact operations. Other operations
  (e.g. ``OrganizationCoreWeaveOrganizationID``) get ``{"<field>": null}``: an empty ``data``
  crashes wandb-core.
- ``PUT /upload/<run>/<file>``: run files (metadata, config.yaml, output.log, ...), names recorded.
- ``POST /files/<entity>/<project>/<run>/file_stream``: history lines, summary, exit code.
- ``PUT``/``GET /artifact-files/<artifact id>/<path>`` and ``/artifact-manifests/<artifact id>``:
  artifact uploads and downloads.
- ``GET /_fake/artifacts`` (JSON: every collection, its versions, aliases and files with their
  SHA-256) and ``POST /_fake/corrupt`` with ``{"artifact": "E/P/NAME:ALIAS", "path": "FILE"}``:
  the fake's own controls, for trials from another process; not W&B routes.
- Anything else (the client's ``/sdk/otel/v1/metrics`` telemetry) gets a 404, which it tolerates.

Resume, as wandb-core decides it: the run counts as existing only when ``RunResumeStatus`` returns a
bucket whose ``wandbConfig`` is JSON containing the key ``"t"`` (the client sends ``_wandb.t`` in the
config of its first upsert); the resumed run then starts at the last ``historyTail`` row's
``_step`` + 1 and appends history at offset ``historyLineCount``.

Recorded per run name, in ``FakeWandb.runs[name]`` (a ``FakeRun``): ``upserts``, ``resume_queries``
and ``resumed_as_existing`` (how many ``RunResumeStatus`` answers said the run exists), ``config``,
``history`` (rows from file_stream, each chunk placed at its ``offset`` as the backend does),
``history_offsets`` (the offset of each history chunk), ``summary``, ``exit_codes``, ``files``.
Artifacts are in ``FakeWandb.artifacts`` (a ``FakeArtifacts``). ``FakeWandb.requests`` logs
(method, path, GraphQL operation) for every request and ``FakeWandb.errors`` any exception the fake
raised while answering (the client then got a 500).

On its own, for manual trials: ``python -m tests.fakes.wandb_server --port 8765`` serves until
stopped and prints the ``WANDB_BASE_URL`` and ``WANDB_API_KEY`` to export (docs/wandb-local.md).
"""

from __future__ import annotations

import json
import re
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

from tests.fakes.wandb_artifacts import ARTIFACT_OPERATIONS, FakeArtifacts

ENTITY = "fake-entity"
API_KEY = "0123456789abcdef" * 2 + "01234567"  # any 40 characters: the fake accepts every key


@dataclass
class FakeRun:
    name: str
    project: str = ""
    entity: str = ENTITY
    upserts: int = 0
    resume_queries: int = 0
    resumed_as_existing: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    history_offsets: list[int] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    exit_codes: list[int | None] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    @property
    def started(self) -> bool:
        return "t" in self.config.get("_wandb", {}).get("value", {})

    def bucket(self) -> dict[str, Any]:
        return {
            "id": f"bucket-{self.name}", "name": self.name, "displayName": self.name, "description": None,
            "sweepName": None, "tags": [], "runInfo": {"args": []} if self.started else None,
            "project": {"id": f"project-{self.project}", "name": self.project,
                        "entity": {"id": f"entity-{self.entity}", "name": self.entity}},
            "config": json.dumps(self.config),
            "wandbConfig": json.dumps({"t": self.config["_wandb"]["value"]["t"]} if self.started else {}),
            "summaryMetrics": json.dumps(self.summary),
            "historyLineCount": len(self.history), "logLineCount": 0, "eventsLineCount": 0,
            "historyTail": json.dumps([json.dumps(row) for row in self.history[-1:]]), "eventsTail": "[]",
        }


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # clients drop keep-alive sockets on exit
            super().handle_error(request, client_address)


class FakeWandb:
    """``with FakeWandb() as fake:`` serves on ``fake.url`` (127.0.0.1, a free port unless ``port``
    is given) from a thread."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1", refuse_keys: bool = False) -> None:
        self.refuse_keys = refuse_keys  # answer every GraphQL request 401, as W&B does for a bad key
        self.runs: dict[str, FakeRun] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.server = _Server((host, port), _handler(self))
        self.url = f"http://{host}:{self.server.server_address[1]}"
        self.artifacts = FakeArtifacts(self.url)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeWandb":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def operations(self) -> list[str]:
        return [op for _, _, op in self.requests if op]

    def _run(self, name: str, project: str | None = None, entity: str | None = None) -> FakeRun:
        run = self.runs.setdefault(name, FakeRun(name))
        run.project, run.entity = project or run.project, entity or run.entity
        return run

    def graphql(self, op: str, query: str, v: dict[str, Any]) -> dict[str, Any]:
        if op in ("Viewer", "GetDefaultEntity"):
            return {"viewer": {"id": "viewer", "entity": ENTITY, "username": "fake-user", "email": None,
                               "admin": False, "flags": "{}", "teams": {"edges": []}}}
        if op == "ServerFeaturesQuery":
            return {"serverInfo": {"features": []}}
        if op == "RunResumeStatus":
            run = self.runs.get(v["name"])
            if run is not None:
                run.resume_queries += 1
                run.resumed_as_existing += run.started
            return {"model": {"id": "project", "name": v.get("project"),
                              "entity": {"id": "entity", "name": v.get("entity") or ENTITY},
                              "bucket": run.bucket() if run is not None else None}}
        if op == "UpsertBucket":
            run = self._run(v["name"], v.get("project"), v.get("entity"))
            run.upserts += 1
            run.config.update(json.loads(v.get("config") or "{}"))
            return {"upsertBucket": {"bucket": run.bucket(), "inserted": run.upserts == 1}}
        if op in ARTIFACT_OPERATIONS:
            return self.artifacts.graphql(op, v)
        if op == "CreateRunFiles":
            run = self._run(v["run"], v.get("project"), v.get("entity"))
            files = [{"name": name, "uploadUrl": f"{self.url}/upload/{run.name}/{name}"} for name in v["files"]]
            return {"createRunFiles": {"runID": f"bucket-{run.name}", "uploadHeaders": [], "files": files}}
        match = re.search(r"{\s*(\w+)", query)  # the operation's top-level field, answered with null
        return {match.group(1) if match else op: None}

    def file_stream(self, run_name: str, body: dict[str, Any]) -> None:
        run, files = self._run(run_name), body.get("files") or {}
        chunk = files.get("wandb-history.jsonl")
        if chunk:  # like the backend, lines land at the client's offset (it starts at historyLineCount)
            offset, lines = chunk.get("offset", 0), [json.loads(line) for line in chunk.get("content", [])]
            run.history_offsets.append(offset)
            run.history[offset:offset + len(lines)] = lines
        for line in files.get("wandb-summary.json", {}).get("content", []):
            run.summary = json.loads(line)
        if body.get("complete"):
            run.exit_codes.append(body.get("exitcode"))


def _handler(fake: FakeWandb):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def reply(self, status: int, payload: Any) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def reply_bytes(self, status: int, data: bytes, content_type: str = "application/octet-stream") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def control(self, method: str, parts: list[str], body: bytes) -> None:
            """The fake's own routes (not W&B's): inspect artifacts, corrupt a file."""
            if method == "GET" and parts == ["_fake", "artifacts"]:
                return self.reply(200, fake.artifacts.describe())
            if method == "POST" and parts == ["_fake", "corrupt"]:
                request = json.loads(body or b"{}")
                entity, _, rest = str(request.get("artifact", "")).partition("/")
                project, _, name = rest.partition("/")
                try:
                    version = fake.artifacts.corrupt(entity, project, name, str(request.get("path")))
                except (KeyError, ValueError) as error:
                    return self.reply(404, {"error": str(error)})
                return self.reply(200, {"corrupted": f"{entity}/{project}/{version.collection}:"
                                                     f"{version.version}/{request.get('path')}"})
            return self.reply(404, {"error": f"fake W&B: no control route {method} {self.path}"})

        def artifact_route(self, method: str, parts: list[str], body: bytes) -> bool:
            """Artifact uploads (PUT) and downloads (GET); False when the path is not one."""
            artifacts = fake.artifacts
            if len(parts) >= 3 and parts[0] == "artifact-files":
                artifact_id, name = unquote(parts[1]), unquote("/".join(parts[2:]))
                if method == "PUT":
                    status, why = artifacts.put_file(artifact_id, name, body)
                    self.reply(status, {"error": why} if why else {})
                    return True
                data = artifacts.get_file(artifact_id, name)
            elif len(parts) == 2 and parts[0] == "artifact-manifests":
                if method == "PUT":
                    status, why = artifacts.put_manifest(unquote(parts[1]), body)
                    self.reply(status, {"error": why} if why else {})
                    return True
                data = artifacts.get_manifest(unquote(parts[1]))
            else:
                return False
            if data is None:
                self.reply(404, {"error": f"fake W&B: nothing at {self.path}"})
            else:
                self.reply_bytes(200, data)
            return True

        def answer(self, method: str) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            parts = self.path.split("?")[0].strip("/").split("/")
            try:
                with fake.lock:
                    if method == "POST" and parts == ["graphql"] and fake.refuse_keys:
                        fake.requests.append((method, self.path, None))
                        return self.reply(401, {"errors": [{"message": "user is not logged in"}]})
                    if method == "POST" and parts == ["graphql"]:
                        request = json.loads(body)
                        query = request.get("query") or ""
                        named = re.search(r"(?:query|mutation)\s+(\w+)", query)
                        op = request.get("operationName") or (named.group(1) if named else "?")
                        fake.requests.append((method, self.path, op))
                        return self.reply(200, {"data": fake.graphql(op, query, request.get("variables") or {})})
                    fake.requests.append((method, self.path, None))
                    if method == "POST" and len(parts) == 5 and parts[0] == "files" and parts[4] == "file_stream":
                        fake.file_stream(parts[3], json.loads(body))
                        return self.reply(200, {"exitcode": None, "limits": {}})
                    if parts[:1] == ["_fake"]:
                        return self.control(method, parts, body)
                    if self.artifact_route(method, parts, body):
                        return None
                    if method == "PUT" and len(parts) >= 3 and parts[0] == "upload":
                        fake._run(parts[1]).files.append("/".join(parts[2:]))
                        return self.reply(200, {})
                self.reply(404, {"error": f"fake W&B: no route for {method} {self.path}"})
            except Exception as error:  # surfaced through fake.errors; the client sees a 500 and retries
                fake.errors.append(f"{method} {self.path}: {error!r}")
                self.reply(500, {"error": repr(error)})

        def do_POST(self) -> None:
            self.answer("POST")

        def do_PUT(self) -> None:
            self.answer("PUT")

        def do_GET(self) -> None:
            self.answer("GET")

    return Handler


def main(argv: list[str] | None = None) -> int:
    import argparse
    import signal

    parser = argparse.ArgumentParser(
        prog="python -m tests.fakes.wandb_server",
        description="Serve the FAKE W&B backend until stopped (Ctrl-C or SIGTERM), for trying the W&B "
                    "flow of dylora locally; see docs/wandb-local.md. Not W&B: state is kept in memory.")
    parser.add_argument("--port", type=int, default=0, help="TCP port (default: a free one)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    args = parser.parse_args(argv)
    fake = FakeWandb(port=args.port, host=args.host)
    fake.artifacts.log = lambda line: print(line, flush=True)
    print(f"export WANDB_BASE_URL={fake.url}", flush=True)
    print(f"export WANDB_API_KEY={API_KEY}", flush=True)
    print(f"# entity: {ENTITY}; fake W&B serving until stopped (Ctrl-C)", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        fake.server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        fake.server.server_close()
    for error in fake.errors:
        print(f"fake W&B error: {error}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
