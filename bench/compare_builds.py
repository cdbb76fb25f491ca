#!/usr/bin/python3
"""Two builds side by side, for a change that must not move performance (a restructuring): the engine
benchmark of `make bench` and two serving points, alternating the builds within each round so both see the
same machine state, medians over rounds.

    /usr/bin/python3 bench/compare_builds.py --old OLD_BUILD --new build [--rounds 3] [--duration 5] [--serving-only]
        [--kserve | --sessions]

A build directory holds bench/attnserve_core_bench and server/attnserve. The load generator is the new
build's tools/attnbench for both, so only the server differs. Serving points: concurrency 1, E=256 H=4 B=1
L=16 (latency); concurrency 64, E=512 H=8 L=32 (throughput, dynamic batching); concurrency 8, E=768 H=12 L=512
(1.5 MiB answers). --kserve sends them as the Open Inference Protocol's ModelInfer instead of attnserve.v1's Infer.
--sessions serves attnserve.v1.SessionService's Append instead, E=768 H=12: decode steps on 8 sessions of 512
tokens (3 KiB answers), and a 2048-token prompt (6 MiB answer, computed in chunks) prefilled over and over beside
one decoding session.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import serving_bench  # noqa: E402  (Proc, attnbench, server)

ENGINE_FILTER = "BM_(PeakSgemm|SelfAttention|RaggedBatch)"


def engine(build):
    out = subprocess.run([f"{build}/bench/attnserve_core_bench", "--benchmark_format=json",
                          f"--benchmark_filter={ENGINE_FILTER}", "--benchmark_repetitions=3",
                          "--benchmark_report_aggregates_only=true"],
                         check=True, capture_output=True, text=True).stdout
    return {b["run_name"]: b["GFLOPS"] for b in json.loads(out)["benchmarks"] if b.get("aggregate_name") == "median"}


def serving(build, tools_build, tmp, duration, protocol_args):
    results = {}
    points = [("c1 E=256 L=16", 'name: "x" embed_dim: 256 num_heads: 4 seed: 1', "16", "1"),
              ("c64 E=512 L=32", 'name: "x" embed_dim: 512 num_heads: 8 seed: 3 batching { max_batch_size: 64 }',
               "32", "64"),
              ("c8 E=768 L=512", 'name: "x" embed_dim: 768 num_heads: 12 seed: 5', "512", "8")]
    for label, layer, seq, conc in points:
        s = serving_bench.server(build, tmp, label.replace(" ", "_"), [layer])
        try:
            r = serving_bench.attnbench(tools_build, f"127.0.0.1:{s.ports[0]}", "--layer", "x", "--seq", seq,
                                        "--concurrency", conc, "--duration", f"{duration}s", *protocol_args)[0]
        finally:
            s.stop()
        results[f"{label} p50 ms"] = r["latency_ms"]["p50"]
        results[f"{label} req/s"] = r["requests_per_second"]
    return results


def sessions(build, tools_build, tmp, duration):
    layer = 'name: "x" embed_dim: 768 num_heads: 12 seed: 5'
    results = {}
    points = [("8 sessions decode", ["--sessions", "8", "--context", "512"]),
              ("prefill 2048", ["--sessions", "1", "--context", "64", "--prefill", "2048"])]
    for label, load in points:
        s = serving_bench.server(build, tmp, label.replace(" ", "_"), [layer])
        try:
            r = serving_bench.attnbench(tools_build, f"127.0.0.1:{s.ports[0]}", "--layer", "x", *load,
                                        "--duration", f"{duration}s")[0]
        finally:
            s.stop()
        if "prefill" in r:
            results[f"{label} s"] = r["prefill"]["seconds_mean"]
        else:
            results[f"{label} p50 ms"] = r["latency_ms"]["p50"]
            results[f"{label} req/s"] = r["requests_per_second"]
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True)
    ap.add_argument("--new", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per serving point")
    ap.add_argument("--serving-only", action="store_true", help="skip the engine benchmark (a server-only change)")
    ap.add_argument("--kserve", action="store_true", help="serve the Open Inference Protocol's ModelInfer")
    ap.add_argument("--sessions", action="store_true", help="serve SessionService's Append (decode and prefill)")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="attnserve_compare_")
    samples = {"old": {}, "new": {}}
    for r in range(args.rounds):
        order = ["old", "new"] if r % 2 == 0 else ["new", "old"]
        for which in order:
            build = getattr(args, which)
            measured = {} if args.serving_only else engine(build)
            if args.sessions:
                measured.update(sessions(build, args.new, tmp, args.duration))
            else:
                measured.update(serving(build, args.new, tmp, args.duration, ["--kserve"] if args.kserve else []))
            for k, v in measured.items():
                samples[which].setdefault(k, []).append(v)
            print(f"round {r + 1}/{args.rounds}: {which} done", file=sys.stderr)
    print("| measure | old | new | new / old |")
    print("|---|---|---|---|")
    for k in samples["old"]:
        old, new = statistics.median(samples["old"][k]), statistics.median(samples["new"][k])
        unit = "GFLOP/s" if k.startswith("BM_") else ""
        print(f"| {k} {unit} | {old:.3g} | {new:.3g} | {new / old:.3f} |")


if __name__ == "__main__":
    main()
