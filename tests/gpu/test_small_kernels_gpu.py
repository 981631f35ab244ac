"""The decoder layer's small Triton kernels on CUDA against their references, in bf16, fp16, fp32;
fp8 KV cache writes; the ops under torch.compile with a dynamic token count."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from atom.kernels import ops
from atom.kernels.reshape_and_cache import reshape_and_cache, reshape_and_cache_ref
from atom.kernels.rms_norm import (
    fused_add_rms_norm,
    fused_add_rms_norm_ref,
    rms_norm,
    rms_norm_ref,
)
from atom.kernels.rotary import (
    rotary_and_cache,
    rotary_and_cache_ref,
    rotary_embedding,
    rotary_embedding_ref,
)
from atom.kernels.silu_and_mul import silu_and_mul, silu_and_mul_ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# Kernel and reference may round one step apart (summation order, FMA); rms_norm rounds twice
# (before and after the weight), so up to 2 ulps relative.
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
}
TOKENS = [1, 7, 256, 4099]
EPS = 1e-6


def _randn(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(dtype)


def test_rms_norm_row_counts_share_a_variant() -> None:
    """A step's token count is the norm's row count: 1, multiples of 16 and others must reuse one
    compiled variant, not compile one mid-run (an eager prefill step of a new count's class)."""
    from atom.kernels.rms_norm import _rms_norm_kernel

    w = _randn(1024, dtype=torch.bfloat16, seed=2)
    counts = []
    for rows in (48, 1, 16, 4099, 7):
        x = _randn(rows, 1024, dtype=torch.bfloat16, seed=rows)
        residual = _randn(rows, 1024, dtype=torch.bfloat16, seed=1)
        fused_add_rms_norm(x, residual, w, EPS)
        rms_norm(x, w, EPS)
        counts.append(sum(len(c[0]) for c in _rms_norm_kernel.device_caches.values()))
    assert counts[1:] == counts[:1] * 4, counts


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden_size", [64, 769, 4096])
@pytest.mark.parametrize("num_tokens", TOKENS)
def test_rms_norm(num_tokens: int, hidden_size: int, dtype: torch.dtype) -> None:
    x = _randn(num_tokens, hidden_size, dtype=dtype, seed=num_tokens)
    residual = _randn(num_tokens, hidden_size, dtype=dtype, seed=1)
    w = _randn(hidden_size, dtype=dtype, seed=2)
    torch.testing.assert_close(rms_norm(x, w, EPS), rms_norm_ref(x, w, EPS), **TOL[dtype])
    out, new_residual = fused_add_rms_norm(x, residual, w, EPS)
    expected, expected_residual = fused_add_rms_norm_ref(x, residual, w, EPS)
    torch.testing.assert_close(new_residual, expected_residual, atol=0, rtol=0)
    torch.testing.assert_close(out, expected, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", TOKENS)
def test_rms_norm_per_head_views(num_tokens: int, dtype: torch.dtype) -> None:
    """Qwen3's q_norm/k_norm on [T, heads, head_dim] views of the fused qkv output."""
    heads, kv_heads, head_dim = 32, 8, 128
    qkv = _randn(num_tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=3)
    q = qkv[:, : heads * head_dim].view(num_tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(num_tokens, -1, head_dim)
    w = _randn(head_dim, dtype=dtype, seed=4)
    for x in (q, k):
        torch.testing.assert_close(rms_norm(x, w, EPS), rms_norm_ref(x, w, EPS), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox_style", [True, False])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "rotary_dim"),
    [(32, 8, 128, 128), (7, 1, 64, 32), (40, 8, 80, 80)],
)
@pytest.mark.parametrize("num_tokens", TOKENS)
def test_rotary_embedding(
    num_tokens: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    rotary_dim: int,
    is_neox_style: bool,
    dtype: torch.dtype,
) -> None:
    qkv = _randn(num_tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=5)
    q = qkv[:, : heads * head_dim].view(num_tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(num_tokens, -1, head_dim)
    max_position = 8192
    t = torch.arange(max_position, device="cuda").float()
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, rotary_dim, 2, device="cuda") / rotary_dim)
    freqs = torch.outer(t, inv_freq)
    cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
    gen = torch.Generator(device="cuda").manual_seed(6)
    positions = torch.randint(0, max_position, (num_tokens,), generator=gen, device="cuda")
    q_out, k_out = rotary_embedding(positions, q, k, cache, rotary_dim, is_neox_style)
    q_ref, k_ref = rotary_embedding_ref(positions, q, k, cache, rotary_dim, is_neox_style)
    torch.testing.assert_close(q_out, q_ref, **TOL[dtype])
    torch.testing.assert_close(k_out, k_ref, **TOL[dtype])
    # The same with Qwen3's per-head q/k RMSNorm fused in front. Both round the normed values to
    # the dtype, from sums of squares added in different orders: a normed value may round one
    # ulp apart, and a rotated output then differs by up to sqrt(2) ulps of the normed values
    # (seen: 1-3 of 13-17 million elements, 0.0029 in float16 and 0.0115 in bfloat16).
    q_w, k_w = (_randn(head_dim, dtype=dtype, seed=s).abs() + 0.5 for s in (7, 8))
    args = (cache, rotary_dim, is_neox_style, (q_w, k_w, EPS))
    q_out, k_out = rotary_embedding(positions, q, k, *args)
    q_ref, k_ref = rotary_embedding_ref(positions, q, k, *args)
    for out, ref, x, w in ((q_out, q_ref, q, q_w), (k_out, k_ref, k, k_w)):
        top = rms_norm_ref(x, w, EPS).abs().max().item()  # the largest normed value
        ulp = torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(top))
        atol = max(TOL[dtype]["atol"], 1.5 * ulp)
        torch.testing.assert_close(out, ref, atol=atol, rtol=TOL[dtype]["rtol"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 769, 4096])
@pytest.mark.parametrize("num_tokens", TOKENS)
def test_silu_and_mul(num_tokens: int, d: int, dtype: torch.dtype) -> None:
    x = _randn(num_tokens, 2 * d, dtype=dtype, seed=d, scale=3.0)
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_ref(x), **TOL[dtype])


