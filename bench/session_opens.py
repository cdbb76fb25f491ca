#!/usr/bin/python3
"""Cross-attention sessions opened in a flood, beside a client of another layer, for BENCHMARKS.md: builds side by
side (each round runs every build in turn, their order alternating), medians over rounds.

    /usr/bin/python3 bench/session_opens.py --build OLD_BUILD --build build [--rounds 3] [--opens 16] [--waves 3]

Per build and round, one server (layers `small` E=256 and `base` E=768, a memory budget and a KV pool of 8 GiB so
that neither refuses) and two measurements:
1. Opens alone: `waves` times, `opens` CreateSession calls at once on `base`, each with a memory of [4096, 768]
   (12 MiB, a projection of 9.7 GFLOP), all answered before the next wave: opens per second.
2. Opens beside a client: the same, while one client sends Infer on `small` ([1, 16, 256]) in a closed loop: its
   p50 and p99 during the flood against alone (2 s before), and the opens per second.
Prints a JSON summary and a Markdown table.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time

import grpc
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import python_stubs  # noqa: E402
from serving_bench import server  # noqa: E402

LAYERS = ['name: "small" embed_dim: 256 num_heads: 4 seed: 1', 'name: "base" embed_dim: 768 num_heads: 12 seed: 2']
ROOMY = "memory_budget_bytes: 8589934592\nsessions { kv_cache_bytes: 8589934592 }"
MEMORY_ROWS = 4096


def load_stubs(out):
    python_stubs.generate(out, python_stubs.directory("attnserve/v1"))
    sys.path.insert(0, out)
    global pb, pbg, spb, spbg
    from attnserve.v1 import attention_pb2 as pb, attention_pb2_grpc as pbg  # noqa: E402
    from attnserve.v1 import session_pb2 as spb, session_pb2_grpc as spbg  # noqa: E402


def tensor(shape, rng):
    values = rng.standard_normal(shape).astype(np.float32)
    return pb.Tensor(shape=list(shape), dtype=pb.FLOAT32, raw_data=values.tobytes())


def quantile_ms(values, q):
    return sorted(values)[int(q * (len(values) - 1))] * 1e3


def flood(sessions, memory, opens, waves, tag):
    """Waves of `opens` CreateSession calls at once; returns opens per second (every one must be OK)."""
    start = time.perf_counter()
    for w in range(waves):
        ids = [f"{tag}-{w}-{i}" for i in range(opens)]
        futures = [sessions.CreateSession.future(spb.CreateSessionRequest(
            session_id=sid, layers=["base"], memory={"base": memory}), timeout=300) for sid in ids]
        for f in futures:
            f.result()
        for sid in ids:
            sessions.CloseSession(spb.CloseSessionRequest(session_id=sid), timeout=30)
    return opens * waves / (time.perf_counter() - start)


def infer_loop(stub, request, stop, latencies):
    while not stop.is_set():
        t = time.perf_counter()
        stub.Infer(request, timeout=60)
        latencies.append(time.perf_counter() - t)


def one_build(build, tmp, args, rng):
    s = server(build, tmp, "opens", LAYERS, extra=ROOMY)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{s.ports[0]}", options=[
            ("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)])
        stub, sessions = pbg.AttentionServiceStub(channel), spbg.SessionServiceStub(channel)
        memory = tensor([MEMORY_ROWS, 768], rng)
        request = pb.InferRequest(layer="small", query=tensor([1, 16, 256], rng))
        for _ in range(100):
            stub.Infer(request, timeout=30)
        flood(sessions, memory, 2, 1, "warm")
        alone_rate = flood(sessions, memory, args.opens, args.waves, "alone")
        stop, alone, during = threading.Event(), [], []
        loop = threading.Thread(target=infer_loop, args=(stub, request, stop, alone))
        loop.start()
        time.sleep(2)
        stop.set()
        loop.join()
        stop.clear()
        loop = threading.Thread(target=infer_loop, args=(stub, request, stop, during))
        loop.start()
        beside_rate = flood(sessions, memory, args.opens, args.waves, "beside")
        stop.set()
        loop.join()
        return {"opens_per_s_alone": alone_rate, "opens_per_s_beside_a_client": beside_rate,
                "infer_p50_ms_alone": quantile_ms(alone, 0.5), "infer_p99_ms_alone": quantile_ms(alone, 0.99),
                "infer_p50_ms_during": quantile_ms(during, 0.5), "infer_p99_ms_during": quantile_ms(during, 0.99),
                "infer_calls_during": len(during)}
    finally:
        s.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", action="append", required=True, help="a build directory (repeat to compare)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--opens", type=int, default=16)
    parser.add_argument("--waves", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(7)
    with tempfile.TemporaryDirectory(prefix="session_opens_") as tmp:
        load_stubs(tmp)
        runs = {b: [] for b in args.build}
        for r in range(args.rounds):
            for build in (args.build if r % 2 == 0 else args.build[::-1]):
                runs[build].append(one_build(build, tmp, args, rng))
                print(f"round {r + 1} {build}: {json.dumps(runs[build][-1])}", file=sys.stderr)
    summary = {b: {k: statistics.median(run[k] for run in rs) for k in rs[0]} for b, rs in runs.items()}
    print(json.dumps(summary, indent=1))
    keys = list(next(iter(summary.values())))
    print("| measure | " + " | ".join(args.build) + " |")
    print("|---|" + "---|" * len(args.build))
    for k in keys:
        print(f"| {k} | " + " | ".join(f"{summary[b][k]:.2f}" for b in args.build) + " |")


if __name__ == "__main__":
    main()
