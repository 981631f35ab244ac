"""The serving benchmark: metric helpers on hand-made timings, the datasets, the client against a
scripted SSE server (broken streams, error bodies), and whole runs against our real server on a
tiny model (both backends, arrivals, concurrency, saved JSON, profiling, failed requests)."""

from __future__ import annotations

import asyncio
import json
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import transformers
from aiohttp import web
from tokenizers import decoders

from atom.benchmarks import benchmark_serving
from atom.benchmarks.serving_client import ClientConfig, RequestResult, payload, send_request
from atom.benchmarks.serving_datasets import (
    BenchmarkRequest,
    sample_custom,
    sample_random,
    sample_sharegpt,
)
from atom.benchmarks.serving_metrics import (
    calculate_metrics,
    format_table,
    parse_slo,
    result_fields,
)
from tests.entrypoints.conftest import ServerProcess, make_tiny_model

API_KEY = "bench-key"
MODEL_NAME = "tiny"
MAX_MODEL_LEN = 256


# ---- fixtures ----


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The entrypoint tests' tiny Llama, its character tokenizer decoding without spaces, so that
    text and ids round-trip (random prompts get their exact lengths)."""
    path = make_tiny_model(tmp_path_factory.mktemp("tiny-model"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    tokenizer.backend_tokenizer.decoder = decoders.Fuse()
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("bench-server")
    args = ["--model", str(tiny_model), "--served-model-name", MODEL_NAME, "--api-key", API_KEY]
    args += ["--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager"]
    args += ["--level", "0", "--kv-cache-memory", "4MiB", "--torch-profiler-dir", str(tmp / "p")]
    args += ["--disable-uvicorn-access-log"]
    proc = ServerProcess(args, tmp / "server.log")
    proc.wait_ready()
    proc.profile_dir = tmp / "p"  # type: ignore[attr-defined]
    yield proc
    assert not proc.stop(), "the server left processes behind"


def bench(server: ServerProcess, tiny_model: Path, *extra: str) -> list[str]:
    """Argv of a run against the test server."""
    argv = ["--base-url", server.url, "--model", str(tiny_model), "--served-model-name"]
    argv += [MODEL_NAME, "--api-key", API_KEY, "--disable-tqdm", "--num-warmups", "1"]
    return [*argv, *extra]


def saved(result_dir: Path) -> dict[str, Any]:
    (path,) = result_dir.glob("*.json")
    return json.loads(path.read_text())


# ---- metric helpers on hand-made timings ----


def _result(ttft: float, itl: list[float], out: int | None, text: str = "") -> RequestResult:
    latency = ttft + sum(itl)
    return RequestResult(10, True, text, out, ttft, itl, latency)


def test_metrics_on_hand_made_timings() -> None:
    requests = [BenchmarkRequest("p", 10, 8)] * 4
    results = [
        _result(0.1, [0.02, 0.02, 0.02], 4),  # tpot 0.02
        _result(0.3, [0.05], 2),  # tpot 0.05
        _result(0.2, [], None, "abcde"),  # no usage: 5 tokens by the counter, tpot 0.0 (no gaps)
        RequestResult(10, error="HTTP 400: too long"),
    ]
    m = calculate_metrics(requests, results, 2.0, len, [50, 99, 99.9], {"ttft": 250, "tpot": 30})
    assert (m.completed, m.failed, m.total_input) == (3, 1, 30)
    assert m.output_lens == [4, 2, 5, 0] and m.total_output == 11
    assert m.request_throughput == 1.5 and m.output_throughput == 5.5
    assert m.total_token_throughput == 20.5
    # ttft 0.1 and 0.2 within 250 ms, tpots 0.02 and 0.0 within 30 ms: 2 good requests
    assert m.request_goodput == 1.0
    assert m.concurrency == pytest.approx((0.16 + 0.35 + 0.2) / 2.0)
    ttft = m.stats["ttft"]
    assert ttft.mean == pytest.approx(200.0) and ttft.median == pytest.approx(200.0)
    assert ttft.std == pytest.approx(np.std([100, 300, 200]))
    assert dict(ttft.percentiles) == pytest.approx({50: 200.0, 99: 298.0, 99.9: 299.8})
    tpot = m.stats["tpot"]
    # 5 tokens with a 0.2 s e2el and ttft: tpot 0; single-chunk outputs count in tpot too
    assert tpot.mean == pytest.approx((20 + 50 + 0) / 3)
    assert m.stats["itl"].mean == pytest.approx(np.mean([20, 20, 20, 50]))
    assert m.stats["e2el"].median == pytest.approx(200.0)
    assert m.errors == {"HTTP 400: too long": 1}
    fields = result_fields(m, 2.0, ["ttft", "e2el"], with_goodput=True)
    assert fields["request_goodput"] == 1.0 and "request_goodput:" not in fields
    assert {"p99_ttft_ms", "p99.9_ttft_ms", "p50_e2el_ms", "std_e2el_ms"} <= set(fields)
    assert "mean_tpot_ms" not in fields and fields["errors_summary"] == m.errors
    assert result_fields(m, 2.0, ["ttft"], with_goodput=False)["request_goodput"] is None


def test_metrics_of_no_success_and_goodput_edges() -> None:
    requests = [BenchmarkRequest("p", 3, 2)] * 2
    results = [RequestResult(3, error="boom"), RequestResult(3, error="boom")]
    m = calculate_metrics(requests, results, 1.0, len, [99], {"e2el": 1.0})
    assert (m.completed, m.failed, m.total_output, m.request_goodput) == (0, 2, 0, 0.0)
    assert m.stats["ttft"].mean == 0.0 and m.errors == {"boom": 2}
    one_token = [_result(0.5, [], 1)]
    m = calculate_metrics(requests[:1], one_token, 1.0, len, [99], {"tpot": 0.0, "e2el": 500})
    assert m.request_goodput == 1.0  # tpot of a one-token output is 0; e2el 500 ms <= 500 ms


def test_table_has_vllms_rows() -> None:
    requests = [BenchmarkRequest("p", 5, 3)] * 2
    results = [_result(0.1, [0.01, 0.01], 3), RequestResult(5, error="HTTP 500: x")]
    m = calculate_metrics(requests, results, 1.0, len, [99], None)
    table = format_table(m, 1.0, ["ttft", "tpot", "itl", "e2el"], 4, 2.5, with_goodput=False)
    lines = table.splitlines()
    assert lines[0] == "============ Serving Benchmark Result ============"
    assert lines[-1] == "=" * 50
    assert lines[1] == f"{'Successful requests:':<40} {1:<10}"
    for row in (
        "Failed requests:",
        "Maximum request concurrency:",
        "Request rate configured (RPS):",
        "Benchmark duration (s):",
        "Total input tokens:",
        "Total generated tokens:",
        "Request throughput (req/s):",
        "Output token throughput (tok/s):",
        "Total Token throughput (tok/s):",
        "Mean TTFT (ms):",
        "Median TPOT (ms):",
        "P99 ITL (ms):",
        "P99 E2EL (ms):",
    ):
        assert any(line.startswith(row) for line in lines), row
    assert "---------------Time to First Token----------------" in lines
    assert "1: HTTP 500: x" in lines and "Request goodput" not in table


def test_parse_slo_and_metadata() -> None:
    assert parse_slo("ttft:300") == ("ttft", 300.0) and parse_slo("e2el:0.5") == ("e2el", 0.5)
    for bad in ("itl:3", "ttft", "ttft:-1", "tpot:x"):
        with pytest.raises(Exception, match="--goodput"):
            parse_slo(bad)
    meta = benchmark_serving.parse_metadata(["engine=atom", "commit=a=b", " gpu = H200 "])
    assert meta == {"engine": "atom", "commit": "a=b", "gpu": "H200"}
    for bad in ("novalue", "=x", "backend=x", "p99_ttft_ms=1", "itls=1"):
        with pytest.raises(ValueError, match="--metadata"):
            benchmark_serving.parse_metadata([bad])


def test_bad_arguments_fail_before_sending(tiny_model: Path) -> None:
    base = ["--model", str(tiny_model), "--port", "1"]
    for extra, match in (
        (["--percentile-metrics", "ttft,foo"], "percentile-metrics"),
        (["--metric-percentiles", "101"], "metric-percentiles"),
        (["--request-rate", "0"], "request-rate"),
        (["--max-concurrency", "0"], "max-concurrency"),
        (["--dataset-name", "custom"], "dataset-path"),
        (["--random-range-ratio", "1.5"], "random-range-ratio"),
    ):
        args = benchmark_serving.build_parser().parse_args(base + extra)
        with pytest.raises(ValueError, match=match):
            benchmark_serving.run(args)


# ---- datasets ----


def test_random_dataset(tokenizer: Any, capsys: pytest.CaptureFixture[str]) -> None:
    def sample(seed: int) -> list[BenchmarkRequest]:
        return sample_random(tokenizer, 8, 20, 10, 0.5, 6, np.random.RandomState(seed))

    requests = sample(0)
    assert "avg_token_mismatch=0.00" in capsys.readouterr().out
    assert sample(0) == requests and sample(1) != requests
    for r in requests:
        assert 6 + 10 <= r.prompt_len <= 6 + 20 and 5 <= r.output_len <= 10
        assert len(tokenizer.encode(r.prompt, add_special_tokens=False)) == r.prompt_len
    assert len({r.prompt[:6] for r in requests}) == 1  # the shared prefix (1 char per token)
    assert len({r.prompt[6:] for r in requests}) == 8
    assert len({r.prompt_len for r in requests}) > 1
    fixed = sample_random(tokenizer, 3, 7, 4, 1.0, 0, np.random.RandomState(0))
    assert [(r.prompt_len, r.output_len) for r in fixed] == [(7, 4)] * 3


def test_sharegpt_dataset(tokenizer: Any, tmp_path: Path) -> None:
    def conv(*turns: str) -> dict[str, Any]:
        return {"id": "x", "conversations": [{"from": "human", "value": t} for t in turns]}

    data = [conv(f"prompt number {i}", f"answer {i}!", "third turn") for i in range(5)]
    data += [conv("only one turn here"), conv("abc", "a long enough answer")]  # dropped
    data += [conv("x" * 1100, "answer"), conv("fine prompt", "ok")]  # too long / too short
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    requests = sample_sharegpt(path, tokenizer, 5, None, seed=0)
    assert sorted(r.prompt for r in requests) == [f"prompt number {i}" for i in range(5)]
    assert all(r.output_len == len(f"answer {r.prompt[-1]}!") for r in requests)
    assert sample_sharegpt(path, tokenizer, 5, None, seed=0) == requests  # seeded shuffle
    fixed = sample_sharegpt(path, tokenizer, 7, 3, seed=0)  # "ok" passes with a fixed length
    assert len(fixed) == 7 and {r.output_len for r in fixed} == {3}
    assert "fine prompt" in {r.prompt for r in fixed}


def test_custom_dataset(tokenizer: Any, tmp_path: Path) -> None:
    path = tmp_path / "custom.jsonl"
    lines = [{"prompt": "hello", "output_tokens": 3}, {"prompt": "world!", "output_tokens": 5}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    requests = sample_custom(path, tokenizer, 2, None)
    assert requests == [BenchmarkRequest("hello", 5, 3), BenchmarkRequest("world!", 6, 5)]
    assert [r.output_len for r in sample_custom(path, tokenizer, 3, 9)] == [9, 9, 9]
    path.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match=r"custom.jsonl:1: output_tokens=None"):
        sample_custom(path, tokenizer, 1, None)
    path.write_text('{"text": "x", "output_tokens": 2}\n')
    with pytest.raises(ValueError, match=r"custom\.jsonl:1"):
        sample_custom(path, tokenizer, 1, None)


def test_payloads() -> None:
    request = BenchmarkRequest("hi", 2, 7)
    cfg = ClientConfig("http://h/v1/completions", "m", chat=False, ignore_eos=True, logprobs=2)
    assert payload(cfg, request) == {
        "model": "m",
        "temperature": 0.0,
        "prompt": "hi",
        "max_tokens": 7,
        "logprobs": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    chat = payload(ClientConfig("u", "m", chat=True), request)
    assert chat["messages"] == [{"role": "user", "content": "hi"}]
    assert chat["max_completion_tokens"] == 7 and "ignore_eos" not in chat


# ---- the client against a scripted server ----

DONE = b"data: [DONE]\n\n"
SCRIPTS: dict[str, list[bytes]] = {
    # CRLF line ends, split across writes; a comment line; no usage chunk
    "ok": [
        b": ping\r\n\r\ndata: ",
        b'{"choices": [{"text": "ab"}]}\r\n\r',
        b"\n",
        b'data: {"choices": [{"text": "c"}]}\n\n',
        DONE,
    ],
    "no-done": [b'data: {"choices": [{"text": "ab"}]}\n\n'],
    "error-chunk": [
        b'data: {"choices": [{"text": "a"}]}\n\n',
        b'data: {"error": {"message": "engine died", "code": 500}}\n\n',
        DONE,
    ],
    "empty": [b'data: {"choices": [], "usage": {"completion_tokens": 0}}\n\n', DONE],
}


async def _scripted(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    prompt = body["prompt"]
    if prompt == "http-500":
        return web.Response(status=500, text="<html>bad gateway</html>")
    if prompt == "http-400":
        error = {"message": "prompt too long", "type": "BadRequestError", "code": 400}
        return web.json_response({"error": error}, status=400)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for piece in SCRIPTS[prompt]:
        await response.write(piece)
        await asyncio.sleep(0.01)
    return response


async def _against_script(prompts: list[str]) -> list[RequestResult]:
    app = web.Application()
    app.router.add_post("/v1/completions", _scripted)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    cfg = ClientConfig(f"http://127.0.0.1:{port}/v1/completions", "m", chat=False)
    try:
        async with aiohttp.ClientSession() as session:
            requests = [BenchmarkRequest(p, 1, 4) for p in prompts]
            return list(await asyncio.gather(*(send_request(session, cfg, r) for r in requests)))
    finally:
        await runner.cleanup()


def test_client_failures_and_odd_streams() -> None:
    prompts = ["ok", "no-done", "error-chunk", "empty", "http-500", "http-400"]
    ok, no_done, error_chunk, empty, h500, h400 = asyncio.run(_against_script(prompts))
    assert ok.success and ok.generated_text == "abc" and ok.output_tokens is None
    assert len(ok.itl) == 1 and ok.latency == pytest.approx(ok.ttft + ok.itl[0])
    assert not no_done.success and no_done.error == "the stream ended without data: [DONE]"
    assert not error_chunk.success and error_chunk.error == "error in stream: engine died"
    assert not empty.success and empty.error == "the stream held no token chunk"
    assert h500.error == "HTTP 500: <html>bad gateway</html>"
    assert h400.error == "HTTP 400: prompt too long"


# ---- whole runs against our server ----


def test_completions_run_saves_vllms_fields(
    server: ServerProcess, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = bench(server, tiny_model, "--dataset-name", "random", "--num-prompts", "6")
    argv += ["--random-input-len", "24", "--random-output-len", "6", "--random-range-ratio", "0.5"]
    argv += ["--random-prefix-len", "16", "--max-concurrency", "2", "--ignore-eos"]
    argv += ["--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99.9"]
    argv += ["--goodput", "ttft:60000", "tpot:60000", "--save-result", "--save-detailed"]
    argv += ["--result-dir", str(tmp_path), "--metadata", "engine=atom", "num_gpus=0"]
    assert benchmark_serving.main(argv) == 0
    out = capsys.readouterr().out
    assert "============ Serving Benchmark Result ============" in out
    assert API_KEY not in out  # the printed arguments hide the key
    (path,) = tmp_path.glob("*.json")
    assert re.fullmatch(
        rf"vllm-infqps-concurrency2-{tiny_model.name}-\d{{8}}-\d{{6}}\.json", path.name
    )
    r = json.loads(path.read_text())
    assert (r["backend"], r["model_id"], r["tokenizer_id"]) == (
        "vllm",
        str(tiny_model),
        str(tiny_model),
    )
    assert (r["num_prompts"], r["completed"], r["failed"], r["errors_summary"]) == (6, 6, 0, {})
    assert (r["dataset_name"], r["random_input_len"], r["random_output_len"]) == ("random", 24, 6)
    assert (r["random_range_ratio"], r["random_prefix_len"]) == (0.5, 16)
    assert (r["engine"], r["num_gpus"], r["request_rate"], r["burstiness"]) == (
        "atom",
        "0",
        "inf",
        1.0,
    )
    assert r["max_concurrency"] == 2 and 0 < r["concurrency"] <= 2.0 + 1e-6
    assert r["request_goodput"] == pytest.approx(r["request_throughput"])
    assert re.fullmatch(r"\d{8}-\d{6}", r["date"])
    own = benchmark_serving.OWN_FIELDS | {"engine", "num_gpus"}
    assert all(k in own or benchmark_serving.STATS_FIELD.fullmatch(k) for k in r), set(r) - own
    for key in ("input_lens", "output_lens", "ttfts", "itls", "e2els", "generated_texts", "errors"):
        assert len(r[key]) == 6, key
    # The planned lengths, from the same seed: ignore_eos makes every output that long.
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model)
    planned = sample_random(tok, 6, 24, 6, 0.5, 16, np.random.RandomState(0))
    assert r["output_lens"] == [p.output_len for p in planned]
    assert r["input_lens"] == [p.prompt_len for p in planned]
    assert r["total_output_tokens"] == sum(r["output_lens"])
    assert r["total_input_tokens"] == sum(r["input_lens"])
    tpots = [
        (e2el - ttft) / (n - 1)
        for e2el, ttft, n in zip(r["e2els"], r["ttfts"], r["output_lens"], strict=True)
        if n > 1
    ]
    assert r["mean_tpot_ms"] == pytest.approx(1000 * np.mean(tpots))
    assert r["p99.9_ttft_ms"] == pytest.approx(1000 * np.percentile(r["ttfts"], 99.9))
    assert r["median_e2el_ms"] == pytest.approx(1000 * np.median(r["e2els"]))
    all_itls = [x for itl in r["itls"] for x in itl]
    assert r["mean_itl_ms"] == pytest.approx(1000 * np.mean(all_itls))
    for ttft, itl, e2el in zip(r["ttfts"], r["itls"], r["e2els"], strict=True):
        assert e2el == pytest.approx(ttft + sum(itl))
    assert r["request_throughput"] == pytest.approx(6 / r["duration"])


def test_chat_run_with_poisson_arrivals(
    server: ServerProcess, tiny_model: Path, tmp_path: Path
) -> None:
    argv = bench(server, tiny_model, "--backend", "openai-chat", "--num-prompts", "5")
    argv += ["--random-input-len", "12", "--random-output-len", "4", "--ignore-eos"]
    argv += ["--request-rate", "50", "--burstiness", "0.5", "--seed", "3", "--save-result"]
    argv += ["--result-dir", str(tmp_path), "--result-filename", "chat.json"]
    assert benchmark_serving.main(argv) == 0
    r = json.loads((tmp_path / "chat.json").read_text())
    assert (r["backend"], r["request_rate"], r["burstiness"]) == ("openai-chat", 50.0, 0.5)
    assert (r["completed"], r["failed"], r["total_output_tokens"]) == (5, 0, 20)
    assert r["mean_ttft_ms"] > 0 and r["mean_tpot_ms"] > 0 and "input_lens" not in r


def test_profile_writes_a_trace(server: ServerProcess, tiny_model: Path, tmp_path: Path) -> None:
    profile_dir: Path = server.profile_dir  # type: ignore[attr-defined]
    before = set(profile_dir.rglob("*.pt.trace.json*"))
    argv = bench(server, tiny_model, "--num-prompts", "2", "--random-input-len", "8")
    argv += ["--random-output-len", "2", "--profile", "--num-warmups", "0"]
    assert benchmark_serving.main(argv) == 0
    assert len(set(profile_dir.rglob("*.pt.trace.json*")) - before) == 1


def test_failed_requests_are_counted_with_errors(
    server: ServerProcess,
    tiny_model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "abc" * 5, "output_tokens": 3}] * 3
    lines.insert(1, {"prompt": "z" * (MAX_MODEL_LEN + 10), "output_tokens": 3})
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    argv = bench(server, tiny_model, "--dataset-name", "custom", "--dataset-path", str(data))
    argv += [
        "--num-prompts",
        "4",
        "--save-result",
        "--save-detailed",
        "--result-dir",
        str(tmp_path),
    ]
    assert benchmark_serving.main(argv) == 0  # some succeeded
    r = saved(tmp_path)
    assert (r["completed"], r["failed"], r["dataset_name"]) == (3, 1, "custom")
    assert r["dataset_path"] == str(data) and "random_input_len" not in r
    (error,) = r["errors_summary"]
    assert error.startswith("HTTP 400: This model's maximum context length is 256 tokens")
    assert r["errors_summary"][error] == 1 and r["errors"][1] == error
    assert r["output_lens"][1] == 0 and r["total_output_tokens"] == sum(r["output_lens"])
    assert r["total_input_tokens"] == 3 * 15
    out = capsys.readouterr().out
    assert re.search(r"Failed requests:\s+1 ", out) and f"1: {error}" in out


def test_unreachable_server_fails_every_request(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket_closed_port() as port:
        argv = ["--model", str(tiny_model), "--port", str(port), "--num-prompts", "3"]
        argv += ["--random-input-len", "8", "--random-output-len", "2", "--disable-tqdm"]
        argv += ["--backend", "openai", "--save-result", "--result-dir", str(tmp_path)]
        assert benchmark_serving.main(argv) == 1
    r = saved(tmp_path)
    assert (r["completed"], r["failed"], r["total_output_tokens"]) == (0, 3, 0)
    ((error, count),) = r["errors_summary"].items()
    assert count == 3 and error.startswith("ClientConnectorError")
    assert "every request failed" in capsys.readouterr().err


@contextmanager
def socket_closed_port() -> Iterator[int]:
    """A port on which nothing listens: bound (so no one else takes it), never listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_sharegpt_run(server: ServerProcess, tiny_model: Path, tmp_path: Path) -> None:
    data = [
        {"conversations": [{"value": f"tell me about {i}"}, {"value": f"it is {i}"}]}
        for i in range(3)
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    argv = bench(server, tiny_model, "--dataset-name", "sharegpt", "--dataset-path", str(path))
    argv += ["--num-prompts", "3", "--save-result", "--result-dir", str(tmp_path / "r")]
    assert benchmark_serving.main(argv) == 0
    r = saved(tmp_path / "r")
    assert (r["completed"], r["dataset_name"], r["num_prompts"]) == (3, "sharegpt", 3)