@pytest.mark.parametrize(
    ("dtype", "cache_dtype"),
    [(dt, dt) for dt in DTYPES] + [(dt, torch.float8_e4m3fn) for dt in DTYPES],
)
@pytest.mark.parametrize(("kv_heads", "head_dim"), [(8, 128), (1, 64), (3, 96)])
@pytest.mark.parametrize("num_tokens", TOKENS)
def test_reshape_and_cache(
    num_tokens: int, kv_heads: int, head_dim: int, dtype: torch.dtype, cache_dtype: torch.dtype
) -> None:
    block_size = 16
    num_blocks = num_tokens // block_size + 5
    # k, v: views of a fused qkv output; 100 sigma / k_scale 0.1 clamps some fp8 values at 448
    kv = _randn(num_tokens, 3 * kv_heads * head_dim, dtype=dtype, seed=7, scale=100.0)
    k = kv[:, kv_heads * head_dim : 2 * kv_heads * head_dim].view(num_tokens, kv_heads, head_dim)
    v = kv[:, 2 * kv_heads * head_dim :].view(num_tokens, kv_heads, head_dim)
    gen = torch.Generator(device="cuda").manual_seed(8)
    slots = torch.randperm(num_blocks * block_size, generator=gen, device="cuda")[:num_tokens]
    if num_tokens > 1:
        slots[::3] = -1  # padding rows of a CUDA-graph batch
    shape = (2, num_blocks, block_size, kv_heads, head_dim)
    expected = torch.full(shape, 7.0, device="cuda").to(cache_dtype)  # 7.0: "never written"
    cache = expected.clone()
    reshape_and_cache_ref(k, v, expected, slots, 0.1, 3.0)
    reshape_and_cache(k, v, cache, slots, 0.1, 3.0)
    as_bits = torch.uint8 if cache_dtype == torch.float8_e4m3fn else cache_dtype
    assert torch.equal(cache.view(as_bits), expected.view(as_bits))
    if cache_dtype == torch.float8_e4m3fn:
        assert not bool(cache.float().isnan().any())
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool, device="cuda")
    untouched[slots[slots >= 0]] = False
    assert bool((cache.float().flatten(1, 2)[:, untouched] == 7.0).all())


