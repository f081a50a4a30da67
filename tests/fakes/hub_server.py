"""A stub Hugging Face Hub on 127.0.0.1 that speaks just enough of the Hub's HTTP protocol for huggingface_hub uploads
and for `datasets.load_dataset` / `SentenceTransformer` to read the uploads back.

Point clients at it with `HF_ENDPOINT=server.endpoint` and `HF_HUB_DISABLE_XET=1` (the stub has no Xet storage, so the
client must use the legacy LFS protocol). Implemented, as huggingface_hub 2.x calls them:

    POST /api/repos/create                                    create (409 when it exists)
    POST /api/validate-yaml                                   README front matter: parses, checks `configs`
    GET  /api/agent-harnesses                                 huggingface_hub's telemetry registry (empty)
    POST /api/{type}s/{repo}/preupload/{rev}                  "lfs" for binaries, .parquet/.safetensors and big files
    POST /{prefix}{repo}.git/info/lfs/objects/batch           basic transfer; PUT to /lfs-upload/{oid} stores it
    POST /api/{type}s/{repo}/commit/{rev}                     NDJSON: header, file (base64), lfsFile, deletedFile
    GET  /api/{type}s/{repo}[/revision/{rev}]                 repo info with siblings and the head commit
    GET  /api/{type}s/{repo}/tree/{rev}[/{path}]              tree listing (recursive or not), lfs info on LFS files
    POST /api/{type}s/{repo}/paths-info/{rev}                 form or JSON `paths`
    GET  /api/{type}s/{repo}/refs                             branches
    POST /api/{type}s/{repo}/branch/{branch}                  create a branch (409 when it exists)
    HEAD/GET /{prefix}{repo}/resolve/{rev}/{path}             file content with X-Repo-Commit / ETag / Range

The same routes serve `snapshot_download` (revision info, recursive tree, resolve); `push` puts a model there for it.

Everything the clients did is kept for assertions: `requests` (method, path), `authorizations` (every Authorization
header seen), `unknown` (requests no route matched, to spot a protocol gap quickly), `downloads()` (file contents
served), and per repo its `commits`.
Set `fail_commits` to make the next commits fail with a 500, as an upload interrupted before its commit would.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

#: Suffixes the real Hub's default .gitattributes routes to LFS.
LFS_SUFFIXES = (".parquet", ".safetensors", ".bin", ".pt", ".pth", ".onnx", ".arrow", ".h5", ".msgpack", ".zip")
#: The Hub stores files of 10 MB and more in LFS whatever their type.
LFS_MIN_SIZE = 10 * 1024 * 1024

_REPO = r"(?P<repo>[^/]+/[^/]+|[^/]+)"
_TYPE = r"(?P<type>model|dataset|space)s"


def git_blob_sha1(content: bytes) -> str:
    """The git object id of a regular file: what the Hub reports as `oid` for it."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class StoredFile:
    content: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def blob_oid(self) -> str:
        """The git oid of what git stores: the pointer for an LFS file, the content otherwise."""
        stored = lfs_pointer(self.sha256, len(self.content)) if self.lfs else self.content
        return git_blob_sha1(stored)

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.blob_oid


@dataclass
class Commit:
    oid: str
    summary: str
    parent: str | None
    files: dict[str, StoredFile]
    operations: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        revision = urllib.parse.unquote(revision)
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        return self.commits.get(revision)

    @property
    def user_commits(self) -> list[Commit]:
        """Commits made through the commit endpoint (not the initial one `create` makes), oldest first."""
        return [commit for commit in self.commits.values() if commit.operations]


class _Failure(Exception):
    def __init__(self, status: int, message: str, error_code: str | None = None, **extra: Any):
        super().__init__(message)
        self.status, self.message, self.error_code, self.extra = status, message, error_code, extra


