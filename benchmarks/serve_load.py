"""Load benchmark of `moec serve` (and llama.cpp's server on the same weights, where installed):
a fixed, seeded set of streamed completion requests at several concurrencies, on loopback.

    python benchmarks/serve_load.py --artifact m.moec --concurrency 1 4 16 64 --requests 64
    python benchmarks/serve_load.py --model qwen3 --workdir /tmp/bench \\
        --llama-python /path/to/python-with-llama-cpp-python --llama-src /path/to/llama.cpp

--model builds the random-weight checkpoint, its artifact and (with --llama-src) its GGUF the
way benchmarks/generate.py does. Each server runs in its own process, started here on a free
127.0.0.1 port, with 2 threads. Requests: prompt lengths log-normal (median --prompt-median
words, clipped to 8..1024), output lengths uniform in --new-min..--new-max tokens, all from
--seed; each request streams (`stream_options.include_usage`) through the official `openai`
client, so both servers see the same client.

Per (system, concurrency): output tokens/s (generated tokens / wall time of the level),
requests/s, p50/p99 time to first token and inter-token latency (gaps between streamed chunks
carrying text), errors, and the server's RSS before and after the level (psutil). Each level
is bounded by --max-seconds: no request starts after it (the table says how many ran).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
WORDS = ("the expert router sends every token to a few experts whose outputs are weighted and "
         "summed again before the next layer reads them while the cache keeps keys and values "
         "of each block so that decoding attends to the whole sequence").split()


def workload(n: int, seed: int, median: int, new_min: int, new_max: int) -> list[tuple[str, int]]:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(median), 0.6, n), 8, 1024).astype(int)
    news = rng.integers(new_min, new_max + 1, n)
    return [(" ".join(rng.choice(WORDS, int(k))), int(m)) for k, m in zip(lengths, news,
                                                                          strict=True)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moec(artifact: str, max_batch: int) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "TVM_NUM_THREADS": "2", "OMP_NUM_THREADS": "2",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "moec.cli", "serve", artifact, "--port", "0",
                             "--max-batch", str(max_batch), "--max-queue", "1024",
                             "--log-level", "warning"], stdout=subprocess.PIPE, text=True,
                            env=env)
    line: list[str] = []
    t = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    t.start()
    t.join(300)
    if not line or "http://" not in line[0]:
        proc.kill()
        raise RuntimeError(f"moec serve did not start: {line}")
    return proc, line[0].split(" on ", 1)[1].split()[0]


def start_llama(python: str, gguf: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([python, "-m", "llama_cpp.server", "--model", str(gguf), "--host",
                             "127.0.0.1", "--port", str(port), "--n_threads", "2",
                             "--n_ctx", "4096"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    import urllib.request

    t0 = time.monotonic()
    while time.monotonic() - t0 < 300:
        try:
            urllib.request.urlopen(url + "/models", timeout=2).read()
            return proc, url
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("llama.cpp's server did not start")


async def one(client, model: str, prompt: str, new: int) -> dict:
    t0 = time.perf_counter()
    first, last, gaps, tokens, chunks = None, None, [], None, 0
    stream = await client.completions.create(
        model=model, prompt=prompt, max_tokens=new, temperature=0, stream=True,
        stream_options={"include_usage": True})
    async for ch in stream:
        now = time.perf_counter()
        if ch.choices and ch.choices[0].text:
            chunks += 1
            if first is None:
                first = now
            else:
                gaps.append(now - last)
            last = now
        if ch.usage is not None:
            tokens = ch.usage.completion_tokens
    # llama-cpp-python's server sends no usage chunk: there, one streamed chunk is one token
    return {"ttft": (first or time.perf_counter()) - t0, "gaps": gaps,
            "tokens": chunks if tokens is None else tokens,
            "tokens_from": "chunks" if tokens is None else "usage"}


async def level(url: str, reqs: list[tuple[str, int]], conc: int, max_seconds: float) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600)
    model = (await client.models.list()).data[0].id
    todo = list(reqs)
    rows, errors = [], []
    t0 = time.perf_counter()

    async def worker() -> None:
        while todo and time.perf_counter() - t0 < max_seconds:
            prompt, new = todo.pop(0)
            try:
                rows.append(await one(client, model, prompt, new))
            except Exception as e:  # counted, and shown once
                errors.append(f"{type(e).__name__}: {e}")

    await asyncio.gather(*[worker() for _ in range(conc)])
    wall = time.perf_counter() - t0
    await client.close()
    ttft = [r["ttft"] for r in rows]
    gaps = [g for r in rows for g in r["gaps"]]

    def pct(xs: list[float], q: float) -> float:  # milliseconds
        return float(np.percentile(xs, q)) * 1e3 if xs else float("nan")

    return {"requests": len(rows), "errors": len(errors), "first_error": errors[:1],
            "wall_s": wall, "output_tok_s": sum(r["tokens"] for r in rows) / wall,
            "req_s": len(rows) / wall, "ttft_p50_ms": pct(ttft, 50),
            "ttft_p99_ms": pct(ttft, 99), "itl_p50_ms": pct(gaps, 50),
            "itl_p99_ms": pct(gaps, 99)}


def rss_mb(proc: subprocess.Popen) -> float:
    import psutil

    return psutil.Process(proc.pid).memory_info().rss / 2**20


def bench(system: str, proc: subprocess.Popen, url: str, a: argparse.Namespace) -> list[dict]:
    reqs = workload(a.requests, a.seed, a.prompt_median, a.new_min, a.new_max)
    out = []
    try:
        for conc in a.concurrency:
            before = rss_mb(proc)
            row = asyncio.run(level(url, reqs, conc, a.max_seconds))
            row.update(system=system, concurrency=conc, rss_before_mb=before,
                       rss_after_mb=rss_mb(proc))
            out.append(row)
            print(fmt(row), flush=True)
    finally:
        proc.terminate()
        proc.wait(120)
    return out


HEADER = (f"{'system':<10} {'conc':>4} {'reqs':>5} {'err':>4} {'out tok/s':>10} {'req/s':>7} "
          f"{'TTFT p50':>9} {'p99':>8} {'ITL p50':>8} {'p99':>8} {'RSS MB':>15}")


def fmt(r: dict) -> str:
    return (f"{r['system']:<10} {r['concurrency']:>4} {r['requests']:>5} {r['errors']:>4} "
            f"{r['output_tok_s']:>10.1f} {r['req_s']:>7.2f} {r['ttft_p50_ms']:>7.0f}ms "
            f"{r['ttft_p99_ms']:>6.0f}ms {r['itl_p50_ms']:>6.1f}ms {r['itl_p99_ms']:>6.1f}ms "
            f"{r['rss_before_mb']:>6.0f}->{r['rss_after_mb']:<6.0f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--artifact", default=None, help="a generation artifact to serve")
    p.add_argument("--model", default=None, help="or build one: qwen3 / mixtral "
                   "(benchmarks/generate.py's random-weight models) in --workdir")
    p.add_argument("--workdir", default="/tmp/moec-serve-bench")
    p.add_argument("--gguf", default=None, help="llama.cpp's weights (else converted from "
                   "--model with --llama-src)")
    p.add_argument("--llama-python", default=None, help="python with llama-cpp-python[server]")
    p.add_argument("--llama-src", default=None, help="llama.cpp source (convert_hf_to_gguf.py)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-median", type=int, default=64, help="words")
    p.add_argument("--new-min", type=int, default=16)
    p.add_argument("--new-max", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seconds", type=float, default=300, help="per level")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    if (a.artifact is None) == (a.model is None):
        p.error("give --artifact or --model")
    gguf = Path(a.gguf) if a.gguf else None
    if a.model is not None:
        sys.path.insert(0, str(HERE))
        import generate

        work = Path(a.workdir)
        work.mkdir(parents=True, exist_ok=True)
        a.artifact = str(generate.artifact(work, a.model, "fp32"))
        if gguf is None and a.llama_src:
            gguf = generate.gguf(work, a.model, "f32", Path(a.llama_src))
    print(HEADER)
    rows = bench("moec", *start_moec(a.artifact, a.max_batch), a)
    if a.llama_python and gguf is not None:
        rows += bench("llama.cpp", *start_llama(a.llama_python, gguf), a)
    else:
        print("llama.cpp: missing (give --llama-python and --gguf or --llama-src)")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
