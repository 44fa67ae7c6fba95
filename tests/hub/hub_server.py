"""A small Hub-compatible HTTP server for tests: the endpoints huggingface_hub 2.x uses to create a repo,
upload (preupload + NDJSON commit, every file "regular", i.e. inline base64), read repo info and the tree,
and download files (HEAD/GET /{repo}/resolve/{rev}/{path} with ETag and X-Repo-Commit headers).

Files named like weights (`LFS_SUFFIXES`) go through git LFS as on the Hub: preupload answers "lfs", the
client asks the LFS batch endpoint (/{repo}.git/info/lfs/objects/batch), PUTs the bytes to the upload href,
calls verify, and the commit names them by sha256 (`lfsFile`); downloads carry X-Linked-Etag/X-Linked-Size.

In memory, one `HubState` per server; repos are git-like: a commit is an immutable {path: bytes} snapshot
with a sha, branches point at commits. Tokens: only `HubState.tokens` are accepted; writes need one, reads
of private repos need one. Every request is logged in `HubState.requests` as (method, path).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

USER = "tester"
TOKEN = "hf_riverone_test_token"
LFS_SUFFIXES = (".safetensors", ".bin", ".pt")


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    private: bool
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    lfs: dict[str, set[str]] = field(default_factory=dict)  # commit -> paths stored through LFS
    branches: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None


@dataclass
class HubState:
    tokens: set[str] = field(default_factory=lambda: {TOKEN})
    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    lfs_objects: dict[str, bytes] = field(default_factory=dict)  # sha256 -> bytes
    lock: threading.Lock = field(default_factory=threading.Lock)


def card_metadata(readme: bytes | None) -> dict | None:
    if not readme:
        return None
    text = readme.decode()
    if not text.startswith("---"):
        return None
    return yaml.safe_load(text.split("---", 2)[1]) or {}


class Handler(BaseHTTPRequestHandler):
    state: HubState  # set on the subclass by `start_server`
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    # -- helpers -------------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
        self.send_response(status)
        headers = {"Content-Type": "application/json", **(headers or {})}
        headers.setdefault("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if body and not head:
            self.wfile.write(body)

    def _json(self, status: int, payload, headers: dict | None = None):
        self._send(status, json.dumps(payload).encode(), headers)

    def _error(self, status: int, message: str, code: str | None = None, head: bool = False):
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, json.dumps({"error": message}).encode(), headers, head=head)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _token_state(self) -> str:
        """'none', 'valid' or 'invalid'."""
        auth = self.headers.get("Authorization")
        if not auth:
            return "none"
        return "valid" if auth.removeprefix("Bearer ").strip() in self.state.tokens else "invalid"

    def _require_token(self) -> bool:
        status = self._token_state()
        if status == "valid":
            return True
        message = "Invalid credentials in Authorization header" if status == "invalid" else "You must be authenticated"
        self._error(401, message)
        return False

    def _repo(self, repo_id: str, head: bool = False) -> Repo | None:
        repo = self.state.repos.get(repo_id)
        if repo is None or (repo.private and self._token_state() != "valid"):
            self._error(404 if repo is None else 401, "Repository not found", "RepoNotFound", head=head)
            return None
        return repo

    def _repo_at(self, repo_id: str, revision: str, head: bool = False) -> tuple[Repo, str] | None:
        """(repo, commit sha) of `revision`, or None after answering 401/404."""
        repo = self._repo(repo_id, head=head)
        if repo is None:
            return None
        sha = repo.resolve(revision)
        if sha is None:
            self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound", head=head)
            return None
        return repo, sha

    # -- routing -------------------------------------------------------------------------------------
    def do_HEAD(self):
        self._route("HEAD")

    def do_GET(self):
        self._route("GET")

    def do_POST(self):
        self._route("POST")

    def do_PUT(self):
        self._route("PUT")

    def _route(self, method: str):
        url = urlsplit(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        with self.state.lock:
            self.state.requests.append((method, path))
        parts = path.strip("/").split("/")
        try:
            if method == "GET" and path == "/api/whoami-v2":
                return self._whoami()
            if method == "POST" and path == "/api/repos/create":
                return self._create_repo()
            if method == "POST" and path == "/api/validate-yaml":
                return self._validate_yaml()
            if method == "POST" and path.endswith(".git/info/lfs/objects/batch"):
                return self._lfs_batch(path.removesuffix(".git/info/lfs/objects/batch").strip("/"))
            if method == "PUT" and parts[0] == "lfs-upload" and len(parts) == 2:
                return self._lfs_put(parts[1])
            if method == "POST" and path == "/lfs-verify":
                return self._lfs_verify()
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                repo_id = "/".join(parts[2:4])
                rest = parts[4:]
                if method == "GET" and not rest:
                    return self._model_info(repo_id, "main")
                if method == "GET" and rest[:1] == ["revision"] and len(rest) >= 2:
                    return self._model_info(repo_id, "/".join(rest[1:]))
                if method == "GET" and rest[:1] == ["tree"] and len(rest) >= 2:
                    return self._tree(repo_id, rest[1])
                if method == "POST" and rest[:1] == ["preupload"]:
                    return self._preupload(repo_id, "/".join(rest[1:]))
                if method == "POST" and rest[:1] == ["commit"]:
                    return self._commit(repo_id, "/".join(rest[1:]))
                if method == "POST" and rest[:1] == ["branch"]:
                    return self._create_branch(repo_id, "/".join(rest[1:]))
            if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
                return self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]), head=method == "HEAD")
            self._error(404, f"no such endpoint in the test hub: {method} {path}")
        except Exception as error:  # noqa: BLE001  (report server bugs to the client, do not hang)
            self._error(500, f"test hub error: {type(error).__name__}: {error}")

    # -- endpoints -----------------------------------------------------------------------------------
    def _whoami(self):
        if self._require_token():
            self._json(200, {"type": "user", "name": USER, "orgs": [{"name": "org"}],
                             "auth": {"type": "access_token", "accessToken": {"role": "write"}}})

    def _create_repo(self):
        if not self._require_token():
            return
        payload = json.loads(self._body() or b"{}")
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        with self.state.lock:
            if repo_id in self.state.repos:  # the Hub's 409 also carries the url (the client reads it)
                return self._json(409, {"error": "You already created this model repo",
                                        "url": f"http://{self.headers['Host']}/{repo_id}"},
                                  {"X-Error-Message": "You already created this model repo"})
            # huggingface_hub >= 2 sends "visibility"; older clients send "private"
            repo = Repo(private=payload.get("visibility") == "private" or bool(payload.get("private")))
            initial = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
            sha = hashlib.sha1(f"init {repo_id}".encode()).hexdigest()
            repo.commits[sha] = initial
            repo.branches["main"] = sha
            self.state.repos[repo_id] = repo
        self._json(200, {"url": f"http://{self.headers['Host']}/{repo_id}", "name": repo_id})

    def _validate_yaml(self):
        payload = json.loads(self._body() or b"{}")
        try:
            card_metadata(payload.get("content", "").encode())
        except yaml.YAMLError as error:
            return self._json(400, {"errors": [{"message": str(error)}]})
        self._json(200, {"errors": [], "warnings": []})

    def _model_info(self, repo_id: str, revision: str):
        found = self._repo_at(repo_id, revision)
        if found is None:
            return
        repo, sha = found
        files = repo.commits[sha]
        metadata = card_metadata(files.get("README.md"))
        info = {"_id": repo_id, "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0], "sha": sha,
                "private": repo.private, "disabled": False, "gated": False, "downloads": 0, "likes": 0,
                "tags": (metadata or {}).get("tags", []), "siblings": [{"rfilename": p} for p in sorted(files)]}
        if metadata is not None:
            info["cardData"] = metadata
            if "model-index" in metadata:
                info["model-index"] = metadata["model-index"]
            for key in ("library_name", "pipeline_tag"):
                if key in metadata:
                    info[key] = metadata[key]
        self._json(200, info)

    def _tree(self, repo_id: str, revision: str):
        found = self._repo_at(repo_id, revision)
        if found is None:
            return
        repo, sha = found
        lfs = repo.lfs.get(sha, set())
        entries = []
        for p, d in sorted(repo.commits[sha].items()):
            entry = {"type": "file", "path": p, "size": len(d), "oid": git_blob_sha(d)}
            if p in lfs:
                entry["lfs"] = {"oid": hashlib.sha256(d).hexdigest(), "size": len(d), "pointerSize": 134}
            entries.append(entry)
        self._json(200, entries)

    def _preupload(self, repo_id: str, revision: str):
        if not self._require_token():
            return
        repo = self._repo(repo_id)
        if repo is None:
            return
        sha = repo.resolve(revision)
        current = repo.commits[sha] if sha else {}
        payload = json.loads(self._body())
        files = []
        for f in payload["files"]:
            lfs = f["path"].endswith(LFS_SUFFIXES)
            old = current.get(f["path"])
            oid = None if old is None else hashlib.sha256(old).hexdigest() if lfs else git_blob_sha(old)
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": oid})
        self._json(200, {"files": files, "commitOid": sha})

    def _commit(self, repo_id: str, revision: str):
        if not self._require_token():
            return
        repo = self._repo(repo_id)
        if repo is None:
            return
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        with self.state.lock:
            parent = repo.resolve(revision)
            if parent is None:
                return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            files = dict(repo.commits[parent])
            lfs_paths = set(repo.lfs.get(parent, set()))
            summary = ""
            for line in lines:
                key, value = line["key"], line["value"]
                if key == "header":
                    summary = value.get("summary", "")
                elif key == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                    lfs_paths.discard(value["path"])
                elif key == "lfsFile":
                    if value["oid"] not in self.state.lfs_objects:
                        return self._error(400, f"LFS object {value['oid']} was never uploaded")
                    files[value["path"]] = self.state.lfs_objects[value["oid"]]
                    lfs_paths.add(value["path"])
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                    lfs_paths.discard(value["path"])
                else:
                    return self._error(400, f"the test hub does not support commit entries of kind {key!r}")
            # like git's committer timestamp: two commits of the same tree on the same parent still differ
            digest = hashlib.sha1(f"{parent} {summary} {len(repo.commits)} {revision}".encode())
            for p, d in sorted(files.items()):
                digest.update(p.encode() + b"\0" + git_blob_sha(d).encode())
            sha = digest.hexdigest()
            repo.commits[sha] = files
            repo.lfs[sha] = lfs_paths
            repo.branches[revision] = sha
        self._json(200, {"commitUrl": f"http://{self.headers['Host']}/{repo_id}/commit/{sha}", "commitOid": sha,
                         "success": True, "pullRequestUrl": None})

    def _create_branch(self, repo_id: str, branch: str):
        if not self._require_token():
            return
        repo = self._repo(repo_id)
        if repo is None:
            return
        payload = json.loads(self._body() or b"{}")
        with self.state.lock:
            if branch in repo.branches:
                return self._error(409, f"Reference already exists: {branch}")
            start = repo.resolve(payload.get("startingPoint") or "main")
            repo.branches[branch] = start
        self._json(200, {})

    def _resolve(self, repo_id: str, revision: str, path: str, head: bool):
        found = self._repo_at(repo_id, revision, head=head)
        if found is None:
            return
        repo, sha = found
        files = repo.commits[sha]
        if path not in files:
            return self._error(404, f"Entry not found: {path}", "EntryNotFound", head=head)
        data = files[path]
        headers = {"Content-Type": "application/octet-stream", "ETag": f'"{git_blob_sha(data)}"',
                   "X-Repo-Commit": sha, "Accept-Ranges": "bytes"}
        if path in repo.lfs.get(sha, set()):  # as the Hub: the etag of an LFS file is its sha256
            headers.update({"X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Linked-Size": str(len(data))})
        self._send(200, data, headers, head=head)


    def _lfs_batch(self, repo_id: str):
        if not self._require_token():
            return
        if self._repo(repo_id) is None:
            return
        payload = json.loads(self._body())
        base = f"http://{self.headers['Host']}"
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.state.lfs_objects:  # already stored: no actions, nothing to upload
                entry["actions"] = {"upload": {"href": f"{base}/lfs-upload/{obj['oid']}"},
                                    "verify": {"href": f"{base}/lfs-verify"}}
            objects.append(entry)
        self._json(200, {"transfer": "basic", "objects": objects})

    def _lfs_put(self, oid: str):
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            return self._error(400, f"LFS upload does not match its oid {oid}")
        with self.state.lock:
            self.state.lfs_objects[oid] = data
        self._send(200)

    def _lfs_verify(self):
        if not self._require_token():
            return
        payload = json.loads(self._body())
        stored = self.state.lfs_objects.get(payload["oid"])
        if stored is None or len(stored) != payload["size"]:
            return self._error(404, f"LFS object {payload['oid']} not found")
        self._json(200, {"success": True})


class HubServer:
    """A running test hub: `.url` (http://127.0.0.1:PORT), `.state`, `.close()`."""

    def __init__(self):
        self.state = HubState()
        handler = type("BoundHandler", (Handler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
