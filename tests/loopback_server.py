"""Start `yapo-fast serve` on a free loopback port, wait until /health answers, and stop the whole
process group afterwards: shared by tests/test_vllm_serve.py and bench/load_server.py."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def loopback_server(serve_args: list[str], cwd: Path, *, start_timeout_s: float):
    """Yield the base URL of a server started with `yapo-fast serve --port P *serve_args`; its
    output goes to cwd/server.log, whose tail is in the error if it exits or does not start."""
    import httpx

    port = free_port()
    cli = Path(sys.executable).with_name("yapo-fast")
    log_path = Path(cwd) / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [str(cli), "serve", "--port", str(port), *serve_args],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
            env=dict(os.environ, VLLM_LOGGING_LEVEL="WARNING"),
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + start_timeout_s
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()[-6000:]}")
                try:
                    if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.time() > deadline:
                    raise RuntimeError(f"server did not start in {start_timeout_s}s:\n{log_path.read_text()[-6000:]}")
                time.sleep(2)
            yield base
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
