#!/usr/bin/python3
"""Sessions (issue #11) for BENCHMARKS.md, in one run on this machine, layer E=1024 H=16 (seeded), one
server with --workers 1 (every core in each batch):

1. Decode: attnbench --sessions 64 --context 1024 (one token per append, closed loop, the context kept within
   [1024, 1088)): tokens/s and p50/p99 per step; beside it the stateless alternative, each step resending its
   whole prefix (attnbench --seq 1025 --causal, unary Infer) at concurrency 64. Ratios of tokens/s and of the
   bytes each step sends.
2. Bandwidth: K and V bytes the decode steps read per second (tokens/s x 2 x context x E x 4) against the
   machine's copy bandwidth measured in the same run (bench/memory_bandwidth.cc, STREAM's copy rule: read plus
   written), against its read half, and against a sum of one array (reads alone, as the decode steps do).
3. Prefill while decoding: 32 decode sessions, alone and with one more session prefilling 8192 tokens over and
   over (attnbench --prefill 8192): decode p99 with / without.

    /usr/bin/python3 bench/sessions_bench.py [--build build] [--duration 10] [--rounds 3] [--only prefill]
    /usr/bin/python3 bench/sessions_bench.py --prefill-chunks 128,64 [--duration 20] [--rounds 2]
Rounds alternate the measurements; medians over rounds are reported. Prints a JSON summary. --prefill-chunks
runs part 3 once per `sessions.prefill_chunk_tokens` value (a server each, their order alternating by round),
with the background prefill's mean time (steps of 10 s hold about one 8192-token prefill: use 20 s).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serving_bench import attnbench, server  # noqa: E402

E, H, CONTEXT = 1024, 16, 1024
LAYER = f'name: "dec" embed_dim: {E} num_heads: {H} seed: 11 max_sequence_length: 16384'


def decode(build, target, dur, sessions, prefill=0):
    args = ["--layer", "dec", "--sessions", str(sessions), "--context", str(CONTEXT), "--duration", dur,
            "--warmup", "2s"]
    if prefill:
        args += ["--prefill", str(prefill)]
    return attnbench(build, target, *args)[0]


def stateless(build, target, dur):
    return attnbench(build, target, "--layer", "dec", "--seq", str(CONTEXT + 1), "--causal", "--concurrency", "64",
                     "--duration", dur, "--warmup", "2s", "--timeout-ms", "120000")[0]


def bandwidth(build):
    out = subprocess.run([f"{build}/bench/attnserve_memory_bandwidth", "512"], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out)


def med(xs):
    return statistics.median(xs)


def prefill_summary(rounds):
    p = {
        "decode32_p99_ms": med([x["latency_ms"]["p99"] for x in rounds["decode32"]]),
        "decode32_with_prefill_p99_ms": med([x["latency_ms"]["p99"] for x in rounds["decode32_prefill"]]),
        "decode32_tokens_per_s": med([x["ok_per_second"] for x in rounds["decode32"]]),
        "decode32_with_prefill_tokens_per_s": med([x["ok_per_second"] for x in rounds["decode32_prefill"]]),
    }
    p["prefill_p99_ratio"] = p["decode32_with_prefill_p99_ms"] / p["decode32_p99_ms"]
    seconds = [x["prefill"]["seconds_mean"] for x in rounds["decode32_prefill"] if "prefill" in x]
    p["prefill_8192_seconds"] = med(seconds) if seconds else None  # None: none completed within a step
    return p


def compare_chunks(build, chunks, rounds, dur):
    """Part 3 per prefill_chunk_tokens value: {chunk: prefill_summary}."""
    tmp = tempfile.mkdtemp(prefix="attnserve_sessions_chunks_")
    per_chunk = {c: {"decode32": [], "decode32_prefill": []} for c in chunks}
    for r in range(rounds):
        for c in chunks if r % 2 == 0 else chunks[::-1]:
            srv = server(build, tmp, f"chunk{c}", [LAYER], extra=f"sessions {{ prefill_chunk_tokens: {c} }}")
            try:
                target = f"127.0.0.1:{srv.ports[0]}"
                per_chunk[c]["decode32"].append(decode(build, target, dur, 32))
                per_chunk[c]["decode32_prefill"].append(decode(build, target, dur, 32, prefill=8192))
            finally:
                srv.stop()
            print(f"round {r + 1}/{rounds}: chunk {c} done", file=sys.stderr, flush=True)
    return {c: prefill_summary(v) for c, v in per_chunk.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default="build")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", choices=["prefill"], help="only part 3 (prefill while decoding)")
    ap.add_argument("--prefill-chunks", help="part 3 for each of these sessions.prefill_chunk_tokens, e.g. 128,64")
    args = ap.parse_args()
    dur = f"{args.duration}s"
    if args.prefill_chunks:
        chunks = [int(c) for c in args.prefill_chunks.split(",")]
        print(json.dumps(compare_chunks(args.build, chunks, args.rounds, dur), indent=2))
        return
    tmp = tempfile.mkdtemp(prefix="attnserve_sessions_bench_")
    srv = server(args.build, tmp, "sessions", [LAYER])
    target = f"127.0.0.1:{srv.ports[0]}"
    rounds = {k: [] for k in ("decode64", "stateless64", "bw", "decode32", "decode32_prefill")}
    try:
        for r in range(args.rounds):
            if args.only == "prefill":
                rounds["decode32"].append(decode(args.build, target, dur, 32))
                rounds["decode32_prefill"].append(decode(args.build, target, dur, 32, prefill=8192))
                continue
            rounds["bw"].append(bandwidth(args.build))
            rounds["decode64"].append(decode(args.build, target, dur, 64))
            rounds["stateless64"].append(stateless(args.build, target, dur))
            rounds["decode32"].append(decode(args.build, target, dur, 32))
            rounds["decode32_prefill"].append(decode(args.build, target, dur, 32, prefill=8192))
            print(f"round {r + 1}/{args.rounds}: decode64 {rounds['decode64'][-1]['ok_per_second']:.0f} tok/s, "
                  f"stateless {rounds['stateless64'][-1]['ok_per_second']:.1f} tok/s", file=sys.stderr, flush=True)
    finally:
        srv.stop()
    if args.only == "prefill":
        print(json.dumps(dict(prefill_summary(rounds), rounds=rounds), indent=2))
        return
    d64, s64 = rounds["decode64"], rounds["stateless64"]
    tok_s = med([x["ok_per_second"] for x in d64])
    stateless_tok_s = med([x["ok_per_second"] for x in s64])
    step_bytes = 4 * E + 64  # one token's query and the message's fields
    stateless_bytes = 4 * E * (CONTEXT + 1) + 64
    avg_context = CONTEXT + 32  # the context runs from 1024 to 1087 between truncations
    kv_bytes_per_s = tok_s * 2 * avg_context * E * 4
    copy = med([b["copy_gb_per_s"] for b in rounds["bw"]])
    read_only = med([b.get("read_only_gb_per_s", 0) for b in rounds["bw"]])  # 0: a build without it
    summary = {
        "decode64": {"tokens_per_s": tok_s, "p50_ms": med([x["latency_ms"]["p50"] for x in d64]),
                     "p99_ms": med([x["latency_ms"]["p99"] for x in d64]),
                     "errors": sum(x["errors"] for x in d64)},
        "stateless64": {"tokens_per_s": stateless_tok_s, "p50_ms": med([x["latency_ms"]["p50"] for x in s64]),
                        "p99_ms": med([x["latency_ms"]["p99"] for x in s64]),
                        "errors": sum(x["errors"] for x in s64)},
        "tokens_per_s_ratio": tok_s / stateless_tok_s if stateless_tok_s else None,
        "request_bytes_ratio": stateless_bytes / step_bytes,
        "kv_read_gb_per_s": kv_bytes_per_s / 1e9,
        "copy_gb_per_s": copy,
        "kv_read_share_of_copy": kv_bytes_per_s / 1e9 / copy,
        "kv_read_share_of_read_half": kv_bytes_per_s / 1e9 / (copy / 2),
        "read_only_gb_per_s": read_only,
        "kv_read_share_of_read_only": kv_bytes_per_s / 1e9 / read_only if read_only else None,
    }
    summary.update(prefill_summary(rounds))
    summary["rounds"] = rounds
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
