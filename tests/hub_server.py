"""A loopback fake of the Hugging Face Hub: the HTTP routes huggingface_hub 2.4 uses to create a repo,
commit files, list them and download them. For tests only: binds 127.0.0.1, keeps everything in memory.

    with FakeHub() as hub:            # hub.url == "http://127.0.0.1:PORT"
        env = hub.client_env()        # HF_ENDPOINT, HF_HUB_DISABLE_XET=1, HF_HUB_OFFLINE=0, ...
        ... run the client with env ...
        hub.files("tester/model")     # {path: bytes} at main

Routes (model and dataset repos, `{repo}` = namespace/name, `{rev}` = branch or commit id, URL-quoted):
  POST /api/repos/create                      create (409 if it exists)
  GET  /api/whoami-v2                         the fake user
  POST /api/validate-yaml                     README metadata check (parses the YAML front matter)
  POST /api/{type}s/{repo}/preupload/{rev}    every file is "regular" (never LFS, never Xet)
  POST /api/{type}s/{repo}/commit/{rev}       NDJSON: header, file (base64), deletedFile, deletedFolder
  GET  /api/{type}s/{repo}[/revision/{rev}]   repo info: sha, siblings
  GET  /api/{type}s/{repo}/tree/{rev}[/{path}]  ?recursive=  one page, no Link header
  HEAD|GET /{repo}/resolve/{rev}/{path}       file + X-Repo-Commit, ETag (git blob id), Content-Length;
                                              also /datasets/{repo}/resolve/...; Range requests honoured
Errors carry the X-Error-Code headers the client maps to its exceptions (RepoNotFound, EntryNotFound,
RevisionNotFound). Writes need an `Authorization: Bearer ...` header, as on the Hub; any token is accepted.
Unknown routes answer 501 and are recorded in `hub.unhandled`, so a test can tell what the client wanted.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

USER = "tester"
_DEAD_PROXY = "http://127.0.0.1:9"  # the discard port: nothing listens there
_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
_TYPE = r"(?P<type>model|dataset)s"


def git_blob_id(data: bytes) -> str:
    """The id git gives a blob (what the Hub uses as a regular file's oid and ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    files: dict  # path -> bytes (the whole tree at this commit)
    message: str
    parent: str | None


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    branches: dict = field(default_factory=dict)  # name -> commit oid
    commits: dict = field(default_factory=dict)  # oid -> Commit

    def resolve(self, revision: str) -> Commit | None:
        oid = self.branches.get(revision, revision)
        return self.commits.get(oid)


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class FakeHub:
    """The server and its in-memory repos."""

    def __init__(self, user: str = USER):
        self.user = user
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._counter = 0

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # loopback only, a free port
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def client_env(self, base: dict | None = None, home: str | None = None) -> dict:
        """Environment for a client process that talks to this server and nothing else."""
        env = dict(base or {})
        for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_ENABLE_HF_TRANSFER"):
            env.pop(name, None)  # never send a real token anywhere, not even to loopback
        env.update(
            HF_ENDPOINT=self.url, HF_HUB_DISABLE_XET="1", HF_HUB_OFFLINE="0", TRANSFORMERS_OFFLINE="0",
            HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_IMPLICIT_TOKEN="1",
            NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
            # A safety net: anything that would go elsewhere than this server is sent to a closed loopback
            # port and fails at once, instead of reaching the network.
            HTTP_PROXY=_DEAD_PROXY, HTTPS_PROXY=_DEAD_PROXY, ALL_PROXY=_DEAD_PROXY,
            http_proxy=_DEAD_PROXY, https_proxy=_DEAD_PROXY, all_proxy=_DEAD_PROXY,
        )
        if home is not None:  # a private cache and token store
            env["HF_HOME"] = home
        return env

    # ---------------------------------------------------------------- inspection
    def files(self, repo_id: str, revision: str = "main") -> dict:
        repo = self.repos[repo_id]
        return dict(repo.resolve(revision).files)

    # ---------------------------------------------------------------- operations
    def _new_oid(self, seed: str) -> str:
        self._counter += 1
        return hashlib.sha1(f"{seed}:{self._counter}".encode()).hexdigest()

    def create_repo(self, name: str, organization: str | None, repo_type: str, private: bool) -> Repo:
        repo_id = f"{organization or self.user}/{name}"
        with self.lock:
            if repo_id in self.repos:
                raise HubError(409, "You already created this model repo", headers={"X-Error-Message": "exists"})
            repo = Repo(repo_id, repo_type, private)
            # A new Hub repo has one commit holding .gitattributes.
            first = Commit(self._new_oid(repo_id), {".gitattributes": b"*.safetensors filter=lfs diff=lfs\n"},
                           "initial commit", None)
            repo.commits[first.oid] = first
            repo.branches["main"] = first.oid
            self.repos[repo_id] = repo
        return repo

    def get_repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or repo.repo_type != repo_type:
            raise HubError(404, f"Repository Not Found for url: {repo_id}", "RepoNotFound")
        return repo

    def get_commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def commit(self, repo: Repo, revision: str, lines: list[dict]) -> Commit:
        with self.lock:
            if revision not in repo.branches:
                raise HubError(404, f"Invalid rev id: {revision} (commits go to branches)", "RevisionNotFound")
            parent = repo.commits[repo.branches[revision]]
            files = dict(parent.files)
            message = ""
            for line in lines:
                key, value = line.get("key"), line.get("value", {})
                if key == "header":
                    message = value.get("summary", "")
                elif key == "file":
                    if value.get("encoding") != "base64":
                        raise HubError(400, f"unsupported encoding {value.get('encoding')!r}")
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    if value["path"] not in files:
                        raise HubError(404, f"{value['path']} does not exist", "EntryNotFound")
                    del files[value["path"]]
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {p: c for p, c in files.items() if not p.startswith(prefix)}
                else:  # lfsFile: this server never asks for LFS uploads, so none can be referenced
                    raise HubError(400, f"commit operation {key!r} is not supported by the loopback hub")
            commit = Commit(self._new_oid(repo.repo_id + message), files, message, parent.oid)
            repo.commits[commit.oid] = commit
            repo.branches[revision] = commit.oid
        return commit


def _iso_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every response has a Content-Length

    def log_message(self, fmt, *args):  # quiet: the test reads hub.requests instead
        pass

    # ---------------------------------------------------------------- plumbing
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Type", "application/json")
        headers["Content-Length"] = str(len(body)) if "Content-Length" not in headers else headers["Content-Length"]
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict | None = None, head: bool = False) -> None:
        self._send(status, json.dumps(obj).encode(), headers, head)

    def _error(self, err: HubError, head: bool = False) -> None:
        headers = {"X-Error-Message": err.message, **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        self._json(err.status, {"error": err.message}, headers, head)

    def _need_auth(self) -> None:
        if not self.headers.get("Authorization", "").startswith("Bearer "):
            raise HubError(401, "Invalid username or password.", "RepoNotFound")

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        path, query = split.path, parse_qs(split.query)
        self.hub.requests.append((method, path))
        head = method == "HEAD"
        try:
            for pattern, verb, handler in _ROUTES:
                if verb == method or (verb == "GET" and head):
                    match = re.fullmatch(pattern, path)
                    if match:
                        groups = {k: unquote(v) if v is not None else None for k, v in match.groupdict().items()}
                        handler(self, query=query, head=head, **groups)
                        return
            self.hub.unhandled.append((method, self.path))
            self._json(501, {"error": f"loopback hub: no route for {method} {path}"}, head=head)
        except HubError as err:
            self._error(err, head)

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    # ---------------------------------------------------------------- routes
    def create(self, query, head):
        self._need_auth()
        payload = json.loads(self._body() or b"{}")
        repo_type = payload.get("type") or "model"
        repo = self.hub.create_repo(payload["name"], payload.get("organization"), repo_type,
                                    payload.get("visibility") == "private" or bool(payload.get("private")))
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        self._json(200, {"url": f"{self.hub.url}/{prefix}{repo.repo_id}", "name": repo.repo_id})

    def whoami(self, query, head):
        self._need_auth()
        self._json(200, {"type": "user", "name": self.hub.user, "fullname": "Loopback Tester", "orgs": [],
                         "auth": {"accessToken": {"role": "write", "displayName": "loopback"}}})

    def validate_yaml(self, query, head):
        import yaml

        content = json.loads(self._body() or b"{}").get("content", "")
        errors = []
        match = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.S)
        if match:
            try:
                if not isinstance(yaml.safe_load(match[1]) or {}, dict):
                    errors.append({"message": "metadata must be a YAML mapping"})
            except yaml.YAMLError as err:
                errors.append({"message": f"invalid YAML: {err}"})
        self._json(400 if errors else 200, {"errors": errors, "warnings": []})

    def preupload(self, query, head, type, repo, rev):
        self._need_auth()
        r = self.hub.get_repo(repo, type)
        commit = self.hub.get_commit(r, rev)
        payload = json.loads(self._body() or b"{}")
        files = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
             "oid": git_blob_id(commit.files[f["path"]]) if f["path"] in commit.files else None}
            for f in payload.get("files", [])
        ]
        self._json(200, {"files": files, "commitOid": commit.oid})

    def commit(self, query, head, type, repo, rev):
        self._need_auth()
        if query.get("create_pr"):
            raise HubError(400, "pull requests are not supported by the loopback hub")
        r = self.hub.get_repo(repo, type)
        lines = [json.loads(line) for line in self._body().decode().splitlines() if line.strip()]
        commit = self.hub.commit(r, rev, lines)
        prefix = "" if type == "model" else f"{type}s/"
        self._json(200, {"success": True, "commitOid": commit.oid, "pullRequestUrl": None,
                         "commitUrl": f"{self.hub.url}/{prefix}{repo}/commit/{commit.oid}"})

    def info(self, query, head, type, repo, rev=None):
        r = self.hub.get_repo(repo, type)
        commit = self.hub.get_commit(r, rev or "main")
        self._json(200, {
            "id": r.repo_id, "_id": hashlib.md5(r.repo_id.encode()).hexdigest()[:24], "modelId": r.repo_id,
            "author": r.repo_id.split("/")[0], "sha": commit.oid, "private": r.private, "disabled": False,
            "gated": False, "downloads": 0, "likes": 0, "tags": [], "lastModified": _iso_now(),
            "createdAt": _iso_now(), "siblings": [{"rfilename": p} for p in sorted(commit.files)],
        }, head=head)

    def tree(self, query, head, type, repo, rev, path=None):
        r = self.hub.get_repo(repo, type)
        commit = self.hub.get_commit(r, rev)
        recursive = (query.get("recursive") or ["false"])[0].lower() in ("1", "true")
        prefix = (path.strip("/") + "/") if path else ""
        if path and not any(p.startswith(prefix) for p in commit.files):
            raise HubError(404, f"{path} does not exist", "EntryNotFound")
        entries, folders = [], set()
        for p in sorted(commit.files):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix):]
            parts = rest.split("/")
            for depth in range(1, len(parts)):  # the folders on the way
                folder = prefix + "/".join(parts[:depth])
                if (recursive or depth == 1) and folder not in folders:
                    folders.add(folder)
                    entries.append({"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(),
                                    "size": 0, "path": folder})
            if recursive or len(parts) == 1:
                data = commit.files[p]
                entries.append({"type": "file", "oid": git_blob_id(data), "size": len(data), "path": p})
        self._json(200, entries, head=head)

    def resolve(self, query, head, repo, rev, path, type="model"):
        r = self.hub.get_repo(repo, type)
        commit = self.hub.get_commit(r, rev)
        if path not in commit.files:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        data = commit.files[path]
        headers = {"Content-Type": "application/octet-stream", "X-Repo-Commit": commit.oid,
                   "ETag": f'"{git_blob_id(data)}"', "Accept-Ranges": "bytes"}
        status, body = 200, data
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match and not head:
            start = int(match[1])
            end = int(match[2]) if match[2] else len(data) - 1
            body = data[start:end + 1]
            status = 206
            headers["Content-Range"] = f"bytes {start}-{start + len(body) - 1}/{len(data)}"
        if head:
            headers["Content-Length"] = str(len(data))
        self._send(status, body, headers, head)

    def resolve_dataset(self, query, head, repo, rev, path):
        self.resolve(query, head, repo, rev, path, type="dataset")


_ROUTES = [
    (r"/api/repos/create", "POST", _Handler.create),
    (r"/api/whoami-v2", "GET", _Handler.whoami),
    (r"/api/validate-yaml", "POST", _Handler.validate_yaml),
    (rf"/api/{_TYPE}/{_REPO}/preupload/(?P<rev>[^/]+)", "POST", _Handler.preupload),
    (rf"/api/{_TYPE}/{_REPO}/commit/(?P<rev>[^/]+)", "POST", _Handler.commit),
    (rf"/api/{_TYPE}/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", "GET", _Handler.tree),
    (rf"/api/{_TYPE}/{_REPO}/revision/(?P<rev>[^/]+)", "GET", _Handler.info),
    (rf"/api/{_TYPE}/{_REPO}", "GET", _Handler.info),
    (rf"/datasets/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "GET", _Handler.resolve_dataset),
    (rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "GET", _Handler.resolve),
]

