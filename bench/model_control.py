#!/usr/bin/python3
"""Issue #10's numbers for BENCHMARKS.md, all in one run on this machine:

0. Memory after reloads: with no traffic, --reload-cycles reloads of layer B (`base`) each followed by a load
   and an unload of layer C; the server's RSS at start and after some of them, once the pages kept for loads
   were given back (6.5 s after) and while they are held (1.5 s after).
1. The two protocols side by side: attnbench on layer `small` (E=256, H=4, B=1, L=16) with attnserve.v1's
   unary Infer and with the Open Inference Protocol's ModelInfer (--kserve): requests/s at concurrency 64
   interleaved over --rounds rounds, and p50 at concurrency 1 over --c1-pairs back-to-back pairs of short
   rounds (the median of the pairs' ratios); medians.
2. Layers changing under load: attnbench at concurrency 64 on layer A (`small`) for --duration seconds, once
   with nothing else happening and once while layer B (`base`, E=768, H=12) is reloaded 20 times and layer C
   (E=512, H=8) loaded and unloaded 10 times over the repository RPCs (one Python gRPC client, stubs made with
   protoc, so that no process start-up competes for the cores), in alternating rounds: A's
   p50/p99 and failed requests in each, and the ratio of the p99s. The server's RSS before C is first loaded and
   after its last unload says whether an unloaded layer's memory comes back.

    /usr/bin/python3 bench/model_control.py [--build build] [--duration 8] [--rounds 3] [--c1-pairs 12] \
        [--reload-cycles 30]
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import python_stubs  # noqa: E402
from serving_bench import Proc, attnbench  # noqa: E402

READY = r"ready: grpc_port=(\d+) metrics_port=(\d+)"
LAYER_C = json.dumps({"name": "c", "embedDim": 512, "numHeads": 8, "seed": "3"})


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def repository_stub(port, tmp):
    """A GRPCInferenceService stub from proto/inference, generated into `tmp`."""
    python_stubs.generate(tmp, ["inference/model_config.proto", "inference/grpc_service.proto"])
    sys.path.insert(0, tmp)
    import grpc
    from inference import grpc_service_pb2 as kpb, grpc_service_pb2_grpc as kpbg
    stub = kpbg.GRPCInferenceServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    return stub, kpb


def protocols(build, port, duration, rounds, c1_pairs):
    """Requests/s at c=64 over `rounds` alternating rounds; p50 at c=1 over `c1_pairs` pairs of 2 s rounds, the
    two protocols back to back in each pair (alternating which goes first): the machine's drift over minutes
    is larger than the difference measured, so each pair's ratio compares like with like."""
    names = ["attnserve.v1 Infer", "KServe ModelInfer"]
    extra = {names[0]: [], names[1]: ["--kserve"]}
    rps, p50, ratios = {n: [] for n in names}, {n: [] for n in names}, []
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            step = attnbench(build, f"127.0.0.1:{port}", "--layer", "small", "--seq", "16", "--concurrency", "64",
                             "--duration", f"{duration}s", "--warmup", "1s", *extra[name])[0]
            assert step["errors"] == 0, step
            rps[name].append(step["requests_per_second"])
            print(f"round {r + 1} {name}: {rps[name][-1]:.0f} requests/s at c=64", file=sys.stderr)
    for r in range(c1_pairs):
        pair = {}
        for name in (names if r % 2 == 0 else names[::-1]):
            step = attnbench(build, f"127.0.0.1:{port}", "--layer", "small", "--seq", "16", "--concurrency", "1",
                             "--duration", "2s", "--warmup", "0.3s", *extra[name])[0]
            assert step["errors"] == 0, step
            pair[name] = step["latency_ms"]["p50"]
            p50[name].append(pair[name])
        ratios.append(pair[names[1]] / pair[names[0]])
        print(f"pair {r + 1}: p50 at c=1 {pair[names[0]]:.3f} vs {pair[names[1]]:.3f} ms", file=sys.stderr)
    table = {n: (statistics.median(p50[n]), statistics.median(rps[n])) for n in names}
    return table, statistics.median(ratios), (min(ratios), max(ratios))


# While layers load, the heaps keep freed pages for the next build (server/runtime/load_heap_pad.h) until 5 s after
# the last load; the trimmer gives them back within the next second.
PAD_RELEASED_S = 6.5


def reload_memory(control, pid, cycles):
    """RSS (MiB) with no traffic: at start, then after reloads of B each followed by a load and an unload of C,
    1.5 s after (the pages kept for loads still held) and once they were given back."""
    stub, kpb = control
    rss, held = {0: rss_mib(pid)}, {}
    for i in range(1, cycles + 1):
        stub.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name="base"), timeout=120)
        load_c = kpb.RepositoryModelLoadRequest(model_name="c")
        load_c.parameters["config"].string_param = LAYER_C
        stub.RepositoryModelLoad(load_c, timeout=120)
        stub.RepositoryModelUnload(kpb.RepositoryModelUnloadRequest(model_name="c"), timeout=120)
        if i in (1, 2, 5) or i % 10 == 0:
            time.sleep(1.5)
            held[i] = rss_mib(pid)
            time.sleep(PAD_RELEASED_S - 1.5)
            rss[i] = rss_mib(pid)
    return rss, held


