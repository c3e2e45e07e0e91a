"""A hub-compatible server on loopback for tests: olah (PyPI) serving local git repositories laid
out as on the hub (``mirrors-path``), behind a thin front that answers as the hub does where olah
does not, and that the tests read back.

The real ``huggingface_hub``, ``datasets`` and ``transformers`` clients talk to it through
``HF_ENDPOINT``; nothing of theirs is mocked. The front:

- answers a missing file of an existing repository (olah: 401 "RepoNotFound" or a 500) with the
  hub's 404 and ``X-Error-Code: EntryNotFound``, which transformers reads as "optional file not
  there" when it probes ``tokenizer.model`` and the like;
- gates repositories: without ``Authorization: Bearer <token>`` a gated repository answers 401,
  with a wrong token 403, both with ``X-Error-Code: GatedRepo`` as the hub does;
- counts requests per (method, path) and keeps every request's headers, so a test can tell how
  often a file was downloaded and whether a token was sent.

Repositories are plain git repositories (no LFS) under ``root/mirrors/{models,datasets}/org/name``;
``add_model`` and ``add_dataset`` write and commit them.
"""

from __future__ import annotations

import collections
import http.client
import http.server
import json
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from cluster_util import free_ports, stop_group, wait_for_port

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
              "proxy-authorization", "proxy-authenticate", "content-length"}
# The repository a request is about: /api/{models,datasets}/org/name/..., /datasets/org/name/...
# (dataset files) or /org/name/... (model files).
API = re.compile(r"^/api/(models|datasets)/([^/]+)/([^/?]+)")
DATASET_FILE = re.compile(r"^/datasets/([^/]+)/([^/?]+)/")
MODEL_FILE = re.compile(r"^/([^/]+)/([^/?]+)/(resolve|raw)/")


def commit_all(folder: Path, message: str) -> str:
    """Commit everything in ``folder`` (a git repository made here when it is not one); its sha."""
    env = {"GIT_AUTHOR_NAME": "qsweep-tests", "GIT_AUTHOR_EMAIL": "tests@qsweep.invalid",
           "GIT_COMMITTER_NAME": "qsweep-tests", "GIT_COMMITTER_EMAIL": "tests@qsweep.invalid",
           "PATH": "/usr/bin:/bin"}
    if not (folder / ".git").exists():
        subprocess.run(["git", "init", "-q", "-b", "main"], cwd=folder, check=True, env=env)
    subprocess.run(["git", "add", "-A"], cwd=folder, check=True, env=env)
    subprocess.run(["git", "commit", "-q", "--allow-empty", "-m", message], cwd=folder, check=True, env=env)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, check=True, env=env,
                          capture_output=True, text=True).stdout.strip()


def dataset_card(configs: dict[str, dict[str, str]]) -> str:
    """A README whose ``configs:`` front matter names each config's split files, as the hub's
    parquet datasets do."""
    lines = ["---", "configs:"]
    for i, (config, splits) in enumerate(configs.items()):
        lines.append(f"- config_name: {config}")
        if i == 0 and config == "default":
            lines.append("  default: true")
        lines.append("  data_files:")
        for split, pattern in splits.items():
            lines += [f"  - split: {split}", f"    path: {pattern}"]
    return "\n".join(lines + ["---", "", "A test dataset served by tests/hub_server.py.", ""])


