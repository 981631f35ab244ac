"""The timed part of the serving benchmark: one HTTP session, warm-up, profiler calls, arrivals and
the concurrency limit."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence

import aiohttp
import numpy as np
from tqdm import tqdm

from atom.benchmarks.serving_client import ClientConfig, RequestResult, post_control, send_request
from atom.benchmarks.serving_datasets import BenchmarkRequest

# Idle client connections close before any common server's keep-alive timeout (uvicorn's is 5 s),
# so that a request never goes out on a connection the server is closing.
CLIENT_KEEPALIVE_S = 2.0


async def arrivals(
    requests: Sequence[BenchmarkRequest],
    rate: float,
    burstiness: float,
    rng: np.random.RandomState,
) -> AsyncIterator[BenchmarkRequest]:
    """Requests at `rate` per second: gamma-distributed gaps of mean 1/rate (shape `burstiness`;
    1 is a Poisson process, lower is burstier); all at once when the rate is infinite."""
    theta = 1.0 / (rate * burstiness)
    for request in requests:
        yield request
        if rate != float("inf"):
            await asyncio.sleep(rng.gamma(shape=burstiness, scale=theta))


def raise_open_file_limit() -> None:
    """Each request in flight holds a socket: lift the soft limit (often 1024) to the hard one."""
    try:
        import resource
    except ImportError:  # not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


async def run_requests(
    args: argparse.Namespace,
    client: ClientConfig,
    base_url: str,
    requests: Sequence[BenchmarkRequest],
    rng: np.random.RandomState,
) -> tuple[list[RequestResult], float]:
    """Results in the order of `requests`, and the wall time of the timed run in seconds."""
    raise_open_file_limit()
    # limit=0: the connector never queues a request (aiohttp's default is 100 connections).
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=CLIENT_KEEPALIVE_S)
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None

        async def one(request: BenchmarkRequest, bar: tqdm | None) -> RequestResult:
            async with limit if limit is not None else contextlib.nullcontext():
                result = await send_request(session, client, request)
            if bar is not None:
                bar.update(1)
            return result

        if args.num_warmups > 0:
            print(f"Warming up with {args.num_warmups} requests...")
            warm = [one(requests[0], None) for _ in range(args.num_warmups)]
            failed = [r.error for r in await asyncio.gather(*warm) if not r.success]
            if failed:
                print(f"WARNING: {len(failed)} warm-up requests failed, e.g.: {failed[0]}")
            print("Warmup completed.")
        if args.profile:
            await _profile(session, base_url, client, "start")
        shape = "Poisson process" if args.burstiness == 1.0 else "Gamma distribution"
        print(f"Traffic request rate: {args.request_rate}")
        print(f"Burstiness factor: {args.burstiness} ({shape})")
        print(f"Maximum request concurrency: {args.max_concurrency}")
        bar = None if args.disable_tqdm else tqdm(total=len(requests))
        start = time.perf_counter()
        tasks = []
        async for request in arrivals(requests, args.request_rate, args.burstiness, rng):
            tasks.append(asyncio.create_task(one(request, bar)))
        results = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - start
        if bar is not None:
            bar.close()
        if args.profile:
            await _profile(session, base_url, client, "stop")
    return results, duration


async def _profile(
    session: aiohttp.ClientSession, base_url: str, client: ClientConfig, what: str
) -> None:
    error = await post_control(session, f"{base_url}/{what}_profile", client.headers)
    if error is None:
        print("Profiler started" if what == "start" else "Profiler stopped")
    else:
        print(f"WARNING: /{what}_profile failed: {error}")
