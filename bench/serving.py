"""Serving benchmark in the style of vLLM's `bench serve`: what a client sees over HTTP.

Requests of random token ids to /v1/completions (ignore_eos, so output lengths are as drawn), all at once
(`--rate inf`) or with Poisson arrivals (`--rate R` per second), streaming or not, sent by several client
processes (one Python client cannot parse 25,000 events a second). Reports output throughput, TTFT, TPOT
(per request: (E2E - TTFT) / (tokens - 1)), ITL (gaps between events), E2E (p50/p90/p99) and errors, plus
the engine's own mean inter-token latency from its /metrics. One `RESULT serving {...}` line per run.

  python bench/serving.py --url http://127.0.0.1:8000 --stream            # a running server or gateway
  python bench/serving.py --model DIR --stream [--gateway] [--serve-args "--max-num-batched-tokens 16384"]
  python bench/serving.py --model DIR --num-prompts 300 --rate 32 --output-len 50 300 --stream
--model starts `nanoserve serve` (and with --gateway a gateway in front of it) and stops them at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import shlex
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np


def workload(
    n: int, input_len: tuple[int, int], output_len: tuple[int, int], rate: float, seed: int, salt: int = 0
) -> list[dict]:
    """Requests in arrival order: prompt ids, max_tokens and the send time (seconds after the start). With
    seed 0, salt 0 and the default lengths: Nano-vLLM's bench.py workload. Another salt keeps the lengths and
    changes the ids, so that a run finds nothing of the previous one in the prefix cache."""
    rng = random.Random(seed)
    ids = rng if salt == 0 else random.Random(f"{seed}/{salt}")
    reqs, t = [], 0.0
    for _ in range(n):
        prompt = [ids.randint(0, 10000) for _ in range(rng.randint(*input_len))]
        reqs.append({"prompt": prompt, "max_tokens": rng.randint(*output_len), "at": t})
        if rate != float("inf"):
            t += rng.expovariate(rate)
    return reqs


async def one_request(session, url: str, req: dict, stream: bool, model: str | None) -> dict:
    import aiohttp

    body = {
        "prompt": req["prompt"],
        "max_tokens": req["max_tokens"],
        "temperature": 0.6,
        "ignore_eos": True,
        "stream": stream,
    }
    if model:
        body["model"] = model
    if stream:
        body["stream_options"] = {"include_usage": True}
    start = time.perf_counter()
    out = {"ok": False, "ttft": None, "events": [], "tokens": 0, "start": time.time()}
    try:
        async with session.post(url + "/v1/completions", json=body) as resp:
            if resp.status != 200:
                out["error"] = f"status {resp.status}: {(await resp.text())[:200]}"
                return out
            out |= server_timing(resp.headers.get("Server-Timing", ""))
            if not stream:
                data = await resp.json()
                out["tokens"] = data["usage"]["completion_tokens"]
            else:
                last = b""
                async for line in resp.content:
                    if not line.startswith(b"data: "):
                        continue
                    now = time.perf_counter() - start
                    if line.startswith(b"data: [DONE]"):
                        break
                    if b'"usage"' in line and b'"choices": []' in line:
                        last = line
                        continue
                    out["events"].append(now)
                    if out["ttft"] is None:
                        out["ttft"] = now
                out["tokens"] = json.loads(last[6:])["usage"]["completion_tokens"] if last else 0
            out["e2e"] = time.perf_counter() - start
            out["ok"] = True
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError, KeyError) as e:
        out["error"] = repr(e)
    return out


def server_timing(header: str) -> dict[str, float]:
    """The gateway's Server-Timing (gateway/proxy.py) as seconds: `gateway_s` (its own share of the time to
    first byte), `engine_s` (the engine's first byte, as the gateway saw it). Empty for an engine's answer."""
    out = {}
    for metric in header.split(","):
        name, _, rest = metric.strip().partition(";")
        if name in ("gateway", "engine") and rest.startswith("dur="):
            out[f"{name}_s"] = float(rest[4:].split(";")[0]) / 1e3
    return out


def client(reqs: list[dict], t0: float, stream: bool, model: str | None, results) -> None:
    """One client process: sends its share of the requests, each to its "url", at their times (t0 is a
    shared wall clock)."""
    import aiohttp

    async def main():
        timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as s:

            async def send(req):
                await asyncio.sleep(max(0.0, t0 + req["at"] - time.time()))
                out = await one_request(s, req["url"], req, stream, model)
                return out | {"url": req["url"], "prompt_len": len(req["prompt"]), "max_tokens": req["max_tokens"]}

            return await asyncio.gather(*(send(r) for r in reqs))

    results.put(asyncio.run(main()))


ENGINE_HISTOGRAMS = {"itl": "vllm:inter_token_latency_seconds", "ttft": "vllm:time_to_first_token_seconds"}


def engine_sums(metrics_url: str | None) -> dict[str, tuple[float, float]] | None:
    """(sum, count) of each of the engine's ENGINE_HISTOGRAMS."""
    if not metrics_url:
        return None
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(metrics_url + "/metrics", timeout=10).read().decode()
    sums = {key: [0.0, 0.0] for key in ENGINE_HISTOGRAMS}
    for f in text_string_to_metric_families(text):
        for s in f.samples:
            for key, name in ENGINE_HISTOGRAMS.items():
                if s.name == name + "_sum":
                    sums[key][0] += s.value
                elif s.name == name + "_count":
                    sums[key][1] += s.value
    return {key: (total, count) for key, (total, count) in sums.items()}


def pct(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {}
    a = np.asarray(xs) * 1e3
    return {
        "mean": round(float(a.mean()), 2),
        "p50": round(float(np.percentile(a, 50)), 2),
        "p90": round(float(np.percentile(a, 90)), 2),
        "p99": round(float(np.percentile(a, 99)), 2),
    }


def summary(outs: list[dict], stream: bool, t0: float) -> dict:
    """Throughput, latencies and errors of one run's requests."""
    end = max((o["start"] + o["e2e"] for o in outs if o["ok"]), default=t0)
    ok = [o for o in outs if o["ok"]]
    tokens = sum(o["tokens"] for o in ok)
    report = {
        "requests": len(outs),
        "errors": len(outs) - len(ok),
        "duration_s": round(end - t0, 3),
        "output_tokens": tokens,
        "output_tok_s": round(tokens / max(end - t0, 1e-9), 1),
        "stream": stream,
        "e2e_ms": pct([o["e2e"] for o in ok]),
    }
    if stream:
        report["ttft_ms"] = pct([o["ttft"] for o in ok if o["ttft"] is not None])
        report["tpot_ms"] = pct(
            [(o["e2e"] - o["ttft"]) / (o["tokens"] - 1) for o in ok if o["ttft"] is not None and o["tokens"] > 1]
        )
        report["itl_ms"] = pct([b - a for o in ok for a, b in zip(o["events"], o["events"][1:])])
        report["events_per_token"] = round(sum(len(o["events"]) for o in ok) / max(tokens, 1), 3)
    timed = [o for o in ok if "gateway_s" in o]
    if timed:  # through the gateway: its own share of the time to first byte (Server-Timing), and
        report["gateway_share_ms"] = pct([o["gateway_s"] for o in timed])
        if stream:  # the rest of the TTFT past its and the engine's shares: connecting, queueing, the relay
            report["rest_ms"] = pct([o["ttft"] - o["gateway_s"] - o["engine_s"] for o in timed if o["ttft"]])
    errors = [o["error"] for o in outs if not o["ok"]]
    if errors:
        report["first_error"] = errors[0]
    return report


# A request's figures in --records (gateway_s, engine_s: its Server-Timing, through the gateway).
RECORD_FIELDS = ("url", "prompt_len", "max_tokens", "start", "ttft", "e2e", "tokens", "ok", "gateway_s", "engine_s")


def run(
    urls: list[str],
    reqs: list[dict],
    stream: bool,
    processes: int,
    model: str | None,
    metrics_url: str | None,
    records: str | None = None,
    tag: dict | None = None,
) -> dict:
    """One run: its report; each request's figures appended to `records` (JSON lines, with `tag`). With two
    URLs the requests alternate between them in one run, and the report has each one's own too (`by_url`):
    a burst's TTFT scatters by tens of ms from run to run, the same for both halves of one run."""
    before = engine_sums(metrics_url)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    t0 = time.time() + 2.0  # every client process is up by then
    # (each client process sends to both URLs in turn: request i goes to process i % processes)
    reqs = [r | {"url": urls[i // processes % len(urls)]} for i, r in enumerate(reqs)]
    shares = [reqs[i::processes] for i in range(processes)]
    procs = [ctx.Process(target=client, args=(share, t0, stream, model, results)) for share in shares if share]
    for p in procs:
        p.start()
    outs = [o for _ in procs for o in results.get()]
    for p in procs:
        p.join()
    report = summary(outs, stream, t0)
    if len(urls) > 1:
        report["by_url"] = {u: summary([o for o in outs if o["url"] == u], stream, t0) for u in urls}
    after = engine_sums(metrics_url)
    for key in ENGINE_HISTOGRAMS if before and after else ():
        (s0, n0), (s1, n1) = before[key], after[key]
        if n1 > n0:
            report[f"engine_{key}_ms_mean"] = round((s1 - s0) / (n1 - n0) * 1e3, 2)
    if stream and "engine_ttft_ms_mean" in report:
        # The mean TTFT outside the engine's server (from its request's arrival to its first token): the
        # prefill's queueing, what makes bursts differ run to run, is inside, so this compares the paths.
        report["ttft_outside_engine_ms_mean"] = round(report["ttft_ms"]["mean"] - report["engine_ttft_ms_mean"], 2)
    if records:
        with open(records, "a") as f:
            for o in outs:
                f.write(json.dumps({k: o.get(k) for k in RECORD_FIELDS} | {"t0": t0} | (tag or {})) + "\n")
    return report


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url + "/ready", timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"{url} not ready after {timeout}s")


def start_servers(args) -> tuple[str, str, list[subprocess.Popen]]:
    """`nanoserve serve` on --model (and the gateway): (client URL, engine URL, processes)."""
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    engine_url = f"http://127.0.0.1:{args.port}"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "nanoserve.cli",
                "serve",
                "--model",
                args.model,
                "--host",
                "127.0.0.1",
                "--port",
                str(args.port),
                "--served-model-name",
                "bench",
                *shlex.split(args.serve_args),
            ],
            env=env,
        )
    ]
    wait_ready(engine_url, procs[0])
    if not args.gateway:
        return engine_url, engine_url, procs
    gw_url = f"http://127.0.0.1:{args.port + 1}"
    procs.append(
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "nanoserve.gateway",
                "--host",
                "127.0.0.1",
                "--port",
                str(args.port + 1),
                "--engine",
                engine_url,
                "--log-level",
                "WARNING",
            ],
            env=env,
        )
    )
    wait_ready(gw_url, procs[1])
    return gw_url, engine_url, procs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", help="a running server or gateway (else --model starts one)")
    p.add_argument("--paired-url", help="requests alternate between --url and this one, in each run (by_url)")
    p.add_argument("--metrics-url", help="the engine whose /metrics to read (default: --url, or the engine)")
    p.add_argument("--model", help="start `nanoserve serve` on this model folder")
    p.add_argument("--serve-args", default="", help="more `nanoserve serve` flags, one string")
    p.add_argument("--gateway", action="store_true", help="with --model: a gateway in front, requests through it")
    p.add_argument("--port", type=int, default=8700)
    p.add_argument("--stream", action="store_true")
    p.add_argument("--both", action="store_true", help="a non-streaming run, then a streaming one")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, nargs=2, default=(100, 1024), metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, nargs=2, default=(100, 1024), metavar=("MIN", "MAX"))
    p.add_argument("--rate", type=float, default=float("inf"), help="requests per second (Poisson); inf: at once")
    p.add_argument("--processes", type=int, default=4, help="client processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--salt", type=int, default=0, help="other prompt ids, same lengths (cold prefix cache)")
    p.add_argument("--warmup", type=int, default=8, help="requests sent first, not counted")
    p.add_argument("--label", default="")
    p.add_argument("--records", help="append each request's figures (JSON lines) to this file")
    args = p.parse_args()
    procs: list[subprocess.Popen] = []
    try:
        if args.url:
            url, engine_url = args.url, args.metrics_url or args.url
        elif args.model:
            url, engine_url, procs = start_servers(args)
        else:
            raise SystemExit("give --url or --model")
        model = "bench" if args.model else None
        urls = [url, args.paired_url] if args.paired_url else [url]
        if args.warmup:
            run(urls, workload(args.warmup, (16, 64), (4, 8), float("inf"), 99), True, 1, model, None)
        for i, stream in enumerate([False, True] if args.both else [args.stream]):
            reqs = workload(
                args.num_prompts, tuple(args.input_len), tuple(args.output_len), args.rate, args.seed, args.salt + i
            )
            metrics = engine_url if args.metrics_url or procs else args.url
            tag = {"label": args.label, "salt": args.salt + i}
            report = run(urls, reqs, stream, args.processes, model, metrics, args.records, tag)
            report.update(tag, rate=args.rate)
            print("RESULT serving " + json.dumps(report), flush=True)
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
