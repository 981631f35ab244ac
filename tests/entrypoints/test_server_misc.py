"""Everything around generation: health, version, metrics, profiling, auth, request ids, every
kind of bad input (a 4xx in the OpenAI error shape, never a 500), and client disconnects."""

from __future__ import annotations

import json
import socket
import time

import httpx
import openai
import pytest

from atom.args import EngineArgs
from atom.entrypoints.openai_server import load_chat_template, make_parser
from tests.entrypoints.conftest import (
    API_KEY,
    MAX_MODEL_LEN,
    MODEL_NAME,
    ServerProcess,
    assert_error,
    metric,
)

COMPLETION = "/v1/completions"
CHAT = "/v1/chat/completions"


def test_health_version_metrics(server: ServerProcess) -> None:
    # No API key needed outside /v1.
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/version").json()["version"]
    text = httpx.get(f"{server.url}/metrics").text
    for name in (
        "atom:num_requests_running",
        "atom:num_requests_waiting",
        "atom:kv_cache_usage_perc",
        "atom:prefix_cache_hit_rate",
        "atom:num_free_kv_blocks",
        "atom:num_preemptions_total",
        "atom:prompt_tokens_total",
        "atom:generation_tokens_total",
        "atom:request_success_total",
        "atom:time_to_first_token_seconds_bucket",
        "atom:time_per_output_token_seconds_bucket",
        "atom:e2e_request_latency_seconds_bucket",
        "atom:request_queue_time_seconds_bucket",
    ):
        assert name in text, name


def test_metrics_count_tokens(client: openai.OpenAI, http: httpx.Client) -> None:
    before = metric(http, "atom:generation_tokens_total"), metric(http, "atom:prompt_tokens_total")
    client.completions.create(model=MODEL_NAME, prompt="abcd", max_tokens=3, temperature=0)
    after = metric(http, "atom:generation_tokens_total"), metric(http, "atom:prompt_tokens_total")
    assert after[0] - before[0] == 3 and after[1] - before[1] == 4


def test_engine_logs_a_stats_line_while_it_works(
    server: ServerProcess, client: openai.OpenAI
) -> None:
    """The engine core's periodic line (every 0.2 s of work in these tests, 10 s by default),
    one that counts this request's tokens."""
    client.completions.create(model=MODEL_NAME, prompt="abcd", max_tokens=60, temperature=0)
    marker = "atom.engine.stats_logger"

    def lines() -> list[str]:
        server.log()  # flushes
        return [x for x in server.log_path.read_text(errors="replace").splitlines() if marker in x]

    time.sleep(1.0)  # the core logs at its next pass, at most 0.5 s after the last step
    before = len(lines())
    client.completions.create(model=MODEL_NAME, prompt="abcd", max_tokens=60, temperature=0)
    deadline = time.monotonic() + 10
    while len(lines()) == before and time.monotonic() < deadline:
        time.sleep(0.1)
    line = lines()[-1]
    assert " steps in " in line and "KV cache " in line, line
    assert "generation 0.0 tok/s" not in line, line  # this request's tokens


def test_profile(http: httpx.Client) -> None:
    assert http.post("/start_profile").json()["status"] == "success"
    http.post(COMPLETION, json={"model": MODEL_NAME, "prompt": "p", "max_tokens": 2})
    assert http.post("/stop_profile").json()["status"] == "success"


def test_api_key(server: ServerProcess) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        resp = httpx.get(f"{server.url}/v1/models", headers=headers)
        assert_error(resp, 401, "AuthenticationError")
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_request_id_header(http: httpx.Client) -> None:
    body = {"model": MODEL_NAME, "prompt": "p", "max_tokens": 1}
    resp = http.post(COMPLETION, json=body, headers={"X-Request-Id": "abc123"})
    assert resp.headers["x-request-id"] == "abc123" and resp.json()["id"] == "cmpl-abc123"
    chat = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    resp = http.post(CHAT, json=chat, headers={"X-Request-Id": "abc123"})
    assert resp.json()["id"] == "chatcmpl-abc123"