def churn(control, stop, counts):
    """Reloads B 20 times and loads/unloads C 10 times, spread over the measured window."""
    stub, kpb = control
    for i in range(20):
        if stop.is_set():
            return
        stub.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name="base"), timeout=120)
        counts["reloads"] += 1
        if i % 2 == 0:
            load_c = kpb.RepositoryModelLoadRequest(model_name="c")
            load_c.parameters["config"].string_param = LAYER_C
            stub.RepositoryModelLoad(load_c, timeout=120)
            stub.RepositoryModelUnload(kpb.RepositoryModelUnloadRequest(model_name="c"), timeout=120)
            counts["c_cycles"] += 1
        time.sleep(0.15)


def under_load(build, port, duration, control):
    stop, counts = threading.Event(), {"reloads": 0, "c_cycles": 0}
    worker = threading.Thread(target=churn, args=(control, stop, counts)) if control else None
    if worker:
        worker.start()
    steps = attnbench(build, f"127.0.0.1:{port}", "--layer", "small", "--seq", "16", "--concurrency", "64",
                      "--duration", f"{duration}s", "--warmup", "0s")
    stop.set()
    if worker:
        worker.join()
    s = steps[0]
    return s["latency_ms"]["p50"], s["latency_ms"]["p99"], s["errors"], s["requests"], counts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build")
    ap.add_argument("--duration", type=float, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--c1-pairs", type=int, default=12)
    ap.add_argument("--reload-cycles", type=int, default=30)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        proc = Proc([f"{a.build}/server/attnserve", "--grpc-address", "127.0.0.1:0", "--metrics-address",
                     "127.0.0.1:0", "--enable-model-control", "--shutdown-grace", "5s"],
                    READY, os.path.join(tmp, "server.log"))
        try:
            port = proc.ports[0]
            control = repository_stub(port, tmp)
            memory, memory_held = reload_memory(control, proc.p.pid, a.reload_cycles)
            table, c1_ratio, c1_range = protocols(a.build, port, min(a.duration, 5), a.rounds, a.c1_pairs)
            rss_before = rss_mib(proc.p.pid)
            quiet, churned = [], []
            for r in range(a.rounds):
                quiet.append(under_load(a.build, port, a.duration, None))
                churned.append(under_load(a.build, port, a.duration, control))
                print(f"round {r + 1}: quiet p99 {quiet[-1][1]:.2f} ms, with reloads p99 {churned[-1][1]:.2f} ms "
                      f"({churned[-1][4]['reloads']} reloads of base, {churned[-1][4]['c_cycles']} load/unload of c, "
                      f"{churned[-1][2]} errors)", file=sys.stderr)
            time.sleep(PAD_RELEASED_S)
            rss_after = rss_mib(proc.p.pid)
        finally:
            proc.stop()
    v1_p50, v1_rps = table["attnserve.v1 Infer"]
    print("| protocol | p50 at c=1 (ms) | vs attnserve.v1 | requests/s at c=64 | vs attnserve.v1 |")
    print("|---|---|---|---|---|")
    for name, (p50, rps) in table.items():
        print(f"| {name} | {p50:.3f} | {p50 / v1_p50 - 1:+.1%} | {rps:.0f} | {rps / v1_rps - 1:+.1%} |")
    print(f"\np50 at c=1, KServe / attnserve.v1, median of {a.c1_pairs} back-to-back pairs: {c1_ratio - 1:+.1%} "
          f"(pairs from {c1_range[0] - 1:+.1%} to {c1_range[1] - 1:+.1%})")
    print("\nRSS with no traffic, reloads of B each with a load and unload of C: " +
          ", ".join(f"{k}: {v:.0f} MiB" for k, v in memory.items()) + f" (measured {PAD_RELEASED_S} s after; 1.5 s "
          "after, with the pages kept for loads: " + ", ".join(f"{k}: {v:.0f}" for k, v in memory_held.items()) + ")")
    print()
    med = lambda runs, i: statistics.median(r[i] for r in runs)  # noqa: E731
    print("| layer A (`small`, c=64) | p50 (ms) | p99 (ms) | failed requests | requests |")
    print("|---|---|---|---|---|")
    for name, runs in (("nothing else happening", quiet), ("B reloaded 20x, C loaded+unloaded 10x", churned)):
        print(f"| {name} | {med(runs, 0):.2f} | {med(runs, 1):.2f} | {sum(r[2] for r in runs)} | "
              f"{sum(r[3] for r in runs)} |")
    print(f"\np99 with reloads / p99 without: {med(churned, 1) / med(quiet, 1):.2f}x "
          f"(median of {a.rounds} rounds each)")
    print(f"server RSS: {rss_before:.0f} MiB before the first load of C, {rss_after:.0f} MiB after its last unload "
          f"and {sum(r[4]['reloads'] for r in churned)} reloads of B")


if __name__ == "__main__":
    main()
