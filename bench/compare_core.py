#!/usr/bin/python3
"""Runs the engine benchmark and the PyTorch baseline side by side and prints BENCHMARKS.md's table.

    /usr/bin/python3 bench/compare_core.py [--bench build/bench/attnserve_core_bench] [--rounds 3]

Each round runs attnserve_core_bench (median of its repetitions) and then bench/torch_mha.py and
bench/torch_decoder.py on the same shapes, so both see the same machine state; the tables report the median
over rounds of each. Target per nn.MultiheadAttention shape (issue #2): GFLOP/s >= min(1.5 x PyTorch, 0.85 x
the same round's oneDNN sgemm peak). Per decoder-attention shape (issue #12): >= 1.5 x PyTorch's eager
LlamaAttention, and >= 0.75 x sgemm on the rows without a sliding window. BFLOAT16 layers (issue #13): per
shape, the bf16 layer's speedup over the f32 layer >= 0.9 x the same round's oneDNN bf16-over-f32 matmul
speedup (2048^3), and >= 1.5 x PyTorch's own bf16 nn.MultiheadAttention.
"""

import argparse
import json
import re
import statistics
import subprocess
import sys

SHAPES = [(1, 128, 512, 8), (8, 512, 1024, 16), (1, 2048, 1024, 16), (32, 64, 512, 8), (64, 16, 256, 4)]
# B, L, E, H, Hkv, D, W (sliding window, 0 = none)
DECODER_SHAPES = [(1, 2048, 4096, 32, 8, 128, 0), (8, 512, 2048, 16, 4, 128, 0), (1, 4096, 4096, 32, 8, 128, 1024)]


def run_engine(binary, repetitions):
    out = subprocess.run(
        [binary, "--benchmark_format=json", f"--benchmark_repetitions={repetitions}",
         "--benchmark_filter=BM_(PeakSgemm|PeakBf16Matmul|SelfAttention|SelfAttentionBf16|RaggedBatch|LongAttention|"
         "DecoderAttention|DecoderAttentionBf16)",
         "--benchmark_report_aggregates_only=true"],
        check=True, capture_output=True, text=True).stdout
    results = {}
    for b in json.loads(out)["benchmarks"]:
        if b.get("aggregate_name") != "median":
            continue
        name = b["run_name"]
        m = re.match(r"BM_SelfAttention/B:(\d+)/L:(\d+)/E:(\d+)/H:(\d+)", name)
        m16 = re.match(r"BM_SelfAttentionBf16/B:(\d+)/L:(\d+)/E:(\d+)/H:(\d+)", name)
        d = re.match(r"BM_DecoderAttention(Bf16)?/B:(\d+)/L:(\d+)/E:(\d+)/H:(\d+)/Hkv:(\d+)/D:(\d+)/W:(\d+)",
                     name)
        long = re.match(r"BM_LongAttention/B:(\d+)/L:(\d+)/E:(\d+)/H:(\d+)/causal:(\d)/flash:(\d)/padded:(\d)", name)
        if long:
            g = [int(x) for x in long.groups()]
            # key: ("long", B, L, E, H, causal, padded, flash): a table row per (shape, causal, padded)
            results[("long",) + tuple(g[:5]) + (g[6], g[5])] = b["GFLOPS"]
        elif d:
            kind = "decoder_bf16" if d.group(1) else "decoder"
            results[(kind,) + tuple(int(x) for x in d.groups()[1:])] = b["GFLOPS"]
        elif m:
            results[tuple(int(x) for x in m.groups())] = b["GFLOPS"]
        elif m16:
            results[("bf16",) + tuple(int(x) for x in m16.groups())] = b["GFLOPS"]
        elif name.startswith("BM_PeakBf16Matmul"):
            results["bf16_matmul"] = b["GFLOPS"]
        elif name.startswith("BM_PeakSgemm"):
            results["sgemm"] = b["GFLOPS"]
        elif name.startswith("BM_RaggedBatch"):
            m = re.match(r"BM_RaggedBatch/B:(\d+)/L:(\d+)/E:(\d+)/H:(\d+)", name)
            results[("ragged",) + tuple(int(x) for x in m.groups())] = b["GFLOPS"]
    return results


