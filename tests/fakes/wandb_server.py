"""A FAKE Weights & Biases backend for tests. It stands in for the W&B servers (api.wandb.ai), a
boundary we cannot reach offline; it is not W&B and checks nothing W&B would check (auth, schema).

It answers just enough of the protocol for the real client (Python SDK + bundled ``wandb-core``,
observed with wandb 0.31.0), pointed at it through ``WANDB_BASE_URL``, to run
``init -> log -> finish`` online and to continue a run by id (``init(id=..., resume="allow")``):

- ``POST /graphql``: ``Viewer``, ``ServerFeaturesQuery``, ``RunResumeStatus``, ``UpsertBucket``,
  ``CreateRunFiles`` (upload URLs point back here). Other operations (e.g.
  ``OrganizationCoreWeaveOrganizationID``) get ``{"<field>": null}``: an empty ``data`` crashes
  wandb-core.
- ``PUT /upload/<run>/<file>``: run files (metadata, config.yaml, output.log, ...), names recorded.
- ``POST /files/<entity>/<project>/<run>/file_stream``: history lines, summary, exit code.
- Anything else (the client's ``/sdk/otel/v1/metrics`` telemetry) gets a 404, which it tolerates.

Resume, as wandb-core decides it: the run counts as existing only when ``RunResumeStatus`` returns a
bucket whose ``wandbConfig`` is JSON containing the key ``"t"`` (the client sends ``_wandb.t`` in the
config of its first upsert); the resumed run then starts at the last ``historyTail`` row's
``_step`` + 1 and appends history at offset ``historyLineCount``.

Recorded per run name, in ``FakeWandb.runs[name]`` (a ``FakeRun``): ``upserts``, ``resume_queries``
and ``resumed_as_existing`` (how many ``RunResumeStatus`` answers said the run exists), ``config``,
``history`` (rows from file_stream, each chunk placed at its ``offset`` as the backend does),
``history_offsets`` (the offset of each history chunk), ``summary``, ``exit_codes``, ``files``.
``FakeWandb.requests`` logs (method, path, GraphQL operation) for every request and
``FakeWandb.errors`` any exception the fake raised while answering (the client then got a 500).
"""

from __future__ import annotations

import json
import re
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ENTITY = "fake-entity"


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
    """``with FakeWandb() as fake:`` serves on ``fake.url`` (127.0.0.1, a free port) from a thread."""

    def __init__(self) -> None:
        self.runs: dict[str, FakeRun] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.server = _Server(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
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
        if op == "Viewer":
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

        def answer(self, method: str) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            parts = self.path.split("?")[0].strip("/").split("/")
            try:
                with fake.lock:
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