@pytest.mark.parametrize(
    ("dtype", "cache_dtype"),
    [(dt, dt) for dt in DTYPES] + [(dt, torch.float8_e4m3fn) for dt in DTYPES],
)
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "rotary_dim"), [(16, 8, 128, 128), (7, 1, 64, 32)]
)
@pytest.mark.parametrize("num_tokens", [1, 7, 4099])
def test_rotary_and_cache(
    num_tokens: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    rotary_dim: int,
    norm: bool,
    dtype: torch.dtype,
    cache_dtype: torch.dtype,
) -> None:
    """Rotary (after the q/k norms) with k and v written into the cache: the chain of references.
    V is copied bit for bit (fp8: scaled as reshape_and_cache scales it); rotated values may round
    one step apart (an ulp of the dtype, or of fp8: 1/8 relative)."""
    block_size = 16
    num_blocks = num_tokens // block_size + 5
    qkv = _randn(num_tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=12, scale=4.0)
    q = qkv[:, : heads * head_dim].view(num_tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(num_tokens, -1, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim :].view(num_tokens, -1, head_dim)
    angles = torch.rand(8192, rotary_dim // 2, device="cuda") * 100
    cos_sin = torch.cat([angles.cos(), angles.sin()], dim=-1)
    gen = torch.Generator(device="cuda").manual_seed(13)
    positions = torch.randint(0, 8192, (num_tokens,), generator=gen, device="cuda")
    slots = torch.randperm(num_blocks * block_size, generator=gen, device="cuda")[:num_tokens]
    if num_tokens > 1:
        slots[::3] = -1  # padding rows of a CUDA-graph batch
    weights = (_randn(head_dim, dtype=dtype, seed=s).abs() + 0.5 for s in (14, 15))
    shape = (2, num_blocks, block_size, kv_heads, head_dim)
    expected = torch.full(shape, 7.0, device="cuda").to(cache_dtype)
    cache = expected.clone()
    args = (cos_sin, rotary_dim, True, 0.05, 0.1, (*weights, EPS) if norm else None)
    q_out = rotary_and_cache(positions, q, k, v, cache, slots, *args)
    q_ref = rotary_and_cache_ref(positions, q, k, v, expected, slots, *args)
    fp8 = cache_dtype == torch.float8_e4m3fn
    top = q_ref.float().abs().max().item()
    ulp = torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(top))
    torch.testing.assert_close(
        q_out, q_ref, atol=max(TOL[dtype]["atol"], 1.5 * ulp), rtol=TOL[dtype]["rtol"]
    )
    as_bits = torch.uint8 if fp8 else cache_dtype
    assert torch.equal(cache[1].view(as_bits), expected[1].view(as_bits))
    # Keys compared in k's own units (fp8: stored * k_scale): the rotation's rounding (1.5 ulps of
    # the inputs' scale, large beside a value that cancels to near zero) plus, for fp8, one
    # fp8 step (1/8 relative; 2**-9 stored below the normals).
    unit = args[3] if fp8 else 1.0
    atol = max(TOL[dtype]["atol"], 1.5 * ulp) + (2.0**-9 * unit if fp8 else 0.0)
    torch.testing.assert_close(
        cache[0].float() * unit,
        expected[0].float() * unit,
        atol=atol,
        rtol=0.13 if fp8 else TOL[dtype]["rtol"],
    )
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool, device="cuda")
    untouched[slots[slots >= 0]] = False
    assert bool((cache.float().flatten(1, 2)[:, untouched] == 7.0).all())


def test_ops_compile_with_dynamic_tokens() -> None:
    """The ops trace under torch.compile (fullgraph, Inductor): one graph for all token counts,
    the norms and SiLU kept as ops in it (their launchers, with PDL, run at run time)."""
    heads, kv_heads, head_dim = 8, 2, 64
    hidden = (heads + kv_heads) * head_dim
    w_hidden = _randn(hidden, dtype=torch.bfloat16, seed=9)
    w_head = _randn(head_dim, dtype=torch.bfloat16, seed=10)
    t = torch.arange(4096, device="cuda").float()
    freqs = torch.outer(
        t, 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2, device="cuda") / head_dim)
    )
    cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1)

    def layer(
        positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        h, residual = ops.fused_add_rms_norm(x, residual, w_hidden, EPS)
        q = ops.rms_norm(h[:, : heads * head_dim].view(-1, heads, head_dim), w_head, EPS)
        k = h[:, heads * head_dim :].view(-1, kv_heads, head_dim)
        q, k = ops.rotary_embedding(positions, q, k, cache, head_dim, True)
        act = ops.silu_and_mul(torch.cat([q.flatten(1), k.flatten(1).repeat(1, 4)], dim=-1))
        return act, ops.rms_norm(residual, w_hidden, EPS), residual

    torch.compiler.reset()
    # As atom/executor/compile.py does: static shapes but the token dimension.
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for num_tokens in (7, 256, 33):
            x = _randn(num_tokens, hidden, dtype=torch.bfloat16, seed=num_tokens)
            residual = _randn(num_tokens, hidden, dtype=torch.bfloat16, seed=11)
            positions = torch.arange(num_tokens, device="cuda") * 3
            for tensor in (positions, x, residual):
                torch._dynamo.mark_dynamic(tensor, 0)
            got, expected = compiled(positions, x, residual), layer(positions, x, residual)
            for a, b in zip(got, expected, strict=True):
                torch.testing.assert_close(a, b, **TOL[torch.bfloat16])
    graphs: list[torch.fx.GraphModule] = []

    def record(
        gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]
    ) -> Callable[..., object]:
        graphs.append(gm)
        return gm.forward

    torch.compiler.reset()
    torch.compile(layer, backend=record, fullgraph=True)(positions, x, residual)
    targets = {str(n.target).removesuffix(".default") for gm in graphs for n in gm.graph.nodes}
    names = {"atom.rms_norm", "atom.fused_add_rms_norm", "atom.silu_and_mul"}
    assert names <= targets