class FakeHubServer:
    """Start with `with FakeHubServer() as hub:`; `hub.endpoint` is the HF_ENDPOINT to use."""

    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.authorizations: list[str] = []
        self.unknown: list[tuple[str, str]] = []
        #: Answer this many commit requests with a 500 (after the uploads they follow): an interrupted publish.
        self.fail_commits = 0
        self._lock = threading.Lock()
        self._counter = 0
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeHubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def repo_url(self, repo_type: str, repo_id: str) -> str:
        return f"{self.endpoint}/{'' if repo_type == 'model' else repo_type + 's/'}{repo_id}"

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.repos[(repo_type, repo_id)]

    # --- state changes (under the lock: the client uploads from several threads) ---

    def _new_oid(self) -> str:
        self._counter += 1
        return hashlib.sha1(f"commit-{self._counter}".encode()).hexdigest()

    def create_repo(self, repo_type: str, repo_id: str, private: bool) -> Repo:
        with self._lock:
            if (repo_type, repo_id) in self.repos:
                # The Hub's 409 carries the repo's URL: create_repo(exist_ok=True) reads it.
                raise _Failure(409, "You already created this repo", url=self.repo_url(repo_type, repo_id))
            repo = Repo(repo_id, repo_type, private)
            # 1. The Hub starts every repo with one commit holding .gitattributes.
            oid = self._new_oid()
            gitattributes = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES)
            repo.commits[oid] = Commit(oid, "initial commit", None,
                                       {".gitattributes": StoredFile(gitattributes.encode(), lfs=False)})
            repo.branches["main"] = oid
            self.repos[(repo_type, repo_id)] = repo
            return repo

    def push(self, repo_id: str, files: dict[str, bytes], summary: str = "upload", repo_type: str = "model") -> Commit:
        """Commit `files` to main (creating a public repo first if needed), as if someone had uploaded them: a model
        for clients to download. LFS as the Hub's default .gitattributes and size rule would decide."""
        if (repo_type, repo_id) not in self.repos:
            self.create_repo(repo_type, repo_id, private=False)
        with self._lock:
            repo = self.repos[(repo_type, repo_id)]
            head = repo.commits[repo.branches["main"]]
            stored = {path: StoredFile(content, lfs=path.endswith(LFS_SUFFIXES) or len(content) >= LFS_MIN_SIZE)
                      for path, content in files.items()}
            oid = self._new_oid()
            commit = Commit(oid, summary, head.oid, {**head.files, **stored},
                            [{"key": "file", "path": path} for path in files])
            repo.commits[oid] = commit
            repo.branches["main"] = oid
            return commit

    def downloads(self) -> list[str]:
        """Paths of the file contents served so far (GET on resolve), in request order."""
        with self._lock:
            return [path for method, path in self.requests if method == "GET" and "/resolve/" in path]

    def apply_commit(self, repo: Repo, revision: str, lines: list[dict[str, Any]]) -> Commit:
        with self._lock:
            branch = urllib.parse.unquote(revision)
            if branch not in repo.branches:
                raise _Failure(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            head = repo.commits[repo.branches[branch]]
            header = next((line["value"] for line in lines if line.get("key") == "header"), None)
            if header is None:
                raise _Failure(400, "commit payload has no header line")
            if header.get("parentCommit") and header["parentCommit"] != head.oid:
                raise _Failure(412, "A commit has happened since. Please refresh and try again.")
            files = dict(head.files)
            operations = []
            for line in lines:
                key, value = line.get("key"), line.get("value", {})
                if key == "file":
                    if value.get("encoding") != "base64":
                        raise _Failure(400, f"{value.get('path')}: unsupported encoding {value.get('encoding')!r}")
                    files[value["path"]] = StoredFile(base64.b64decode(value["content"]), lfs=False)
                elif key == "lfsFile":
                    content = self.lfs_objects.get(value["oid"])
                    if content is None or len(content) != value["size"]:
                        raise _Failure(400, f"{value['path']}: LFS object {value['oid']} was never uploaded")
                    files[value["path"]] = StoredFile(content, lfs=True)
                elif key == "deletedFile":
                    if value["path"] not in files:
                        raise _Failure(404, "A file with this name doesn't exist", "EntryNotFound")
                    del files[value["path"]]
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {path: stored for path, stored in files.items() if not path.startswith(prefix)}
                elif key != "header":
                    raise _Failure(400, f"unsupported commit line {key!r}")
                if key != "header":
                    operations.append({"key": key, "path": value.get("path")})
            if not operations:
                raise _Failure(400, "empty commit")
            oid = self._new_oid()
            commit = Commit(oid, header.get("summary", ""), head.oid, files, operations)
            repo.commits[oid] = commit
            repo.branches[branch] = oid
            return commit


@contextmanager
def serve_hub(monkeypatch: pytest.MonkeyPatch, home: Path) -> Iterator[FakeHubServer]:
    """A started stub Hub with huggingface_hub in this process pointed at it and its token files under `home`; fails
    on leaving if a request matched no route. huggingface_hub reads these settings once, at import, so setting the
    environment would not reach this process."""
    from huggingface_hub import constants

    with FakeHubServer() as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            server.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
        monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
        yield server
        assert not server.unknown, f"the stub Hub lacks routes for {server.unknown}"


def _entries(commit: Commit, base: str, recursive: bool) -> list[dict[str, Any]]:
    """Tree entries under folder `base` ("" for the root), as the Hub's tree API lists them."""
    prefix = f"{base}/" if base else ""
    entries: dict[str, dict[str, Any]] = {}
    for path, stored in sorted(commit.files.items()):
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix):].split("/")
        # 1. Folders between `base` and the file: every one when recursive, the first only otherwise.
        for depth in range(1, len(parts) if recursive else min(2, len(parts))):
            folder = prefix + "/".join(parts[:depth])
            entries.setdefault(folder, {"type": "directory", "oid": git_blob_sha1(folder.encode()), "size": 0,
                                        "path": folder})
        if recursive or len(parts) == 1:
            entries[path] = _file_entry(path, stored)
    return list(entries.values())


