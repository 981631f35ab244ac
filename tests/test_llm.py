"""The offline API: inputs, outputs, model sources and bad input, on a tiny random Llama."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from atom import LLM, SamplingParams
from atom.args import EngineArgs, FlexibleArgumentParser
from atom.config import CacheConfig
from atom.engine.core import WARMUP_QUERY_LENS
from atom.engine.outputs import SchedulerOutput
from tests.conftest import tiny_llama_config

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny: Path) -> LLM:
    return LLM(str(tiny), skip_tokenizer_init=True, kv_cache_memory_bytes=4 << 20)


def _ids(*lens: int) -> list[dict[str, list[int]]]:
    return [{"prompt_token_ids": [(7 * i + n) % 120 + 2 for i in range(n)]} for n in lens]


def _assert_clean(llm: LLM) -> None:
    pool = llm.engine.scheduler.kv.pool
    assert not llm.engine.has_unfinished_requests()
    assert pool.num_free_blocks == pool.num_blocks


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ({"prompt_token_ids": []}, GREEDY, "empty"),
        ({"prompt_token_ids": [5] * 300}, GREEDY, "max_model_len"),
        ({"prompt_token_ids": [5, 128]}, GREEDY, "vocabulary"),
        ({"prompt_token_ids": [5, -1]}, GREEDY, "vocabulary"),
        ({"nothing": 1}, GREEDY, "prompt_token_ids"),
        ("text needs a tokenizer", GREEDY, "tokenizer"),
        (_ids(3)[0], GREEDY.clone(logprobs=21), "max_logprobs"),
        (_ids(3)[0], GREEDY.clone(prompt_logprobs=100), "max_logprobs"),
        (_ids(3)[0], GREEDY.clone(stop_token_ids=[128]), "vocabulary"),
        (_ids(3)[0], GREEDY.clone(stop=["x"]), "tokenizer"),
    ],
)
def test_bad_prompts_raise_and_engine_survives(
    llm: LLM, prompt: Any, params: SamplingParams, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        llm.generate([*_ids(5), prompt], params, use_tqdm=False)
    _assert_clean(llm)
    assert len(llm.generate(_ids(5)[0], GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 8


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": -1.0}, "temperature"),
        ({"n": 0}, "n must"),
        ({"min_p": 2.0}, "min_p"),
        ({"stop": [""]}, "stop"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"seed": 2**64}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
    ],
)
def test_bad_sampling_params(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_outputs_shape_and_n(llm: LLM) -> None:
    outs = llm.generate(_ids(3, 20), [GREEDY, GREEDY.clone(n=3, max_tokens=5)], use_tqdm=False)
    assert [len(o.outputs) for o in outs] == [1, 3]
    first, second = outs
    assert len(first.outputs[0].token_ids) == 8 and first.outputs[0].finish_reason == "length"
    # greedy siblings agree and share the prompt's blocks
    assert len({tuple(c.token_ids) for c in second.outputs}) == 1
    assert second.finished and second.prompt_token_ids == _ids(20)[0]["prompt_token_ids"]
    _assert_clean(llm)


def test_seeded_sampling_reproducible(llm: LLM) -> None:
    params = SamplingParams(temperature=1.0, seed=123, max_tokens=12, ignore_eos=True)
    a = llm.generate(_ids(9), params, use_tqdm=False)[0].outputs[0].token_ids
    b = llm.generate(_ids(9) * 3, params, use_tqdm=False)[2].outputs[0].token_ids
    assert a == b


def test_seeded_sampling_survives_preemption(tiny: Path) -> None:
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=40, ignore_eos=True)
    prompts = _ids(20, 21, 22)
    tokens = []
    for blocks in (40, 6):  # 6 blocks of 16 for three 60-token sequences: preemptions
        llm = LLM(
            str(tiny), skip_tokenizer_init=True, num_gpu_blocks_override=blocks, max_model_len=64
        )
        tokens.append(
            [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        )
        preemptions = llm.engine.stats().num_preemptions
    assert preemptions > 0 and tokens[0] == tokens[1]


def test_n_with_prompt_logprobs(llm: LLM) -> None:
    params = SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=4, prompt_logprobs=1)
    out = llm.generate(_ids(10), params, use_tqdm=False)[0]
    assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == 10
    assert len(out.outputs) == 3
    _assert_clean(llm)


def test_stop_token_ids_and_min_tokens(llm: LLM) -> None:
    base = llm.generate(_ids(11), GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    stop_id = base[3]
    first = base.index(stop_id)
    out = llm.generate(_ids(11), GREEDY.clone(stop_token_ids=[stop_id]), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == base[: first + 1]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop_id
    late = GREEDY.clone(stop_token_ids=[stop_id], min_tokens=first + 2)
    tokens = llm.generate(_ids(11), late, use_tqdm=False)[0].outputs[0].token_ids
    assert stop_id not in tokens[: first + 2]


def test_generation_config_eos_ends_generation(tiny: Path, tmp_path: Path) -> None:
    for f in tiny.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    plain = LLM(str(tmp_path), skip_tokenizer_init=True, kv_cache_memory_bytes=4 << 20)
    base = plain.generate(_ids(6), GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    eos = base[2]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos]}))
    llm = LLM(str(tmp_path), skip_tokenizer_init=True, kv_cache_memory_bytes=4 << 20)
    params = SamplingParams(temperature=0, max_tokens=8)
    out = llm.generate(_ids(6), params, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == base[: base.index(eos) + 1] and out.finish_reason == "stop"


def test_dummy_weights_from_config_alone(tmp_path: Path) -> None:
    tiny_llama_config(architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)
    llm = LLM(
        str(tmp_path), skip_tokenizer_init=True, load_format="dummy", kv_cache_memory_bytes=4 << 20
    )
    out = llm.generate(_ids(4), GREEDY, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 8


def _copy_with(tiny: Path, dst: Path, edit: Any) -> None:
    for f in tiny.iterdir():
        if f.suffix != ".safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(tiny / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})


def test_missing_weight_raises(tiny: Path, tmp_path: Path) -> None:
    _copy_with(tiny, tmp_path, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match="qkv_proj"):
        LLM(str(tmp_path), skip_tokenizer_init=True)


def test_shape_mismatch_raises(tiny: Path, tmp_path: Path) -> None:
    def shrink(t: dict[str, torch.Tensor]) -> None:
        key = "model.layers.0.mlp.down_proj.weight"
        t[key] = t[key][:, :7].contiguous()

    _copy_with(tiny, tmp_path, shrink)
    with pytest.raises(ValueError, match="down_proj"):
        LLM(str(tmp_path), skip_tokenizer_init=True)


def test_unexpected_tensor_raises(tiny: Path, tmp_path: Path) -> None:
    _copy_with(tiny, tmp_path, lambda t: t.update(extra=torch.zeros(2)))
    with pytest.raises(ValueError, match="extra"):
        LLM(str(tmp_path), skip_tokenizer_init=True)


def test_unknown_architecture_raises(tmp_path: Path) -> None:
    tiny_llama_config(architectures=["FooForCausalLM"]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="FooForCausalLM"):
        LLM(str(tmp_path), skip_tokenizer_init=True, load_format="dummy")


def test_missing_model_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a directory"):
        LLM(str(tmp_path / "nope"), skip_tokenizer_init=True)


def test_kv_cache_too_small_for_max_model_len(tiny: Path) -> None:
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(str(tiny), skip_tokenizer_init=True, num_gpu_blocks_override=2)


def test_fp8_kv_cache_close_to_full_precision(tiny: Path, llm: LLM) -> None:
    fp8 = LLM(
        str(tiny),
        skip_tokenizer_init=True,
        kv_cache_dtype="fp8",
        kv_cache_memory_bytes=4 << 20,
        max_num_batched_tokens=16,
    )  # chunks read the cache
    layers = fp8.engine.executor.attn_layers
    assert layers[0].kv_cache.dtype == torch.float8_e4m3fn
    # Calibrated per layer from the K/V range (2x margin), not the unit default.
    assert all(a.k_scale != 1.0 and a.v_scale != 1.0 for a in layers)
    assert len({a.k_scale for a in layers}) == len(layers)
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    prompt = _ids(60)
    ref = llm.generate(prompt, params, use_tqdm=False)[0].prompt_logprobs
    got = fp8.generate(prompt, params, use_tqdm=False)[0].prompt_logprobs
    assert ref is not None and got is not None
    errors = [
        abs(next(iter(g.values())).logprob - next(iter(r.values())).logprob)
        for r, g in zip(ref[1:], got[1:], strict=True)
        if r is not None and g is not None
    ]
    assert len(errors) == 59 and max(errors) < 0.5 and sum(errors) / len(errors) < 0.1


def test_cli_accepts_kebab_and_snake() -> None:
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    a = EngineArgs.from_cli_args(
        parser.parse_args(
            [
                "--kv_cache_dtype",
                "fp8",
                "-tp",
                "2",
                "--max-model-len",
                "64",
                "--no-enable_prefix_caching",
                "--cudagraph-capture-sizes",
                "[1,2,4]",
                "--enforce_eager",
                "--kv-cache-memory",
                "1GiB",
            ]
        )
    )
    assert (a.kv_cache_dtype, a.tensor_parallel_size, a.max_model_len) == ("fp8", 2, 64)
    assert not a.enable_prefix_caching and a.enforce_eager
    assert a.cudagraph_capture_sizes == [1, 2, 4] and a.kv_cache_memory_bytes == 1 << 30


def test_kv_cache_dtype_takes_vllms_fp8_e4m3() -> None:
    """vLLM's `fp8_e4m3` is our `fp8` (e4m3 with per-layer scales); `fp8_e5m2` is not built, so
    it is refused by the CLI and by the config, naming what is accepted."""
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    args = EngineArgs.from_cli_args(parser.parse_args(["--kv-cache-dtype", "fp8_e4m3"]))
    assert CacheConfig(kv_cache_dtype=args.kv_cache_dtype).kv_cache_dtype == "fp8"
    assert CacheConfig(kv_cache_dtype="bfloat16").kv_cache_dtype == "bf16"
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-cache-dtype", "fp8_e5m2"])
    with pytest.raises(ValueError, match="fp8_e4m3"):
        CacheConfig(kv_cache_dtype="fp8_e5m2")


def test_failed_step_leaves_no_stale_prefix_cache(
    llm: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompt = _ids(50)
    expected = llm.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    assert llm.reset_prefix_cache()
    runner = llm.engine.executor

    def fail(*args: Any) -> None:
        raise RuntimeError("device fell over")

    monkeypatch.setattr(runner, "forward", fail)
    with pytest.raises(RuntimeError, match="fell over"):
        llm.generate(prompt, GREEDY, use_tqdm=False)
    monkeypatch.undo()
    _assert_clean(llm)
    out = llm.generate(prompt, GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == expected


def test_prompt_logprobs_in_slices(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    import atom.executor.sampler as sampler

    params = SamplingParams(max_tokens=1, prompt_logprobs=2)
    whole = llm.generate(_ids(40), params, use_tqdm=False)[0].prompt_logprobs
    monkeypatch.setattr(sampler, "PROMPT_LOGPROBS_ROWS", 7)
    sliced = llm.generate(_ids(40), params, use_tqdm=False)[0].prompt_logprobs
    assert whole is not None and sliced is not None and len(sliced) == 40
    for a, b in zip(whole[1:], sliced[1:], strict=True):
        assert a is not None and b is not None and a.keys() == b.keys()
        for token_id in a:
            assert abs(a[token_id].logprob - b[token_id].logprob) < 1e-5


def test_profile_writes_a_chrome_trace(tiny: Path, tmp_path: Path) -> None:
    llm = LLM(str(tiny), skip_tokenizer_init=True, torch_profiler_dir=str(tmp_path))
    with pytest.raises(ValueError, match="not running"):
        llm.stop_profile()
    llm.start_profile()
    llm.generate(_ids(5, 9), SamplingParams(max_tokens=4), use_tqdm=False)
    llm.stop_profile()
    (trace,) = (tmp_path / "rank_0").glob("*_ts_*.pt.trace.json.gz")
    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    assert any("linear" in e.get("name", "") for e in events)


def test_profile_needs_a_directory(llm: LLM) -> None:
    with pytest.raises(ValueError, match="torch-profiler-dir"):
        llm.start_profile()


def test_negative_seed_is_a_seed(llm: LLM) -> None:
    """Any int64 seeds, as in vLLM (UIs send -1): reproducible, and not the seed 1."""
    params = [SamplingParams(seed=s, max_tokens=8, ignore_eos=True) for s in (-1, -1, 1)]
    outs = llm.generate(_ids(5) * 3, params, use_tqdm=False)
    a, b, c = (o.outputs[0].token_ids for o in outs)
    assert a == b and a != c


def test_generation_config_sets_sampling_defaults(tiny: Path, tmp_path: Path) -> None:
    """As vLLM's --generation-config auto: the model's temperature etc. are request defaults."""
    _copy_with(tiny, tmp_path, lambda sd: sd)
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "top_k": 5}))
    llm = LLM(str(tmp_path), skip_tokenizer_init=True, kv_cache_memory_bytes=4 << 20)
    assert llm.get_default_sampling_params().top_k == 5
    default = llm.generate(_ids(7), use_tqdm=False)[0].outputs[0].token_ids
    greedy = llm.generate(_ids(7), SamplingParams(temperature=0), use_tqdm=False)[0]
    assert default == greedy.outputs[0].token_ids[: len(default)]
    plain = EngineArgs(model=str(tmp_path), generation_config="vllm", skip_tokenizer_init=True)
    assert plain.create_engine_config().model.sampling_defaults == ()


def test_warm_up_leaves_a_clean_engine(tiny: Path) -> None:
    """The CUDA start-up warm-up (run here on the CPU): its requests finish, every block and the
    prefix-cache counters come back, and generation afterwards is unchanged."""
    llm = LLM(str(tiny), skip_tokenizer_init=True, kv_cache_memory_bytes=4 << 20)
    before = llm.generate(_ids(5, 21), GREEDY, use_tqdm=False)
    longest: list[int] = []  # each step's longest query
    schedule = llm.engine.scheduler.schedule

    def spy() -> SchedulerOutput:
        out = schedule()
        longest.append(max(out.num_scheduled_tokens.values(), default=0))
        return out

    llm.engine.scheduler.schedule = spy
    llm.engine.warm_up()
    llm.engine.scheduler.schedule = schedule
    # every short query length ran as a step's longest query (attention's tile choice)
    assert set(WARMUP_QUERY_LENS) <= set(longest)
    _assert_clean(llm)
    stats = llm.engine.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (0, 0)
    assert not llm.engine.scheduler.requests
    after = llm.generate(_ids(5, 21), GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in after] == [o.outputs[0].token_ids for o in before]
    llm.shutdown()


def test_generate_decodes_finished_text_in_pieces(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """generate() decodes a finished request's text a piece (DECODE_PIECE ids) per step, more
    while the device is busy, the rest at once after the last step: the texts of one piece a
    request."""
    import shutil

    import atom.engine.llm as llm_module
    from tests.engine.test_detokenizer_stream import llama3_tokenizer

    shutil.copytree(tiny, tmp_path, dirs_exist_ok=True)
    llama3_tokenizer().save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), kv_cache_memory_bytes=4 << 20)
    prompts = _ids(3, 5, 7, 9)
    params = [GREEDY.clone(max_tokens=n, seed=n) for n in (5, 40, 17, 60)]

    def texts() -> list[tuple[str, list[int]]]:
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [(o.outputs[0].text, o.outputs[0].token_ids) for o in outs]

    monkeypatch.setattr(llm_module, "DECODE_PIECE", 10**6)
    whole = texts()
    monkeypatch.setattr(llm_module, "DECODE_PIECE", 3)
    taken = []
    plain_take = llm.output_processor.take_finished

    def take(max_ids: int | None = None) -> Any:
        taken.append(max_ids)
        return plain_take(max_ids)

    monkeypatch.setattr(llm.output_processor, "take_finished", take)
    assert texts() == whole and any(t for t, _ in whole)
    # Pieces of 3 while steps run: all the text of the three requests that finish before the
    # last step (5, 40 and 17 tokens), then the rest after the last step in one go.
    early = sum(len(ids) for _, ids in whole[:3])
    assert taken[-1] is None and set(taken[:-1]) == {3} and len(taken) - 1 >= early / 3
    _assert_clean(llm)
    llm.shutdown()
