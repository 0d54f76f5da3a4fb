"""Run a `vllm serve` (or any command that starts one) as a child process on a
free loopback port, wait until it answers, and always stop it by its own pid.

Used by the tests, the benchmarks and the demo's smoke test, so there is one way
to start and stop a server.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_serve(model: str, *args: str, port: int) -> list[str]:
    """The `vllm serve` command of this environment, bound to loopback."""
    return [str(Path(sys.executable).with_name("vllm")), "serve", model, "--host", "127.0.0.1", "--port", str(port), *args]


class ServerProcess:
    """``with ServerProcess(lambda port: cmd, log) as srv:`` ... ``srv.url``.

    The server runs in its own session so that stopping it (SIGTERM, then SIGKILL
    after ``grace`` seconds) reaches its engine and worker processes too.
    """

    def __init__(self, command, log_path: Path, env: dict[str, str] | None = None, timeout: float = 600,
                 grace: float = 60, api_key: str | None = None) -> None:
        self.api_key = api_key  # sent while waiting for the server (a server started with --api-key)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd: list[str] = command(self.port)
        # vLLM's production process layout (API server, engine core, workers) unless
        # the caller asks otherwise: an in-process engine setting inherited from a
        # test or script must not reach a server.
        inherited = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
        self.env = {**inherited, **(env or {})}
        self.log_path = Path(log_path)
        self.timeout, self.grace = timeout, grace
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ServerProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)
        deadline = time.monotonic() + self.timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"server did not answer within {self.timeout}s:\n{self.log_tail()}")
            try:
                headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
                request = urllib.request.Request(self.url + "/v1/models", headers=headers)
                with urllib.request.urlopen(request, timeout=5) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(1)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(self.grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def __enter__(self) -> "ServerProcess":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, chars: int = 5000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def metrics(self) -> str:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        with urllib.request.urlopen(urllib.request.Request(self.url + "/metrics", headers=headers), timeout=5) as r:
            return r.read().decode()
