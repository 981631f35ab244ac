"""One real server per test module: `python -m atom.entrypoints.openai_server` as a subprocess.

The fixture waits for /health, and on teardown sends a signal and checks that the server exited
and left no child process (the engine core) behind.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

API_KEY = "test-key"
MODEL_NAME = "tiny"
STARTUP_TIMEOUT_S = 180.0
MAX_MODEL_LEN = 256
# Role-tagged so that tests can see which template rendered a prompt.
TOKENIZER_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
SERVER_TEMPLATE = (
    "{{ greeting | default('') }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}"
    "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
)


def make_tiny_model(path: Path) -> Path:
    """A 1-layer Llama with a character-level tokenizer (printable ASCII; '~' is EOS)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    vocab = {chr(c): i for i, c in enumerate(range(32, 127))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=" "))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="~")
    tokenizer.chat_template = TOKENIZER_TEMPLATE
    tokenizer.save_pretrained(path)
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(vocab),
        max_position_embeddings=256,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> set[int]:
    """All live descendants of pid, from /proc (psutil is not a dependency)."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        current = todo.pop()
        task_dir = Path(f"/proc/{current}/task")
        if not task_dir.is_dir():
            continue
        for task in task_dir.iterdir():
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                if child not in found:
                    found.add(child)
                    todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class ServerProcess:
    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "atom.entrypoints.openai_server", "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), *args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop(signal.SIGKILL)
        raise RuntimeError(f"server did not become healthy in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> set[int]:
        """Signal the server, wait for it; returns the descendants still alive afterwards."""
        children = descendants(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(alive(p) for p in children):
            time.sleep(0.2)
        left = {p for p in children if alive(p)}
        for pid in left:  # never leave them to the next test
            os.kill(pid, signal.SIGKILL)
        return left


MAX_MODEL_LEN = 256


@pytest.fixture(scope="package")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One tiny-model server for the package (a start costs seconds); SIGTERM at the end."""
    tmp = tmp_path_factory.mktemp("server")
    tiny_model = make_tiny_model(tmp_path_factory.mktemp("tiny-model"))
    template = tmp / "template.jinja"
    template.write_text(SERVER_TEMPLATE)
    # Engine flags in both spellings: the server parses exactly the engine's CLI.
    args = ["--model", str(tiny_model), "--served-model-name", MODEL_NAME, "--api-key", API_KEY]
    args += ["--dtype", "float32", "--max_model_len", str(MAX_MODEL_LEN), "--enforce-eager"]
    args += ["--level", "0", "--kv-cache-memory", "4MiB", "--torch-profiler-dir", str(tmp / "p")]
    args += ["--chat-template", str(template), "--max-log-len", "40"]
    args += ["--default-chat-template-kwargs", json.dumps({"greeting": "hey"})]
    args += ["--disable-uvicorn-access-log", "--timeout-keep-alive", "3"]
    # Small steps: long prompts prefill in chunks, as on a busy server.
    args += ["--trust-request-chat-template", "--max-num-batched-tokens", "64"]
    # The engine's stats line every 0.2 s of work, so that a test sees one.
    proc = ServerProcess(args, tmp / "server.log", {"ATOM_LOG_STATS_INTERVAL": "0.2"})
    proc.wait_ready()
    yield proc
    children = set()
    try:
        children = proc.stop(signal.SIGTERM)
    finally:
        assert proc.proc.returncode is not None
    assert not children, f"processes left after SIGTERM: {children}"


@pytest.fixture(scope="package")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="package")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as c:
        yield c


def metric(http: httpx.Client, name: str) -> float:
    """Sum of a metric's samples (all label sets)."""
    total, found = 0.0, False
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    assert found, f"{name} missing from /metrics"
    return total


def assert_error(resp: httpx.Response, status: int, err_type: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    if err_type is not None:
        assert error["type"] == err_type
    return error