class HubServer:
    """olah plus the front; ``endpoint`` is what ``HF_ENDPOINT`` is set to. Start with ``start()``
    (or as a context manager), stop with ``stop()``; repositories can be added while it runs."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.mirrors = self.root / "mirrors"
        self.gated: dict[str, str] = {}  # repo id -> the token that opens it
        self.commits: dict[str, str] = {}  # repo id -> its latest commit
        self.requests: collections.Counter[tuple[str, str]] = collections.Counter()
        self.headers: list[tuple[str, str, dict[str, str]]] = []  # (method, path, headers lowercased)
        self._lock = threading.Lock()
        self._olah: subprocess.Popen | None = None
        self._front: http.server.ThreadingHTTPServer | None = None
        self.port = self.olah_port = 0

    # -- repositories ------------------------------------------------------------------------
    def repo_folder(self, kind: str, repo_id: str) -> Path:
        folder = self.mirrors / kind / repo_id
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def exists(self, kind: str, repo_id: str) -> bool:
        return (self.mirrors / kind / repo_id / ".git").exists()

    def add_model(self, repo_id: str, source: Path, gated_token: str | None = None) -> str:
        """Serve the files of ``source`` (a saved model folder) as model ``repo_id``; its commit."""
        folder = self.repo_folder("models", repo_id)
        for item in Path(source).iterdir():
            if item.is_file():
                (folder / item.name).write_bytes(item.read_bytes())
        if gated_token is not None:
            self.gated[repo_id] = gated_token
        self.commits[repo_id] = commit_all(folder, f"add {repo_id}")
        return self.commits[repo_id]

    def add_dataset(self, repo_id: str, splits: dict[str, dict[str, list[dict[str, Any]]]],
                    gated_token: str | None = None) -> str:
        """Serve ``{config: {split: records}}`` as dataset ``repo_id`` in the hub's parquet layout
        (``{config}/{split}-00000-of-00001.parquet`` and a card naming them); its commit."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        folder = self.repo_folder("datasets", repo_id)
        configs: dict[str, dict[str, str]] = {}
        for config, by_split in splits.items():
            for split, records in by_split.items():
                name = f"{config}/{split}-00000-of-00001.parquet"
                (folder / config).mkdir(parents=True, exist_ok=True)
                pq.write_table(pa.Table.from_pylist(records), folder / name)
                configs.setdefault(config, {})[split] = name
        (folder / "README.md").write_text(dataset_card(configs))
        if gated_token is not None:
            self.gated[repo_id] = gated_token
        return commit_all(folder, f"add {repo_id}")

    def add_files(self, repo_id: str, files: dict[str, bytes], card: str) -> str:
        """Serve raw files (e.g. json.gz shards) as dataset ``repo_id`` with the README ``card``."""
        folder = self.repo_folder("datasets", repo_id)
        for name, data in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
        (folder / "README.md").write_text(card)
        return commit_all(folder, f"add {repo_id}")

    # -- what the clients asked --------------------------------------------------------------
    def count(self, method: str, pattern: str) -> int:
        """Requests of ``method`` whose path matches the regular expression ``pattern``."""
        with self._lock:
            return sum(n for (m, path), n in self.requests.items() if m == method and re.search(pattern, path))

    # -- running -----------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> HubServer:
        self.port, self.olah_port = free_ports(2)
        self.mirrors.mkdir(parents=True, exist_ok=True)
        config = self.root / "olah.toml"
        config.write_text(
            "[basic]\n"
            f'host = "127.0.0.1"\nport = {self.olah_port}\n'
            f'repos-path = "{self.root / "olah-cache"}"\n'
            f'mirrors-path = ["{self.mirrors}"]\n'
            # its redirects and links point at the front, as the hub's point at itself
            f'mirror-netloc = "127.0.0.1:{self.port}"\nmirror-lfs-netloc = "127.0.0.1:{self.port}"\n'
            "metadata-cache-ttl = 0\n"
            "[accessibility]\noffline = true\n")
        olah_cli = Path(sys.executable).with_name("olah-cli")
        log = open(self.root / "olah.log", "ab")
        self._olah = subprocess.Popen([str(olah_cli), "-c", str(config)], cwd=self.root, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        wait_for_port(self.olah_port, 60, self._olah)
        self._front = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self._front.daemon_threads = True
        threading.Thread(target=self._front.serve_forever, name="hub-front", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._front is not None:
            self._front.shutdown()
            self._front.server_close()
            self._front = None
        if self._olah is not None:
            stop_group(self._olah, grace_s=5)
            self._olah = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- the front ---------------------------------------------------------------------------
    def repo_of(self, path: str) -> tuple[str, str] | None:
        """(kind, repo id) a request path is about, or None (e.g. ``/api/whoami-v2``)."""
        if match := API.match(path):
            return match.group(1), f"{match.group(2)}/{match.group(3)}"
        if match := DATASET_FILE.match(path):
            return "datasets", f"{match.group(1)}/{match.group(2)}"
        if match := MODEL_FILE.match(path):
            return "models", f"{match.group(1)}/{match.group(2)}"
        return None

    def refusal(self, repo: tuple[str, str] | None, headers: Any) -> tuple[int, str] | None:
        """The hub's answer to a gated repository asked without (401) or with a wrong (403) token."""
        if repo is None or repo[1] not in self.gated:
            return None
        sent = headers.get("Authorization", "")
        if sent == f"Bearer {self.gated[repo[1]]}":
            return None
        kind = "model" if repo[0] == "models" else "dataset"
        message = (f"Access to {kind} {repo[1]} is restricted. You must have access to it and be "
                   "authenticated to access it. Please log in.")
        return (403 if sent else 401), message

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        server = self

        class Front(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet: the counts are the record
                pass

            def do_GET(self) -> None:
                self.forward()

            def do_HEAD(self) -> None:
                self.forward()

            def do_POST(self) -> None:
                self.forward()

            def answer(self, status: int, code: str, message: str) -> None:
                body = json.dumps({"error": message}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", message)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def forward(self) -> None:
                path = self.path.split("?", 1)[0]
                with server._lock:
                    server.requests[(self.command, path)] += 1
                    server.headers.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
                repo = server.repo_of(path)
                if refused := server.refusal(repo, self.headers):
                    self.answer(refused[0], "GatedRepo", refused[1])
                    return
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP | {"host"}}
                upstream = http.client.HTTPConnection("127.0.0.1", server.olah_port, timeout=120)
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    missing = (repo is not None and server.exists(*repo) and response.status in (401, 500)
                               and ("/resolve/" in path or "/tree/" in path or "/paths-info/" in path))
                    if missing:  # the repository is there, the file is not: the hub says 404
                        response.read()
                        self.answer(404, "EntryNotFound", f"Entry not found: {path}")
                        return
                    self.relay(response)
                finally:
                    upstream.close()

            def relay(self, response: http.client.HTTPResponse) -> None:
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in HOP_BY_HOP:
                        self.send_header(key, value)
                if self.command == "HEAD":
                    size = response.getheader("Content-Length")
                    if size is not None:
                        self.send_header("Content-Length", size)
                    self.end_headers()
                    response.read()
                    return
                size = response.getheader("Content-Length")
                if size is not None:
                    self.send_header("Content-Length", size)
                    self.end_headers()
                    while chunk := response.read(1 << 20):
                        self.wfile.write(chunk)
                    return
                # no length known (olah streams): relay it chunked as it comes, so that a large
                # file's first bytes reach the client within its read timeout
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                try:
                    while chunk := response.read1(1 << 20):
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.write(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):  # the client went away
                    self.close_connection = True

        return Front