def print_long_table(engine_rounds, sgemm):
    """Long sequences, flash-style path against the blocked one; target: flash >= 80% of sgemm."""
    def med(key):
        return statistics.median(x[key] for x in engine_rounds)

    keys = sorted({k[1:7] for k in engine_rounds[0] if isinstance(k, tuple) and k[0] == "long"})
    if not keys:
        return True
    print("\nLong sequences (causal GFLOP/s count the pairs a causal mask keeps; target: flash >= 80% of sgemm):\n")
    print("| B | L | E | H | causal | key padding | blocked GFLOP/s | flash GFLOP/s | flash / blocked | of sgemm "
          "| met |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    all_met = True
    for k in keys:
        blocked, flash = med(("long",) + k + (0,)), med(("long",) + k + (1,))
        met = flash >= 0.8 * sgemm
        if not k[5]:  # the targets are the unpadded shapes; padded rows show what masks cost
            all_met &= met
        print(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {'yes' if k[4] else 'no'} | {'1/8' if k[5] else 'no'} | "
              f"{blocked:.0f} | {flash:.0f} | "
              f"{flash / blocked:.2f}x | {100 * flash / sgemm:.0f}% | {'yes' if met else 'NO'} |")
    return all_met


def run_torch(script, dtype="float32"):
    shapes = ";".join(",".join(str(x) for x in s) for s in SHAPES)
    out = json.loads(subprocess.run(["/usr/bin/python3", script, "--json", "--shapes", shapes, "--dtype", dtype],
                                    check=True, capture_output=True, text=True).stdout)
    prefix = ("bf16",) if dtype == "bfloat16" else ()
    results = {prefix + (r["B"], r["L"], r["E"], r["H"]): r["gflops"] for r in out["results"]}
    # What the f32 baseline ran on, kept with its numbers: on the reference BLAS or OpenBLAS's SSE3 kernels it
    # runs 6-50x slow and every ratio against it means nothing.
    results[prefix + ("blas",)] = (f"torch {out['torch_version']}, {out['threads']} threads, "
                                   f"{', '.join(out['blas_libraries']) or 'no BLAS mapped'}; "
                                   f"{out.get('openblas_core', 'OpenBLAS core not reported')}")
    return results


def print_bf16_table(engine_rounds, torch_rounds):
    def med(rounds, key):
        return statistics.median(x[key] for x in rounds)

    matmul_speedup = statistics.median(r["bf16_matmul"] / r["sgemm"] for r in engine_rounds)
    print(f"\nBFLOAT16 compute: oneDNN bf16 matmul 2048^3 {med(engine_rounds, 'bf16_matmul'):.0f} GFLOP/s, "
          f"{matmul_speedup:.2f}x sgemm (same runs); target per shape: speedup >= {0.9 * matmul_speedup:.2f}x "
          "and >= 1.5x PyTorch bf16.\n")
    print("| B | L | E | H | f32 GFLOP/s | bf16 GFLOP/s | bf16 speedup | of target | PyTorch bf16 | ratio | met |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    all_met = True
    for s in SHAPES:
        speedup = statistics.median(r[("bf16",) + s] / r[s] for r in engine_rounds)
        ours, theirs = med(engine_rounds, ("bf16",) + s), med(torch_rounds, ("bf16",) + s)
        met = speedup >= 0.9 * matmul_speedup and ours >= 1.5 * theirs
        all_met &= met
        print(f"| {' | '.join(str(x) for x in s)} | {med(engine_rounds, s):.0f} | {ours:.0f} | {speedup:.2f}x | "
              f"{100 * speedup / (0.9 * matmul_speedup):.0f}% | {theirs:.0f} | {ours / theirs:.2f}x | "
              f"{'yes' if met else 'NO'} |")
    return all_met


def run_torch_decoder(script):
    shapes = ";".join(",".join(str(x) for x in s) for s in DECODER_SHAPES)
    out = subprocess.run(["/usr/bin/python3", script, "--json", "--shapes", shapes], check=True,
                         capture_output=True, text=True).stdout
    keys = ("B", "L", "E", "H", "Hkv", "D", "W")
    return {("decoder",) + tuple(r[k] for k in keys): r["gflops"] for r in json.loads(out)["results"]}


def print_decoder_table(engine_rounds, torch_rounds, sgemm):
    def med(rounds, key):
        return statistics.median(x[key] for x in rounds)

    print("\nDecoder attention (causal, RoPE, GQA; useful FLOPs only):\n")
    print("| B | L | E | H | Hkv | D | window | attnserve GFLOP/s | PyTorch GFLOP/s | ratio | of sgemm | met | "
          "BF16 GFLOP/s | BF16 speedup |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    all_met = True
    for s in DECODER_SHAPES:
        key = ("decoder",) + s
        ours, theirs = med(engine_rounds, key), med(torch_rounds, key)
        bf16 = med(engine_rounds, ("decoder_bf16",) + s)
        met = ours >= 1.5 * theirs and (s[6] > 0 or ours >= 0.75 * sgemm)
        all_met &= met
        print(f"| {' | '.join(str(x) for x in s[:6])} | {s[6] or '-'} | {ours:.0f} | {theirs:.1f} | "
              f"{ours / theirs:.1f}x | {100 * ours / sgemm:.0f}% | {'yes' if met else 'NO'} | {bf16:.0f} | "
              f"{bf16 / ours:.2f}x |")
    return all_met


def engine_chart(path, shapes, engine_rounds, torch_rounds):
    """GFLOP/s per shape: attnserve f32 and bf16, PyTorch f32 and bf16, with the runs' sgemm and bf16 peaks."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def med(rounds, key):
        return statistics.median(x[key] for x in rounds)

    series = [("attnserve f32", engine_rounds, ()), ("attnserve bf16", engine_rounds, ("bf16",)),
              ("PyTorch f32", torch_rounds, ()), ("PyTorch bf16", torch_rounds, ("bf16",))]
    fig, ax = plt.subplots(figsize=(10, 5))
    width = 0.2
    for i, (label, rounds, prefix) in enumerate(series):
        ax.bar([x + (i - 1.5) * width for x in range(len(shapes))], [med(rounds, prefix + s) for s in shapes],
               width, label=label)
    ax.axhline(med(engine_rounds, "sgemm"), color="black", linestyle="--", label="oneDNN sgemm 2048^3")
    ax.axhline(med(engine_rounds, "bf16_matmul"), color="gray", linestyle=":", label="oneDNN bf16 matmul 2048^3")
    ax.set_xticks(range(len(shapes)))
    ax.set_xticklabels([f"B={b} L={l}\nE={e} H={h}" for b, l, e, h in shapes])
    ax.set_ylabel("GFLOP/s (median of rounds)")
    ax.set_title("nn.MultiheadAttention forward, self-attention, 2 threads")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", default="build/bench/attnserve_core_bench")
    ap.add_argument("--torch", default="bench/torch_mha.py")
    ap.add_argument("--torch-decoder", default="bench/torch_decoder.py")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repetitions", type=int, default=3)
    ap.add_argument("--png", default="bench/results/engine.png", help="chart to write ('' for none)")
    args = ap.parse_args()

    engine_rounds, torch_rounds = [], []
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
        engine_rounds.append(run_engine(args.bench, args.repetitions))
        torch_rounds.append({**run_torch(args.torch), **run_torch(args.torch, "bfloat16"),
                             **run_torch_decoder(args.torch_decoder)})

    def med(rounds, key):
        return statistics.median(x[key] for x in rounds)

    sgemm = med(engine_rounds, "sgemm")
    print(f"oneDNN sgemm 2048^3 (same runs): {sgemm:.0f} GFLOP/s")
    print(f"PyTorch f32 baseline: {torch_rounds[0][('blas',)]}\n")
    print("| B | L | E | H | attnserve GFLOP/s | PyTorch GFLOP/s | ratio | target | met |")
    print("|---|---|---|---|---|---|---|---|---|")
    all_met = True
    for s in SHAPES:
        ours, theirs = med(engine_rounds, s), med(torch_rounds, s)
        target = min(1.5 * theirs, 0.85 * sgemm)
        met = ours >= target
        all_met &= met
        print(f"| {s[0]} | {s[1]} | {s[2]} | {s[3]} | {ours:.0f} | {theirs:.0f} | {ours / theirs:.2f}x | "
              f"{target:.0f} | {'yes' if met else 'NO'} |")
    ragged = [k for k in engine_rounds[0] if isinstance(k, tuple) and k[0] == "ragged"]
    if ragged:
        print("\nRagged batches (B single sequences, lengths uniform in [L/2, 3L/2], one ForwardBatch call):\n")
        print("| B | mean L | E | H | GFLOP/s |")
        print("|---|---|---|---|---|")
        for k in sorted(ragged):
            print(f"| {k[1]} | {k[2]} | {k[3]} | {k[4]} | {med(engine_rounds, k):.0f} |")
    all_met &= print_long_table(engine_rounds, sgemm)
    all_met &= print_bf16_table(engine_rounds, torch_rounds)
    all_met &= print_decoder_table(engine_rounds, torch_rounds, sgemm)
    if args.png:
        engine_chart(args.png, SHAPES, engine_rounds, torch_rounds)
        print(f"\nchart: {args.png}")
    return 0 if all_met else 1


if __name__ == "__main__":
    sys.exit(main())
