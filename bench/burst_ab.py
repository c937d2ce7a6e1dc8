"""Burst A/B: the TTFT of whole bursts sent to one URL against whole bursts sent to another, in rounds.

A burst's TTFT p50 scatters by tens of ms from burst to burst (how its arrivals split over the first prefill
steps), so one burst each way cannot show a 5 ms difference; and splitting one burst between the two URLs
measures queue position instead (a request that arrives later by d waits behind every direct request that
arrived in that d). So: many bursts, each wholly to A (e.g. the gateway) or wholly to B (the engine
directly), in rounds A B / B A / A B ... (drift cancels), from client processes that stay up between bursts
and start each burst together. Reported: each side's per-burst TTFT p50 and mean, and the rounds' paired
differences (A - B) with their mean, standard error and median. The first round is a warm-up, not counted
(it opens the clients' connections).

  python bench/burst_ab.py --url http://127.0.0.1:8701 --baseline-url http://127.0.0.1:8700 --rounds 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from serving import one_request, pct, workload  # noqa: E402


def client(bursts: list[list[dict]], barrier, model: str | None, results) -> None:
    """One client process: its share of each burst, sent at once when every process is at the barrier."""
    import aiohttp

    async def main():
        timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
        outs = []
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as s:
            for burst in bursts:
                barrier.wait()  # nothing else runs on this loop between bursts
                outs.append(await asyncio.gather(*(one_request(s, r["url"], r, True, model) for r in burst)))
        return outs

    results.put(asyncio.run(main()))


def burst_figures(outs: list[dict]) -> dict:
    ok = [o for o in outs if o["ok"] and o["ttft"] is not None]
    ttft = pct([o["ttft"] for o in ok])
    figures = {"errors": len(outs) - len(ok), "ttft_p50": ttft.get("p50"), "ttft_mean": ttft.get("mean")}
    shares = [o["gateway_s"] for o in ok if "gateway_s" in o]
    if shares:
        figures["gateway_share_p50"] = pct(shares)["p50"]
    return figures


def mean_se(xs: list[float]) -> dict:
    se = statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else None
    return {
        "mean": round(statistics.fmean(xs), 2),
        "se": se and round(se, 2),
        "median": round(statistics.median(xs), 2),
    }


def run_rounds(args: argparse.Namespace) -> dict:
    urls = {"a": args.url, "b": args.baseline_url}
    order = []  # (side, salt) of each burst, in sending order: A B, B A, A B, ...
    for r in range(args.rounds + 1):
        pair = ["a", "b"] if r % 2 == 0 else ["b", "a"]
        order += [(side, args.salt + 2 * r + i) for i, side in enumerate(pair)]
    bursts = []
    for side, salt in order:
        reqs = workload(args.num_prompts, tuple(args.input_len), tuple(args.output_len), float("inf"), args.seed, salt)
        bursts.append([req | {"url": urls[side]} for req in reqs])
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(args.processes), ctx.Queue()
    shares = [[burst[i :: args.processes] for burst in bursts] for i in range(args.processes)]
    procs = [ctx.Process(target=client, args=(share, barrier, None, results)) for share in shares]
    for p in procs:
        p.start()
    per_process = [results.get() for _ in procs]
    for p in procs:
        p.join()
    figures = [burst_figures([o for outs in per_process for o in outs[j]]) for j in range(len(bursts))]
    rounds = []  # (A's figures, B's figures) of each counted round
    for r in range(1, args.rounds + 1):
        first, second = figures[2 * r], figures[2 * r + 1]
        rounds.append((first, second) if order[2 * r][0] == "a" else (second, first))
    report = {"rounds": args.rounds, "num_prompts": args.num_prompts, "errors": sum(f["errors"] for f in figures)}
    for i, side in enumerate("ab"):
        report[side] = {
            "url": urls[side],
            "ttft_p50_ms": mean_se([r[i]["ttft_p50"] for r in rounds]),
            "ttft_mean_ms": mean_se([r[i]["ttft_mean"] for r in rounds]),
            "per_burst_p50": [r[i]["ttft_p50"] for r in rounds],
        }
        if "gateway_share_p50" in rounds[0][i]:
            report[side]["gateway_share_p50_ms"] = mean_se([r[i]["gateway_share_p50"] for r in rounds])
    report["a_minus_b_p50_ms"] = mean_se([a["ttft_p50"] - b["ttft_p50"] for a, b in rounds])
    report["a_minus_b_mean_ms"] = mean_se([a["ttft_mean"] - b["ttft_mean"] for a, b in rounds])
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", required=True, help="A: e.g. the gateway")
    p.add_argument("--baseline-url", required=True, help="B: e.g. the engine's server directly")
    p.add_argument("--rounds", type=int, default=20, help="counted rounds (one burst each way), after a warm-up")
    p.add_argument("--num-prompts", type=int, default=256, help="requests a burst")
    p.add_argument("--input-len", type=int, nargs=2, default=(100, 1024), metavar=("MIN", "MAX"))
    # Short outputs keep a burst short; its first tokens come in the prefill phase, the same with long ones.
    p.add_argument("--output-len", type=int, nargs=2, default=(32, 64), metavar=("MIN", "MAX"))
    p.add_argument("--processes", type=int, default=4, help="client processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--salt", type=int, default=1000, help="prompt ids of the first burst (each burst its own)")
    p.add_argument("--label", default="")
    args = p.parse_args()
    start = time.time()
    report = run_rounds(args) | {"label": args.label, "seconds": round(time.time() - start, 1)}
    print("RESULT burst_ab " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
