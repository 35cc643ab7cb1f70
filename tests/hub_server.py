"""A weights server on 127.0.0.1 for the download tests: the Hugging Face Hub's resolve endpoint and plain files.

huggingface_hub's file download sends ``HEAD /<org>/<repo>/resolve/<rev>/<file>`` and needs the
``X-Repo-Commit`` and ``ETag`` headers (``Content-Length`` gives the size it checks), then a ``GET`` of
the same URL (huggingface_hub 1.x/2.x ``file_download.get_hf_file_metadata`` / ``http_get``). For a large
(LFS) file the Hub's ETag is the file's SHA-256, as here. ``torch.hub.download_url_to_file`` sends one ``GET``.
Missing repos answer 404 with ``X-Error-Code: RepoNotFound``, as the Hub does.

The server listens on loopback only, in a daemon thread, and shuts itself down after ``lifetime`` seconds
even if a test forgets to stop it.
"""

from __future__ import annotations

import hashlib
import io
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Literal

import pytest
import torch

COMMIT = "0123456789abcdef0123456789abcdef01234567"
Mode = Literal["ok", "short", "corrupt", "drop"]


class WeightsServer:
    """Files served at paths; ``mode`` per path: ``ok``, ``short`` (GET body and length halved: the size differs
    from HEAD's), ``corrupt`` (bytes changed, same length), ``drop`` (connection closed mid-body)."""

    def __init__(self, lifetime: float = 120.0) -> None:
        self.files: dict[str, tuple[bytes, Mode]] = {}
        self.requests: list[tuple[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 10

            def log_message(self, *args: object) -> None:  # keep the test output clean
                pass

            def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
                server._answer(self, head=True)

            def do_GET(self) -> None:  # noqa: N802
                server._answer(self, head=False)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # offline-ok: local server
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._timer = threading.Timer(lifetime, self.stop)
        self._timer.daemon = True

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> WeightsServer:
        self._thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        self._timer.cancel()
        self._httpd.shutdown()
        self._httpd.server_close()

    def add(self, path: str, data: bytes, mode: Mode = "ok") -> str:
        """Serve ``data`` at ``path``; returns its full URL."""
        self.files[path] = (data, mode)
        return self.url + path

    def add_hf(self, repo_id: str, data: bytes, filename: str = "model.safetensors", mode: Mode = "ok") -> str:
        return self.add(f"/{repo_id}/resolve/main/{filename}", data, mode)

    def gets(self, path_part: str) -> int:
        return sum(1 for method, path in self.requests if method == "GET" and path_part in path)

    def _answer(self, handler: BaseHTTPRequestHandler, head: bool) -> None:
        path = handler.path.split("?")[0]
        self.requests.append(("HEAD" if head else "GET", path))
        if path not in self.files:
            handler.send_response(404)
            if "/resolve/" in path:
                repo = path.split("/resolve/")[0]
                known = any(p.startswith(repo + "/resolve/") for p in self.files)
                handler.send_header("X-Error-Code", "EntryNotFound" if known else "RepoNotFound")
                if known:
                    handler.send_header("X-Repo-Commit", COMMIT)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        data, mode = self.files[path]
        body = data
        if not head and mode == "short":
            body = data[: len(data) // 2]
        elif not head and mode == "corrupt":
            middle = len(data) // 2
            body = data[:middle] + bytes(b ^ 0xFF for b in data[middle : middle + 64]) + data[middle + 64 :]
        handler.send_response(200)
        handler.send_header("Content-Type", "application/octet-stream")
        handler.send_header("Content-Length", str(len(body)))
        handler.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        handler.send_header("X-Repo-Commit", COMMIT)
        handler.end_headers()
        if head:
            return
        if mode == "drop":
            handler.wfile.write(body[: len(body) // 2])
            handler.close_connection = True
            return
        handler.wfile.write(body)


@contextmanager
def serving(lifetime: float = 120.0) -> Iterator[WeightsServer]:
    """A started :class:`WeightsServer`, stopped on exit."""
    server = WeightsServer(lifetime).start()
    try:
        yield server
    finally:
        server.stop()


def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refuse every socket connection except to 127.0.0.1: nothing leaves the machine."""
    connect = socket.socket.connect

    def guarded(self: socket.socket, address: object) -> None:
        if not (isinstance(address, tuple) and address[0] in ("127.0.0.1", "localhost")):
            raise OSError(f"network access outside the local test server: {address!r}")
        connect(self, address)  # offline-ok: local server

    monkeypatch.setattr(socket.socket, "connect", guarded)


def use_hub(monkeypatch: pytest.MonkeyPatch, endpoint: str, cache: Path, offline: bool = False) -> None:
    """Point huggingface_hub at ``endpoint`` with the cache ``cache``.

    huggingface_hub reads ``HF_ENDPOINT``, ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` once, when
    ``huggingface_hub.constants`` is imported; in a running process its constants are what counts
    (``test_env_variables_in_a_fresh_process`` covers the variables themselves).
    """
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)


def safetensors_bytes(state_dict: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().clone().contiguous() for k, v in state_dict.items()})


def torch_bytes(state_dict: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    return buffer.getvalue()


def hashed_name(stem: str, data: bytes, suffix: str = ".pth") -> str:
    """``<stem>-<sha256[:8]><suffix>``: the file-name convention torch.hub checks."""
    return f"{stem}-{hashlib.sha256(data).hexdigest()[:8]}{suffix}"


def randomize_norms(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (fresh BNs are identities in eval mode and
    would hide a wrong eps or statistics that did not load); returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()


def cached_files(folder: Path) -> list[Path]:
    """Every file (not folder) under ``folder``, lock files excluded."""
    return [p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".lock")] if folder.exists() else []
