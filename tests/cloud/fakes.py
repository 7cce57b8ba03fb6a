"""FAKES of two Google Cloud REST APIs, on loopback, for the real client libraries to talk to.

These are stand-ins for services we cannot reach from tests (no network, no project): they serve
the few calls our code makes, in the wire format the real REST transports use, and record every
request (path, headers, body) so a test can assert what the client really sent.

- ``FakeGoogleAPIs.token``: an OAuth token endpoint (``POST /token``), so that ordinary
  Application Default Credentials (an ``authorized_user`` JSON file in
  ``GOOGLE_APPLICATION_CREDENTIALS`` whose ``token_uri`` points here) work unchanged.
- Vertex AI JobService (``aiplatform_v1``): create, get and cancel CustomJobs. Each get moves a job
  one step along ``states`` (e.g. PENDING -> RUNNING -> SUCCEEDED).
- Secret Manager (``secretmanager_v1``): ``versions/*:access`` for the secrets in ``secrets``.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from google.cloud import aiplatform_v1

TOKEN = "fake-access-token"  # what /token hands out


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeGoogleAPIs:
    """One loopback HTTP server with the token, JobService and Secret Manager routes."""

    states: list[str] = field(default_factory=lambda: ["JOB_STATE_PENDING", "JOB_STATE_RUNNING",
                                                       "JOB_STATE_SUCCEEDED"])
    secrets: dict[str, str | None] = field(default_factory=dict)  # resource name -> value (None: access denied)
    requests: list[Request] = field(default_factory=list)
    jobs: dict[str, dict] = field(default_factory=dict)  # name -> {"job": CustomJob, "polls": int}

    def start(self) -> "FakeGoogleAPIs":
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                request = Request(self.command, self.path, dict(self.headers), body)
                fake.requests.append(request)
                status, payload = fake.route(request)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def credentials_file(self, directory: Path) -> Path:
        """Application Default Credentials: a service-account key (made here) whose token_uri is this fake.

        The client libraries may sign their own JWT with it instead of asking for a token; either
        way a request carries ``Authorization: Bearer ...`` and nothing leaves the machine.
        """
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
        path = directory / "adc.json"
        path.write_text(json.dumps({
            "type": "service_account", "project_id": "proj", "private_key_id": "fake-key-id",
            "private_key": pem, "client_email": "trainer@proj.iam.gserviceaccount.com",
            "client_id": "1", "token_uri": f"{self.url}/token"}))
        return path

    # ------------------------------------------------------------------ routes
    def route(self, request: Request) -> tuple[int, dict]:
        path = request.path.split("?", 1)[0]
        if request.method == "POST" and path == "/token":
            return 200, {"access_token": TOKEN, "expires_in": 3600, "token_type": "Bearer"}
        headers = {k.lower(): v for k, v in request.headers.items()}
        if not headers.get("authorization", "").startswith("Bearer "):
            return _error(401, "UNAUTHENTICATED", "missing or wrong bearer token")
        if m := re.fullmatch(r"/v1/(projects/[^/]+/(?:locations/[^/]+/)?secrets/[^/]+/versions/[^/:]+):access", path):
            return self._access_secret(m.group(1))
        if m := re.fullmatch(r"/v1/(projects/[^/]+/locations/[^/]+)/customJobs", path):
            return self._create_job(m.group(1), request.body)
        if m := re.fullmatch(r"/v1/(projects/[^/]+/locations/[^/]+/customJobs/[^/:]+):cancel", path):
            return self._cancel_job(m.group(1))
        if m := re.fullmatch(r"/v1/(projects/[^/]+/locations/[^/]+/customJobs/[^/:]+)", path):
            return self._get_job(m.group(1))
        return _error(404, "NOT_FOUND", f"no route for {request.method} {path}")

    def _access_secret(self, name: str) -> tuple[int, dict]:
        if name not in self.secrets:
            return _error(404, "NOT_FOUND", f"Secret [{name}] not found or has no versions.")
        if self.secrets[name] is None:  # exists, but the caller may not read it
            return _error(403, "PERMISSION_DENIED", f"Permission 'secretmanager.versions.access' denied for {name}")
        data = self.secrets[name].encode()
        return 200, {"name": name, "payload": {"data": base64.b64encode(data).decode()}}

    def _create_job(self, parent: str, body: bytes) -> tuple[int, dict]:
        job = aiplatform_v1.CustomJob.from_json(body, ignore_unknown_fields=True)
        job.name = f"{parent}/customJobs/{1000 + len(self.jobs)}"
        job.state = aiplatform_v1.JobState[self.states[0]]
        self.jobs[job.name] = {"job": job, "polls": 0}
        return 200, _as_dict(job)

    def _get_job(self, name: str) -> tuple[int, dict]:
        if name not in self.jobs:
            return _error(404, "NOT_FOUND", f"CustomJob {name} not found.")
        entry = self.jobs[name]
        job = entry["job"]
        if job.state not in (aiplatform_v1.JobState.JOB_STATE_CANCELLING, aiplatform_v1.JobState.JOB_STATE_CANCELLED):
            entry["polls"] += 1
            state = self.states[min(entry["polls"], len(self.states) - 1)]
            job.state = aiplatform_v1.JobState[state]
            if state == "JOB_STATE_FAILED":
                job.error.code, job.error.message = 3, "The replica workerpool0-0 exited with a non-zero status of 1."
        elif job.state == aiplatform_v1.JobState.JOB_STATE_CANCELLING:
            job.state = aiplatform_v1.JobState.JOB_STATE_CANCELLED
        return 200, _as_dict(job)

    def _cancel_job(self, name: str) -> tuple[int, dict]:
        if name not in self.jobs:
            return _error(404, "NOT_FOUND", f"CustomJob {name} not found.")
        self.jobs[name]["job"].state = aiplatform_v1.JobState.JOB_STATE_CANCELLING
        return 200, {}

    def jobs_by_id(self, name: str) -> None:
        """Make a job exist (as if submitted earlier), e.g. for ``status`` and ``cancel``."""
        job = aiplatform_v1.CustomJob(name=name, display_name="earlier",
                                      state=aiplatform_v1.JobState[self.states[0]])
        self.jobs[name] = {"job": job, "polls": 0}

    def sent_jobs(self) -> list:
        """The CustomJobs the client POSTed, parsed from the wire."""
        return [aiplatform_v1.CustomJob.from_json(r.body, ignore_unknown_fields=True)
                for r in self.requests if r.method == "POST" and r.path.split("?")[0].endswith("/customJobs")]


def _as_dict(job) -> dict:
    return json.loads(aiplatform_v1.CustomJob.to_json(job))


def _error(code: int, status: str, message: str) -> tuple[int, dict]:
    return code, {"error": {"code": code, "status": status, "message": message}}
