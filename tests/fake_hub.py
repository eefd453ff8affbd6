"""An in-process fake of the Hugging Face Hub, for offline tests of uploads and downloads.

:class:`FakeHub` keeps model and dataset repositories in memory (every commit is a full snapshot of the tree, so
any past revision can be served) and answers the HTTP endpoints that ``huggingface_hub`` 2.4 uses for
``create_repo``, ``create_commit``/``upload_folder`` (preupload + NDJSON commit with base64-inlined files),
``create_branch``, ``repo_info``, ``list_repo_tree``, ``get_paths_info``, ``hf_hub_download`` and
``snapshot_download``.  It is installed with ``huggingface_hub.set_client_factory`` and an ``httpx2.MockTransport``,
so no socket is opened.  Every request is recorded (method, path, ``Authorization`` header) in :attr:`FakeHub.log`.

Repositories created without a token are public; a private repository is only served to requests carrying one of
the tokens that wrote to it (401 otherwise, as the Hub answers for private repos).  The state can be written to a
JSON file (:meth:`FakeHub.dump`) and read back in another process (:meth:`FakeHub.load`), which is how tests load
pushed repos in a fresh Python process::

    hub = FakeHub.load(path); hub.install()

Use the :func:`fake_hub` pytest fixture in tests: it also points the Hugging Face cache and token files at a
temporary folder and switches offline mode off for the test.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

import httpx2
import pytest

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
_ACTIONS = {"preupload", "commit", "tree", "revision", "paths-info", "branch", "refs", "resolve"}


def git_blob_oid(content: bytes) -> str:
    """The git object id of a blob (what the Hub reports as a regular file's oid)."""
    return hashlib.sha1(b"blob %d\x00" % len(content) + content).hexdigest()


@dataclass
class Commit:
    oid: str
    message: str
    files: dict[str, bytes]
    parent: str | None = None
    created: float = field(default_factory=time.time)


@dataclass
class Repo:
    repo_type: str  # "model" or "dataset"
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    owner_tokens: set[str] = field(default_factory=set)

    def resolve(self, revision: str) -> Commit | None:
        if revision in self.refs:
            return self.commits[self.refs[revision]]
        if len(revision) >= 7:
            matches = [c for oid, c in self.commits.items() if oid.startswith(revision)]
            if len(matches) == 1:
                return matches[0]
        return None


@dataclass
class Request:
    method: str
    path: str
    authorization: str | None
    query: dict[str, list[str]]


class FakeHub:
    """In-memory Hub.  ``hub.handler`` is the ``httpx2.MockTransport`` handler."""

    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], Repo] = {}
        self.log: list[Request] = []
        self.unhandled: list[str] = []

    # -- installation ----------------------------------------------------------------------------------------
    def client(self) -> httpx2.Client:
        """A client like huggingface_hub's default one (offline-mode hook included), talking to this fake."""
        from huggingface_hub.utils._http import hf_request_event_hook

        return httpx2.Client(transport=httpx2.MockTransport(self.handler),
                             event_hooks={"request": [hf_request_event_hook]}, follow_redirects=True, timeout=None)

    def install(self) -> None:
        """Route every huggingface_hub request of this process to this fake."""
        import huggingface_hub

        huggingface_hub.set_client_factory(self.client)

    # -- inspection helpers ----------------------------------------------------------------------------------
    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.repos[(repo_type, repo_id)]

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """The files of a repo at a revision (branch or commit)."""
        commit = self.repo(repo_id, repo_type).resolve(revision)
        assert commit is not None, f"no revision {revision!r} in {repo_id}"
        return dict(commit.files)

    def commits(self, repo_id: str, repo_type: str = "model") -> list[Commit]:
        """Commits in creation order (the first one is the repo's initial commit)."""
        return sorted(self.repo(repo_id, repo_type).commits.values(), key=lambda c: c.created)

    def authorizations(self) -> set[str]:
        return {r.authorization for r in self.log if r.authorization}

    def put_file(self, repo_id: str, path: str, content: bytes, repo_type: str = "model") -> str:
        """Commit one file directly (bypassing the client), e.g. to tamper with a repo in a test."""
        repo = self.repo(repo_id, repo_type)
        files = dict(repo.resolve("main").files)
        files[path] = content
        return self._commit(repo, "main", files, f"put {path}").oid

    # -- persistence -----------------------------------------------------------------------------------------
    def dump(self, path: str | os.PathLike) -> None:
        """Write every repo (all commits and refs) to a JSON file."""
        def commit(c: Commit) -> dict[str, Any]:
            return {"oid": c.oid, "message": c.message, "parent": c.parent, "created": c.created,
                    "files": {p: base64.b64encode(b).decode() for p, b in c.files.items()}}

        state = [{"repo_type": r.repo_type, "repo_id": r.repo_id, "private": r.private, "refs": r.refs,
                  "owner_tokens": sorted(r.owner_tokens), "commits": [commit(c) for c in r.commits.values()]}
                 for r in self.repos.values()]
        Path(path).write_text(json.dumps(state))

    @classmethod
    def load(cls, path: str | os.PathLike) -> FakeHub:
        hub = cls()
        for r in json.loads(Path(path).read_text()):
            repo = Repo(r["repo_type"], r["repo_id"], r["private"], refs=dict(r["refs"]),
                        owner_tokens=set(r["owner_tokens"]))
            for c in r["commits"]:
                repo.commits[c["oid"]] = Commit(c["oid"], c["message"],
                                                {p: base64.b64decode(b) for p, b in c["files"].items()},
                                                c["parent"], c["created"])
            hub.repos[(repo.repo_type, repo.repo_id)] = repo
        return hub

    # -- HTTP ------------------------------------------------------------------------------------------------
    def handler(self, request: httpx2.Request) -> httpx2.Response:
        raw = request.url.raw_path.decode().split("?", 1)[0]
        segments = [unquote(s) for s in raw.strip("/").split("/")]
        auth = request.headers.get("authorization")
        self.log.append(Request(request.method, "/" + "/".join(segments), auth,
                                parse_qs(request.url.query.decode() if isinstance(request.url.query, bytes)
                                         else str(request.url.query))))
        try:
            return self._route(request, segments, auth)
        except _HubError as err:
            return err.response()

    def _route(self, request: httpx2.Request, seg: list[str], auth: str | None) -> httpx2.Response:
        method = request.method
        if seg[:1] == ["api"]:
            rest = seg[1:]
            if rest == ["agent-harnesses"]:
                return httpx2.Response(404, json={"error": "not found"})
            if rest == ["whoami-v2"] and method == "GET":
                if not auth:
                    raise _HubError(401, "Invalid credentials in Authorization header")
                return httpx2.Response(200, json={"type": "user", "name": "user", "fullname": "Test User",
                                                  "orgs": [], "auth": {"type": "access_token",
                                                                       "accessToken": {"role": "write"}}})
            if rest == ["repos", "create"] and method == "POST":
                return self._create_repo(request, auth)
            if rest == ["validate-yaml"] and method == "POST":
                return self._validate_yaml(json.loads(request.content or b"{}").get("content", ""))
            if rest[:1] in (["models"], ["datasets"]) and len(rest) >= 2:
                return self._repo_api(request, "model" if rest[0] == "models" else "dataset", rest[1:], auth)
        else:
            repo_type, rest = ("dataset", seg[1:]) if seg[:1] == ["datasets"] else ("model", seg)
            if "resolve" in rest and method in ("GET", "HEAD"):
                i = rest.index("resolve")
                repo = self._get_repo(repo_type, "/".join(rest[:i]), auth)
                commit = self._revision(repo, rest[i + 1] if len(rest) > i + 1 else "main")
                return self._resolve(request, repo, commit, "/".join(rest[i + 2:]))
        self.unhandled.append(f"{method} /{'/'.join(seg)}")
        return httpx2.Response(501, json={"error": f"fake hub: unhandled {method} /{'/'.join(seg)}"})

    # -- endpoints -------------------------------------------------------------------------------------------
    def _create_repo(self, request: httpx2.Request, auth: str | None) -> httpx2.Response:
        payload = json.loads(request.content)
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
        url = f"{_host(request)}/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"
        if (repo_type, repo_id) in self.repos:
            return httpx2.Response(409, json={"error": "You already created this repo", "url": url})
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repo = Repo(repo_type, repo_id, private, owner_tokens={auth} if auth else set())
        self.repos[(repo_type, repo_id)] = repo
        self._commit(repo, "main", {".gitattributes": GITATTRIBUTES}, "initial commit")
        return httpx2.Response(200, json={"url": url, "name": repo_id, "id": uuid.uuid4().hex})

    @staticmethod
    def _validate_yaml(content: str) -> httpx2.Response:
        """Reject what the real Hub rejects and matters here: a ``base_model`` that is not a model id."""
        import yaml

        if content.startswith("---"):
            meta = yaml.safe_load(content.split("---", 2)[1]) or {}
            bases = meta.get("base_model") or []
            for base in [bases] if isinstance(bases, str) else bases:
                if base.startswith(("/", ".", "~")) or base.count("/") > 1:
                    return httpx2.Response(400, json={"error": f'"base_model" with value "{base}" is not valid'})
        return httpx2.Response(200, json={"errors": [], "warnings": []})

    def _repo_api(self, request: httpx2.Request, repo_type: str, seg: list[str],
                  auth: str | None) -> httpx2.Response:
        for n in (2, 1):
            if len(seg) == n or (len(seg) > n and seg[n] in _ACTIONS):
                repo_id, action, args = "/".join(seg[:n]), seg[n] if len(seg) > n else None, seg[n + 1:]
                break
        else:
            raise _HubError(404, "Repository not found", "RepoNotFound")
        repo = self._get_repo(repo_type, repo_id, auth)
        method = request.method
        if action is None and method == "GET":
            return self._info(request, repo, self._revision(repo, "main"))
        if action == "revision" and method == "GET":
            return self._info(request, repo, self._revision(repo, "/".join(args)))
        if action == "tree" and method == "GET":
            commit = self._revision(repo, args[0] if args else "main")
            prefix = "/".join(args[1:])
            recursive = request.url.params.get("recursive", "false").lower() == "true"
            return httpx2.Response(200, json=_tree(commit.files, prefix, recursive))
        if action == "paths-info" and method == "POST":
            commit = self._revision(repo, args[0] if args else "main")
            form = parse_qs(request.content.decode())
            wanted = form.get("paths", [])
            entries = [e for e in _tree(commit.files, "", True) if e["path"] in wanted]
            return httpx2.Response(200, json=entries)
        self._require_write(repo, auth)
        if action == "preupload" and method == "POST":
            commit = repo.resolve(args[0] if args else "main")
            existing = commit.files if commit is not None else {}
            files = json.loads(request.content)["files"]
            return httpx2.Response(200, json={"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                 "oid": git_blob_oid(existing[f["path"]]) if f["path"] in existing else None} for f in files]})
        if action == "commit" and method == "POST":
            return self._commit_endpoint(request, repo, args[0] if args else "main")
        if action == "branch" and method == "POST":
            branch = "/".join(args)
            if branch in repo.refs:
                raise _HubError(409, "Branch already exists")
            start = (json.loads(request.content or b"{}") or {}).get("startingPoint") or "main"
            repo.refs[branch] = self._revision(repo, start).oid
            return httpx2.Response(200, json={})
        self.unhandled.append(f"{method} {request.url.path}")
        return httpx2.Response(501, json={"error": f"fake hub: unhandled {method} {request.url.path}"})

    def _commit_endpoint(self, request: httpx2.Request, repo: Repo, revision: str) -> httpx2.Response:
        if request.url.params.get("create_pr"):
            raise _HubError(400, "fake hub: pull requests are not supported")
        lines = [json.loads(line) for line in request.content.decode().splitlines() if line.strip()]
        header = lines[0]["value"]
        if revision not in repo.refs:
            raise _HubError(404, f"Revision {revision} not found", "RevisionNotFound")
        head = repo.commits[repo.refs[revision]]
        if header.get("parentCommit") and header["parentCommit"] != head.oid:
            raise _HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(head.files)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                content = base64.b64decode(value["content"]) if value.get("encoding") == "base64" \
                    else value["content"].encode()
                if value["path"] == "README.md":
                    check = self._validate_yaml(content.decode())
                    if check.status_code != 200:
                        return check
                files[value["path"]] = content
            elif key == "deletedFile":
                if value["path"] not in files:
                    raise _HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                del files[value["path"]]
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: b for p, b in files.items() if not p.startswith(prefix)}
            else:
                raise _HubError(400, f"fake hub: unsupported commit operation {key!r} (only regular uploads)")
        commit = self._commit(repo, revision, files, header.get("summary", ""))
        prefix = "datasets/" if repo.repo_type == "dataset" else ""
        return httpx2.Response(200, json={"commitUrl": f"{_host(request)}/{prefix}{repo.repo_id}/commit/{commit.oid}",
                                          "commitOid": commit.oid, "pullRequestUrl": None, "success": True})

    def _info(self, request: httpx2.Request, repo: Repo, commit: Commit) -> httpx2.Response:
        return httpx2.Response(200, json={
            "id": repo.repo_id, "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
            "author": repo.repo_id.split("/")[0], "sha": commit.oid, "private": repo.private,
            "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [],
            "lastModified": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(commit.created)),
            "siblings": [{"rfilename": p, "size": len(b)} for p, b in sorted(commit.files.items())]})

    @staticmethod
    def _resolve(request: httpx2.Request, repo: Repo, commit: Commit, path: str) -> httpx2.Response:
        if path not in commit.files:
            raise _HubError(404, "Entry not found", "EntryNotFound")
        content = commit.files[path]
        headers = {"ETag": f'"{git_blob_oid(content)}"', "X-Repo-Commit": commit.oid,
                   "Content-Length": str(len(content)), "Content-Type": "application/octet-stream"}
        if request.method == "HEAD":
            return httpx2.Response(200, headers=headers)
        start = 0
        if request.headers.get("range", "").startswith("bytes="):
            start = int(request.headers["range"][6:].split("-")[0] or 0)
            headers["Content-Length"] = str(len(content) - start)
            return httpx2.Response(206, headers=headers, content=content[start:])
        return httpx2.Response(200, headers=headers, content=content)

    # -- internals -------------------------------------------------------------------------------------------
    def _get_repo(self, repo_type: str, repo_id: str, auth: str | None) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise _HubError(404, "Repository not found", "RepoNotFound")
        if repo.private and auth not in repo.owner_tokens:
            raise _HubError(401, "Repository not found", "RepoNotFound")
        return repo

    @staticmethod
    def _require_write(repo: Repo, auth: str | None) -> None:
        if repo.owner_tokens and auth not in repo.owner_tokens:
            raise _HubError(403, "You don't have the rights to write to this repo")

    @staticmethod
    def _revision(repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    @staticmethod
    def _commit(repo: Repo, branch: str, files: dict[str, bytes], message: str) -> Commit:
        parent = repo.refs.get(branch)
        digest = hashlib.sha1(f"{repo.repo_id}|{parent}|{message}|{time.time_ns()}|{uuid.uuid4()}".encode())
        for path in sorted(files):
            digest.update(path.encode() + b"\x00" + git_blob_oid(files[path]).encode())
        commit = Commit(digest.hexdigest(), message, files, parent)
        repo.commits[commit.oid] = commit
        repo.refs[branch] = commit.oid
        return commit


class _HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code

    def response(self) -> httpx2.Response:
        headers = {"X-Error-Message": self.message}
        if self.code:
            headers["X-Error-Code"] = self.code
        return httpx2.Response(self.status, headers=headers, json={"error": self.message})


def _host(request: httpx2.Request) -> str:
    return f"{request.url.scheme}://{request.url.netloc.decode()}"


def _tree(files: dict[str, bytes], prefix: str, recursive: bool) -> list[dict[str, Any]]:
    """Tree entries (files and folders) under ``prefix``, as ``/api/.../tree`` lists them."""
    prefix = prefix.strip("/")
    base = prefix + "/" if prefix else ""
    entries: dict[str, dict[str, Any]] = {}
    for path, content in sorted(files.items()):
        if not path.startswith(base):
            continue
        parts = path[len(base):].split("/")
        for depth in range(1, len(parts)):
            folder = base + "/".join(parts[:depth])
            if recursive or depth == 1:
                entries.setdefault(folder, {"type": "directory", "path": folder,
                                            "oid": hashlib.sha1(folder.encode()).hexdigest(), "size": 0})
        if recursive or len(parts) == 1:
            entries[path] = {"type": "file", "path": path, "oid": git_blob_oid(content), "size": len(content)}
    return list(entries.values())


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    """A fresh :class:`FakeHub` serving every huggingface_hub request of the test, with an empty temporary
    Hugging Face home (cache, no stored token) and offline mode switched off; everything is restored afterwards.
    """
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    home = tmp_path_factory.mktemp("hf_home")
    cache = home / "hub"
    for name, value in {"HF_HOME": home, "HF_HUB_CACHE": cache, "HUGGINGFACE_HUB_CACHE": cache}.items():
        monkeypatch.setenv(name, str(value))
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    # huggingface_hub reads these when it is imported: patch the module constants too.
    for name, value in {"HF_HOME": str(home), "HF_HUB_CACHE": str(cache), "HUGGINGFACE_HUB_CACHE": str(cache),
                        "HF_TOKEN_PATH": str(home / "token"), "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
                        "HF_HUB_OFFLINE": False}.items():
        monkeypatch.setattr(constants, name, value, raising=False)
    previous = _http._GLOBAL_CLIENT_FACTORY
    hub = FakeHub()
    hub.install()
    try:
        yield hub
    finally:
        huggingface_hub.set_client_factory(previous)


def subprocess_env(hub: FakeHub, state_file: str | os.PathLike, hf_home: str | os.PathLike) -> dict[str, str]:
    """Environment for a fresh Python process that serves ``hub`` (dumped to ``state_file``): see
    :func:`install_from_env`."""
    hub.dump(state_file)
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update({"FAKE_HUB_STATE": str(state_file), "HF_HOME": str(hf_home),
                "HF_HUB_CACHE": str(Path(hf_home) / "hub"), "HF_HUB_DISABLE_PROGRESS_BARS": "1"})
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    return env


def install_from_env() -> FakeHub:
    """In a subprocess started with :func:`subprocess_env`: load the dumped fake Hub and install it."""
    hub = FakeHub.load(os.environ["FAKE_HUB_STATE"])
    hub.install()
    return hub