def test_unknown_model_is_404(client: openai.OpenAI, http: httpx.Client) -> None:
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="p", max_tokens=1)
    resp = http.post(CHAT, json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    assert assert_error(resp, 404, "NotFoundError")["param"] == "model"


LONG = "x" * (MAX_MODEL_LEN + 1)
BAD_REQUESTS = [
    (COMPLETION, {"model": MODEL_NAME}),  # no prompt
    (COMPLETION, {"model": MODEL_NAME, "prompt": 5}),
    (COMPLETION, {"model": MODEL_NAME, "prompt": []}),
    (COMPLETION, {"model": MODEL_NAME, "prompt": "p", "max_tokens": -1}),
    (COMPLETION, {"model": MODEL_NAME, "prompt": "p", "max_tokens": 0}),  # 0 only with echo
    (COMPLETION, {"model": MODEL_NAME, "prompt": "p", "max_tokens": MAX_MODEL_LEN}),
    (COMPLETION, {"model": MODEL_NAME, "prompt": "p", "max_tokens": "many"}),
    (COMPLETION, {"model": MODEL_NAME, "prompt": LONG}),
    (COMPLETION, {"model": MODEL_NAME, "prompt": [[1, 10**6]]}),  # outside the vocabulary
    (COMPLETION, {"model": MODEL_NAME, "prompt": "p", "n": 129}),
    (COMPLETION, {"model": MODEL_NAME, "prompt": "p", "n": 0}),
    (COMPLETION, {"model": MODEL_NAME, "prompt": "p", "temperature": -1}),
    (COMPLETION, {"model": MODEL_NAME, "prompt": "p", "top_p": 0}),
    (COMPLETION, {"model": MODEL_NAME, "prompt": "p", "logprobs": 1000}),
    (COMPLETION, {"model": MODEL_NAME, "prompt": "p", "stop": [""]}),
    (COMPLETION, {"model": MODEL_NAME, "prompt": "p", "seed": 2**64}),
    (CHAT, {"model": MODEL_NAME}),  # no messages
    (CHAT, {"model": MODEL_NAME, "messages": []}),
    (CHAT, {"model": MODEL_NAME, "messages": "hi"}),
    (CHAT, {"model": MODEL_NAME, "messages": [{"role": "robot", "content": "x"}]}),
    (CHAT, {"model": MODEL_NAME, "messages": [{"role": "user", "content": LONG}]}),
    (
        CHAT,
        {"model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
    ),
    (CHAT, {"model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}),
    (
        CHAT,
        {"model": MODEL_NAME, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
    ),
]


@pytest.mark.parametrize(("path", "body"), BAD_REQUESTS)
def test_bad_request_is_400(http: httpx.Client, path: str, body: dict) -> None:
    assert_error(http.post(path, json=body), 400)


def test_malformed_and_oversized_bodies(http: httpx.Client) -> None:
    headers = {"Content-Type": "application/json"}
    assert_error(http.post(COMPLETION, content=b'{"prompt": ', headers=headers), 400)
    assert_error(http.post(COMPLETION, content=b"[1, 2]", headers=headers), 400)
    big = json.dumps({"model": MODEL_NAME, "prompt": "x" * (33 << 20)}).encode()
    assert_error(http.post(COMPLETION, content=big, headers=headers), 413)

    def chunks() -> object:  # no Content-Length: the limit is counted as the body streams in
        for _ in range(33):
            yield b" " * (1 << 20)

    assert_error(http.post(COMPLETION, content=chunks(), headers=headers), 413)
    assert_error(http.get("/v1/nothing"), 404)
    # ...and the server still serves.
    ok = http.post(COMPLETION, json={"model": MODEL_NAME, "prompt": "p", "max_tokens": 1})
    assert ok.status_code == 200


def wait_for_free_blocks(http: httpx.Client) -> None:
    """The core sends fresh stats after an abort, also when it has nothing else to run."""
    total = metric(http, "atom:num_total_kv_blocks")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if metric(http, "atom:num_free_kv_blocks") == total:
            return
        time.sleep(0.2)
    raise AssertionError("KV blocks were not freed")


@pytest.mark.parametrize("path", [COMPLETION, CHAT])
def test_disconnect_mid_stream_aborts(server: ServerProcess, http: httpx.Client, path: str) -> None:
    body: dict = {"model": MODEL_NAME, "max_tokens": 200, "stream": True, "ignore_eos": True}
    if path == CHAT:
        body["messages"] = [{"role": "user", "content": "a long story"}]
    else:
        body["prompt"] = "a long story"
    generated = metric(http, "atom:generation_tokens_total")
    aborted = _aborted(http)
    with (
        httpx.Client(base_url=server.url, headers=http.headers, timeout=30) as c,
        c.stream("POST", path, json=body) as resp,
    ):
        assert resp.status_code == 200
        lines = resp.iter_lines()
        for _ in range(3):
            next(lines)
    # Leaving the block closed the connection mid-stream.
    wait_for_free_blocks(http)
    # Only the 1-token probes finished: the stream was aborted, not run to its end.
    assert metric(http, "atom:generation_tokens_total") - generated < 100
    assert metric(http, "atom:num_requests_running") == 0
    assert _aborted(http) == aborted + 1  # counted, with its finish reason


def _aborted(http: httpx.Client) -> float:
    lines = http.get("/metrics").text.splitlines()
    rows = [x for x in lines if x.startswith("atom:request_success_total{")]
    return sum(float(x.rsplit(" ", 1)[1]) for x in rows if 'finished_reason="abort"' in x)


def test_disconnect_non_streaming_aborts(server: ServerProcess, http: httpx.Client) -> None:
    body = {"model": MODEL_NAME, "prompt": "p", "max_tokens": 240, "ignore_eos": True, "n": 16}
    data = json.dumps(body).encode()
    head = (
        f"POST {COMPLETION} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    generated = metric(http, "atom:generation_tokens_total")
    aborted = _aborted(http)
    # A raw socket, so that the connection surely closes before the response.
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head.encode() + data)
        deadline = time.monotonic() + 20
        while metric(http, "atom:num_requests_running") < 16 and time.monotonic() < deadline:
            time.sleep(0.01)
    wait_for_free_blocks(http)
    # Aborted (all 16 completions counted so), not run to the end.
    assert metric(http, "atom:generation_tokens_total") - generated < 16 * 240
    assert _aborted(http) == aborted + 16


def test_cli_flags() -> None:
    ns = make_parser().parse_args(["--port", "9", "--max_model_len", "64", "--api-key", "k"])
    assert ns.server_port == 9 and ns.max_model_len == 64 and ns.api_key == "k"
    ns = make_parser().parse_args(["--server-port", "10", "--default-chat-template-kwargs", "{}"])
    assert ns.server_port == 10 and ns.default_chat_template_kwargs == {}
    ns = make_parser().parse_args(["--torch-profiler-dir", "p", "--mark_trace"])
    engine = EngineArgs.from_cli_args(ns)
    assert engine.torch_profiler_dir == "p" and engine.mark_trace
    assert not engine.disable_log_stats
    ns = make_parser().parse_args(["--disable-log-stats"])
    assert not EngineArgs.from_cli_args(ns).create_engine_config().log_stats
    assert load_chat_template("{{ messages }}") == "{{ messages }}"
    with pytest.raises(ValueError, match="neither"):
        load_chat_template("/no/such/file")
