#!/usr/bin/python3
"""Served requests with 16-bit inputs (issue #13): layers of E=512, H=8 (max_batch_size 64) computing in
FLOAT32 and in BFLOAT16, driven at concurrency 64 over 16 connections with [1, 32, 512] queries sent as FP32,
BF16 and FP16 (attnbench --input-dtype). With --baseline, a second server binary runs the same steps, the two
alternating round by round, so that a change is measured side by side on this noisy machine.

Prints, per binary, layer and input type: requests/s of each round and their median, and from the server's
metrics the mean batch and the compute time per request.

    bench/wire_dtypes.py [--build build] [--baseline OTHER_BUILD] [--rounds 3] [--duration 5s]
"""
import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serving_bench import saturate, server  # noqa: E402

LAYERS = {
    "f32": 'name: "f32" embed_dim: 512 num_heads: 8 seed: 3 batching { max_batch_size: 64 }',
    "bf16": 'name: "bf16" embed_dim: 512 num_heads: 8 seed: 3 compute_dtype: BFLOAT16 '
            'batching { max_batch_size: 64 }',
}
INPUTS = ("FP32", "BF16", "FP16")


def one_round(build, server_build, name, tmp, duration):
    """Every layer x input type on a fresh server of `server_build`; attnbench from `build`."""
    s = server(server_build, tmp, name, list(LAYERS.values()))
    try:
        out = {}
        for layer in LAYERS:
            for dtype in INPUTS:
                shape = ("--layer", layer, "--seq", "32", "--input-dtype", dtype)
                step = saturate(build, s, shape, duration, connections=16)
                if step["errors"]:
                    sys.exit(f"{name} {layer} {dtype}: {step['errors']} errors")
                # The batches' compute time over the requests they answered.
                per_request_us = 1e6 * step["achieved_gflops"] / step["compute_gflops"] / step["requests_per_second"]
                out[(layer, dtype)] = (step["requests_per_second"], step["mean_batch"], per_request_us)
        return out
    finally:
        s.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", default="build")
    ap.add_argument("--baseline", help="another build directory whose server/attnserve runs the same steps")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", default="5s")
    a = ap.parse_args()
    binaries = [("this", a.build)] + ([("baseline", a.baseline)] if a.baseline else [])
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            order = binaries if r % 2 == 0 else binaries[::-1]
            for label, server_build in order:
                for key, value in one_round(a.build, server_build, f"{label}{r}", tmp, a.duration).items():
                    results.setdefault((label, *key), []).append(value)
                    print(f"round {r} {label} {key[0]} {key[1]}: {value[0]:.0f} req/s, mean batch {value[1]:.1f}, "
                          f"compute {value[2]:.0f} us/request", flush=True)
    print("\n| server | layer | inputs | req/s by round | median | compute us/request (median) |")
    print("|---|---|---|---|---|---|")
    for (label, layer, dtype), values in results.items():
        rates = [v[0] for v in values]
        print(f"| {label} | {layer} | {dtype} | {' / '.join(f'{x:,.0f}' for x in rates)} | "
              f"**{statistics.median(rates):,.0f}** | {statistics.median(v[2] for v in values):.0f} |")


if __name__ == "__main__":
    main()
