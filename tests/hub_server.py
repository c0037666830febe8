"""A local stand-in for the Hugging Face Hub's HTTP API, for tests of uploads (the Hub is not reachable here).

It answers, over real HTTP, the requests ``huggingface_hub``'s own client sends for ``HfApi.create_repo`` and
``HfApi.upload_folder`` (create the repo, validate the card's YAML, the "preupload" question, the commit), keeps
every request, and keeps each repo's files as the commit carried them. Every file is answered "regular" at
preupload, so the commit carries the bytes themselves (base64 in its NDJSON body) and a test compares them with
the folder. Anything else gets a 404 that names the request, which fails the client loudly.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Repo:
    private: bool | None
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[str] = field(default_factory=list)


class HubServer:
    """``with HubServer() as hub:`` serves on ``hub.endpoint`` (point ``HF_ENDPOINT`` there) until the block ends."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.repos: dict[str, Repo] = {}
        server = self
        handler = type("Handler", (_Handler,), {"hub": server})
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.endpoint = f"http://127.0.0.1:{self._http.server_address[1]}"
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._http.shutdown()
        self._http.server_close()


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer

    def log_message(self, *args) -> None:  # quiet: the test reads hub.requests
        pass

    def do_GET(self) -> None:
        self._record(b"")
        self._reply(404, {"error": f"not served here: GET {self.path}"})

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._record(body)
        path = self.path.split("?")[0]
        if path == "/api/repos/create":
            payload = json.loads(body)
            repo_id = f"{payload['organization']}/{payload['name']}"
            self.hub.repos.setdefault(repo_id, Repo(payload.get("visibility") == "private"))
            return self._reply(200, {"url": f"{self.hub.endpoint}/{repo_id}", "name": repo_id})
        if path == "/api/validate-yaml":
            return self._reply(200, {"errors": [], "warnings": []})
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/([^/]+)", path)
        if match is None or match[1] not in self.hub.repos:
            return self._reply(404, {"error": f"not served here: POST {path}"})
        repo = self.hub.repos[match[1]]
        if match[2] == "preupload":
            files = json.loads(body)["files"]
            return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                               for f in files]})  # fmt: skip
        for line in body.splitlines():
            item = json.loads(line)
            if item["key"] == "header":
                repo.commits.append(item["value"]["summary"])
            elif item["key"] == "file":
                repo.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            else:
                return self._reply(400, {"error": f"not served here: commit item {item['key']}"})
        oid = f"{len(repo.commits):040x}"
        return self._reply(
            200,
            {
                "commitUrl": f"{self.hub.endpoint}/{match[1]}/commit/{oid}",
                "commitOid": oid,
                "pullRequestUrl": None,
            },
        )

    def _record(self, body: bytes) -> None:
        self.hub.requests.append(
            {"method": self.command, "path": self.path, "authorization": self.headers.get("Authorization"),
             "size": len(body)}
        )  # fmt: skip

    def _reply(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