def _file_entry(path: str, stored: StoredFile) -> dict[str, Any]:
    entry: dict[str, Any] = {"type": "file", "oid": stored.blob_oid, "size": len(stored.content), "path": path}
    if stored.lfs:
        entry["lfs"] = {"oid": stored.sha256, "size": len(stored.content),
                        "pointerSize": len(lfs_pointer(stored.sha256, len(stored.content)))}
    return entry


def _make_handler(hub: FakeHubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        #: (methods, path regex, handler), tried in order; filled in below, once the handlers exist.
        routes: list[tuple[tuple[str, ...], str, Any]] = []

        def log_message(self, format: str, *args: Any) -> None:
            # Quiet: pytest captures stderr, and request lines belong in `hub.requests`, not the test log.
            pass

        # --- plumbing ---

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
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                  content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, document: Any, headers: dict[str, str] | None = None) -> None:
            self._send(status, json.dumps(document).encode(), headers)

        def _dispatch(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            body = self._body() if self.command in ("POST", "PUT") else b""
            with hub._lock:
                hub.requests.append((self.command, url.path))
                if "Authorization" in self.headers:
                    hub.authorizations.append(self.headers["Authorization"])
            try:
                for method, pattern, handler in self.routes:
                    match = re.fullmatch(pattern, url.path)
                    if match and self.command in method:
                        handler(self, match.groupdict(), urllib.parse.parse_qs(url.query), body)
                        return
                with hub._lock:
                    hub.unknown.append((self.command, self.path))
                raise _Failure(404, f"no route for {self.command} {url.path}")
            except _Failure as failure:
                headers = {"X-Error-Code": failure.error_code} if failure.error_code else {}
                headers["X-Error-Message"] = failure.message
                self._json(failure.status, {"error": failure.message, **failure.extra}, headers)

        do_GET = do_POST = do_PUT = do_HEAD = _dispatch

        def _repo(self, params: dict[str, str]) -> Repo:
            repo = hub.repos.get((params.get("type") or "model", urllib.parse.unquote(params["repo"])))
            # Like the Hub, a private repo does not exist for a request without a token.
            if repo is None or (repo.private and not self.headers.get("Authorization", "").startswith("Bearer ")):
                raise _Failure(404, "Repository not found", "RepoNotFound")
            return repo

        def _commit(self, repo: Repo, revision: str) -> Commit:
            commit = repo.resolve(revision)
            if commit is None:
                raise _Failure(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            return commit

        def _require_token(self) -> None:
            if not self.headers.get("Authorization", "").startswith("Bearer "):
                raise _Failure(401, "Invalid credentials in Authorization header")

        # --- routes ---

        def create(self, params: dict[str, str], query: dict[str, list[str]], body: bytes) -> None:
            self._require_token()
            payload = json.loads(body)
            repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
            repo_type = payload.get("type") or "model"
            hub.create_repo(repo_type, repo_id, payload.get("visibility") == "private" or bool(payload.get("private")))
            self._json(200, {"url": hub.repo_url(repo_type, repo_id), "name": repo_id, "id": repo_id})

        def validate_yaml(self, params: dict[str, str], query: dict[str, list[str]], body: bytes) -> None:
            errors = _metadata_errors(json.loads(body).get("content", ""))
            if errors:
                self._json(400, {"errors": [{"message": message} for message in errors]})
            else:
                self._json(200, {"warnings": []})

        def preupload(self, params: dict[str, str], query: dict[str, list[str]], body: bytes) -> None:
            self._require_token()
            repo = self._repo(params)
            head = self._commit(repo, params["rev"])
            answers = []
            for item in json.loads(body)["files"]:
                sample = base64.b64decode(item["sample"])
                lfs = item["path"].endswith(LFS_SUFFIXES) or item["size"] >= LFS_MIN_SIZE or b"\0" in sample
                remote = head.files.get(item["path"])
                # The oid lets the client skip an unchanged file: sha256 for LFS, the git blob id otherwise.
                oid = None if remote is None else (remote.sha256 if remote.lfs else remote.blob_oid)
                answers.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular",
                                "shouldIgnore": False, "oid": oid})
            self._json(200, {"files": answers})

        def lfs_batch(self, params: dict[str, str], query: dict[str, list[str]], body: bytes) -> None:
            self._require_token()
            self._repo(params)
            payload = json.loads(body)
            objects = []
            for item in payload["objects"]:
                answer = {"oid": item["oid"], "size": item["size"], "authenticated": True}
                # An object already stored needs no upload: that is what makes a re-run after a crash cheap.
                if item["oid"] not in hub.lfs_objects:
                    answer["actions"] = {"upload": {"href": f"{hub.endpoint}/lfs-upload/{item['oid']}"}}
                objects.append(answer)
            self._json(200, {"transfer": "basic", "objects": objects},
                       {"Content-Type": "application/vnd.git-lfs+json"})

        def lfs_put(self, params: dict[str, str], query: dict[str, list[str]], body: bytes) -> None:
            if hashlib.sha256(body).hexdigest() != params["oid"]:
                raise _Failure(400, "uploaded content does not match its sha256")
            with hub._lock:
                hub.lfs_objects[params["oid"]] = body
            self._send(200)

        def commit(self, params: dict[str, str], query: dict[str, list[str]], body: bytes) -> None:
            self._require_token()
            repo = self._repo(params)
            with hub._lock:
                failing, hub.fail_commits = hub.fail_commits > 0, max(hub.fail_commits - 1, 0)
            if failing:
                raise _Failure(500, "Internal Error - We're working hard to fix this as soon as possible!")
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            commit = hub.apply_commit(repo, params["rev"], lines)
            self._json(200, {"success": True, "commitOid": commit.oid,
                             "commitUrl": f"{hub.repo_url(repo.repo_type, repo.repo_id)}/commit/{commit.oid}"})

        def info(self, params: dict[str, str], query: dict[str, list[str]], body: bytes) -> None:
            repo = self._repo(params)
            commit = self._commit(repo, params.get("rev") or "main")
            self._json(200, {
                "_id": repo.repo_id, "id": repo.repo_id, "author": repo.repo_id.split("/")[0], "sha": commit.oid,
                "private": repo.private, "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [],
                "lastModified": "2026-01-01T00:00:00.000Z", "createdAt": "2026-01-01T00:00:00.000Z",
                "siblings": [{"rfilename": path, "size": len(stored.content)}
                             for path, stored in sorted(commit.files.items())],
            })

        def settings(self, params: dict[str, str], query: dict[str, list[str]], body: bytes) -> None:
            self._require_token()
            repo = self._repo(params)
            visibility = json.loads(body).get("visibility")
            if visibility not in (None, "private", "public"):
                raise _Failure(400, f"invalid visibility {visibility!r}")
            with hub._lock:
                if visibility is not None:
                    repo.private = visibility == "private"
            self._json(200, {})

        def tree(self, params: dict[str, str], query: dict[str, list[str]], body: bytes) -> None:
            repo = self._repo(params)
            commit = self._commit(repo, params["rev"])
            base = urllib.parse.unquote(params.get("path") or "").strip("/")
            recursive = query.get("recursive", ["False"])[0].lower() in ("1", "true")
            if base and base in commit.files:
                raise _Failure(404, f"{base} is a file, not a folder", "EntryNotFound")
            entries = _entries(commit, base, recursive)
            if base and not entries:
                raise _Failure(404, f"{base} does not exist", "EntryNotFound")
            self._json(200, entries)

        def paths_info(self, params: dict[str, str], query: dict[str, list[str]], body: bytes) -> None:
            repo = self._repo(params)
            commit = self._commit(repo, params["rev"])
            if self.headers.get("Content-Type", "").startswith("application/json"):
                paths = json.loads(body).get("paths", [])
            else:
                paths = urllib.parse.parse_qs(body.decode()).get("paths", [])
            found = []
            for path in paths:
                path = path.strip("/")
                if path in commit.files:
                    found.append(_file_entry(path, commit.files[path]))
                elif any(name.startswith(path + "/") for name in commit.files):
                    found.append({"type": "directory", "oid": git_blob_sha1(path.encode()), "size": 0, "path": path})
            self._json(200, found)

        def agent_harnesses(self, params: dict[str, str], query: dict[str, list[str]], body: bytes) -> None:
            # huggingface_hub's user-agent telemetry fetches this registry; an empty one detects no agent.
            self._json(200, {"standardEnvVars": [], "harnesses": {}})

        def branch(self, params: dict[str, str], query: dict[str, list[str]], body: bytes) -> None:
            self._require_token()
            repo = self._repo(params)
            name = urllib.parse.unquote(params["branch"])
            start = self._commit(repo, (json.loads(body or b"{}").get("startingPoint") or "main"))
            with hub._lock:
                if name in repo.branches:
                    raise _Failure(409, f"Reference already exists: refs/heads/{name}")
                repo.branches[name] = start.oid
            self._json(200, {})

        def refs(self, params: dict[str, str], query: dict[str, list[str]], body: bytes) -> None:
            repo = self._repo(params)
            self._json(200, {"branches": [{"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid}
                                          for name, oid in repo.branches.items()], "tags": [], "converts": []})

        def resolve(self, params: dict[str, str], query: dict[str, list[str]], body: bytes) -> None:
            repo = self._repo(params)
            commit = self._commit(repo, params["rev"])
            path = urllib.parse.unquote(params["path"])
            stored = commit.files.get(path)
            if stored is None:
                raise _Failure(404, f"{path} does not exist at {params['rev']}", "EntryNotFound")
            headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{stored.etag}"', "Accept-Ranges": "bytes"}
            if stored.lfs:
                headers |= {"X-Linked-Etag": f'"{stored.sha256}"', "X-Linked-Size": str(len(stored.content))}
            content, status = stored.content, 200
            ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            if ranged:
                start = int(ranged.group(1))
                end = int(ranged.group(2)) if ranged.group(2) else len(content) - 1
                end = min(end, len(content) - 1)
                headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
                content, status = content[start:end + 1], 206
            self._send(status, content, headers, content_type="application/octet-stream")

    api = rf"/api/{_TYPE}/{_REPO}"
    prefixed = r"/(?:(?P<type>dataset|space)s/)?" + _REPO
    Handler.routes = [
        (("POST",), r"/api/repos/create", Handler.create),
        (("POST",), r"/api/validate-yaml", Handler.validate_yaml),
        (("GET",), r"/api/agent-harnesses", Handler.agent_harnesses),
        (("POST",), rf"{api}/preupload/(?P<rev>[^/]+)", Handler.preupload),
        (("POST",), rf"{api}/commit/(?P<rev>[^/]+)", Handler.commit),
        (("POST",), rf"{api}/paths-info/(?P<rev>[^/]+)", Handler.paths_info),
        (("GET",), rf"{api}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", Handler.tree),
        (("GET",), rf"{api}/refs", Handler.refs),
        (("POST",), rf"{api}/branch/(?P<branch>[^/]+)", Handler.branch),
        (("GET",), rf"{api}/revision/(?P<rev>[^/]+)", Handler.info),
        (("PUT",), rf"{api}/settings", Handler.settings),
        (("GET",), rf"{api}", Handler.info),
        (("POST",), rf"{prefixed}\.git/info/lfs/objects/batch", Handler.lfs_batch),
        (("PUT",), r"/lfs-upload/(?P<oid>[0-9a-f]{64})", Handler.lfs_put),
        (("GET", "HEAD"), rf"{prefixed}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", Handler.resolve),
    ]
    return Handler


def _metadata_errors(readme: str) -> list[str]:
    """What the Hub's validate-yaml would reject, minimally: unparsable front matter and a malformed `configs`."""
    match = re.match(r"^---\n(.*?)\n---\n", readme, flags=re.DOTALL)
    if match is None:
        return []
    try:
        metadata = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError as error:
        return [f"YAML front matter does not parse: {error}"]
    if not isinstance(metadata, dict):
        return ["YAML front matter must be a mapping"]
    errors = []
    configs = metadata.get("configs")
    if configs is not None:
        if not isinstance(configs, list):
            return ['"configs" must be a list']
        names = []
        for index, config in enumerate(configs):
            if not isinstance(config, dict) or not isinstance(config.get("config_name"), str):
                errors.append(f'"configs[{index}].config_name" is required and must be a string')
                continue
            names.append(config["config_name"])
            data_files = config.get("data_files")
            if data_files is None:
                continue
            items = data_files if isinstance(data_files, list) else [data_files]
            for item in items:
                valid = isinstance(item, str) or (
                    isinstance(item, dict) and isinstance(item.get("split"), str)
                    and (isinstance(item.get("path"), str)
                         or (isinstance(item.get("path"), list) and all(isinstance(p, str) for p in item["path"]))))
                if not valid:
                    errors.append(f'"configs[{index}].data_files": expected a path, a list of paths or '
                                  f'{{split, path}} items, got {item!r}')
        if len(set(names)) != len(names):
            errors.append('"configs": config names must be unique')
        if sum(bool(config.get("default")) for config in configs if isinstance(config, dict)) > 1:
            errors.append('"configs": at most one config may be the default')
    if "license" in metadata and not isinstance(metadata["license"], (str, list)):
        errors.append('"license" must be a string or a list of strings')
    return errors
