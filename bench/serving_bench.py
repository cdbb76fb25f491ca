#!/usr/bin/python3
"""Serving benchmarks of issue #4, measured side by side in one run; prints BENCHMARKS.md's tables.

    /usr/bin/python3 bench/serving_bench.py [--build build] [--duration 10]

Starts the servers itself on loopback (attnserve with generated configs, the echo floor), drives them with
attnbench, scrapes /metrics, and checks each target:
  1. floor: echo with a 4 KiB payload, p50 at concurrency 1 and requests/s at concurrency 32;
  2. latency: E=256, H=4, B=1, L=16 at concurrency 1: p50 <= echo p50 + engine in-process time + 50 us;
  3. batching: concurrency 64, L=32 on E=512, H=8: throughput with dynamic batching >= 2x max_batch_size=1 with one
     worker (`worker_threads: 1`, the default when the target was set), and the same ratio with the default (one
     worker per CPU, where unbatched requests also run side by side, one per CPU);
  3b. served / engine (issue #13): concurrency 64, L=32 on E=512, H=8, over 1 and 16 connections: achieved GFLOP/s
     >= 80% of the engine's in-process GFLOP/s on batches of the size the server formed. The engine's rate is the
     better of its two layouts in the same run: one batch at a time on every CPU (BM_ServerBatch), and, when the
     server runs more than one worker (the default: one per CPU), one batch per CPU at once on one thread each
     (BM_ServerBatchPerWorker), as the server computes them under load;
  3c. the same over 16 connections with `worker_threads: 1` (every batch on every CPU, one at a time);
  4. efficiency: saturation with B=1, L=128 on E=768, H=12: achieved GFLOP/s (attnserve_flops_total over
     wall time) >= 70% of the engine's in-process GFLOP/s on batches of the size the server formed (as in 3b);
  5. open loop at 70% of the measured maximum rate: p99 <= 5x p50;
  6. against PyTorch: attnserve (step 3's dynamic layer) and bench/torch_server.py (grpcio + nn.MultiheadAttention)
     at step 3's shape and concurrency: attnserve's requests/s >= 2.5x the PyTorch server's; then both swept over
     concurrency 1, 4, 16, 64 (--sweep-duration per point), drawn to bench/results/serving_throughput.png and
     serving_latency_cdf.png (--charts-dir).
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
SWEEP_CONCURRENCY = (1, 4, 16, 64)
SERVED_CONNECTIONS = (1, 16)
# attnbench reports percentiles, not samples: the latency CDF is drawn through these (JSON key, fraction) points.
CDF_POINTS = (("min", 0.0), ("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99_9", 0.999), ("max", 1.0))


class Proc:
    """A server started in the background; `ready` is the regex whose groups are its ports."""

    def __init__(self, args, ready, log_path):
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.p = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            with open(log_path) as f:
                m = re.search(ready, f.read())
            if m:
                self.ports = [int(g) for g in m.groups()]
                return
            if self.p.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{args[0]} did not start: " + open(log_path).read()[-2000:])

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.p.kill()
        self.log.close()


def attnbench(build, target, *args):
    cmd = [f"{build}/tools/attnbench", "--target", target, "--json", "--quiet", *args]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"{' '.join(cmd)}: exit status {run.returncode}\n{run.stderr}")
    return json.loads(run.stdout)


def metrics(port):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, value = line.rsplit(" ", 1)
        values[name] = float(value)
    return values


def metric_sum(values, prefix):
    return sum(v for k, v in values.items() if k.startswith(prefix))


def engine_bench(build, filt):
    out = subprocess.run([f"{build}/bench/attnserve_core_bench", "--benchmark_format=json",
                          f"--benchmark_filter={filt}", "--benchmark_repetitions=3",
                          "--benchmark_report_aggregates_only=true"],
                         check=True, capture_output=True, text=True).stdout
    return {b["run_name"]: b for b in json.loads(out)["benchmarks"] if b.get("aggregate_name") == "median"}


def saturate(build, s, shape, dur, connections=1):
    """A concurrency-64 closed loop of `shape` (attnbench flags) on server `s` after a 2 s warm-up run. Returns the
    attnbench step with, from the server's /metrics over the measured run: achieved GFLOP/s (flops over wall time),
    the compute-time rate and the mean batch."""
    target = f"127.0.0.1:{s.ports[0]}"
    load = (*shape, "--concurrency", "64", "--connections", str(connections))
    attnbench(build, target, *load, "--duration", "2s")
    before = metrics(s.ports[1])
    step = attnbench(build, target, *load, "--duration", dur, "--warmup", "0s")[0]
    after = metrics(s.ports[1])
    delta = {k: metric_sum(after, k) - metric_sum(before, k) for k in (
        "attnserve_flops_total", "attnserve_compute_duration_seconds_sum", "attnserve_batch_size_count",
        "attnserve_batch_size_sum")}
    if delta["attnserve_batch_size_count"] == 0:
        sys.exit(f"{shape}: no batch ran at 127.0.0.1:{s.ports[0]} ({step['errors']} errors)")
    # Over attnbench's measured time (to the last answer), not t1 - t0, which also holds its start and exit.
    step["achieved_gflops"] = delta["attnserve_flops_total"] / step["duration_s"] / 1e9
    step["compute_gflops"] = delta["attnserve_flops_total"] / delta["attnserve_compute_duration_seconds_sum"] / 1e9
    step["mean_batch"] = delta["attnserve_batch_size_sum"] / delta["attnserve_batch_size_count"]
    return step


def engine_gflops_near(build, mean_batch, sizes, shape, bench="BM_ServerBatch"):
    """The engine's in-process GFLOP/s (`bench`: BM_ServerBatch, or BM_ServerBatchPerWorker for one batch per CPU
    at once) on batches of the benchmarked size in `sizes` nearest to `mean_batch`; `shape` is the rest of the
    benchmark's name, e.g. "L:128/E:768/H:12". Returns (size, GFLOP/s)."""
    size = min(sizes, key=lambda k: abs(k - mean_batch))
    name = f"{bench}/R:{size}/{shape}"
    eng = engine_bench(build, name)
    if not eng:
        sys.exit(f"{name}: no such benchmark in {build}/bench/attnserve_core_bench")
    return size, next(iter(eng.values()))["GFLOPS"]


def server(build, tmp, name, layers, worker_threads=None, extra=""):
    """attnserve with these layers (text-format LayerConfig bodies) and `extra` config text; `worker_threads` None
    leaves the default (one per CPU). Its `workers` are the ones it reports at start-up."""
    cfg = os.path.join(tmp, f"{name}.pbtxt")
    with open(cfg, "w") as f:
        f.write('grpc_address: "127.0.0.1:0"\nmetrics_address: "127.0.0.1:0"\n')
        if worker_threads is not None:
            f.write(f"worker_threads: {worker_threads}\n")
        if extra:
            f.write(extra + "\n")
        for layer in layers:
            f.write("layers { " + layer + " }\n")
    s = Proc([f"{build}/server/attnserve", "--config", cfg],
             r"ready: grpc_port=(\d+) metrics_port=(\d+)", os.path.join(tmp, f"{name}.log"))
    with open(s.log_path) as f:
        s.workers = int(re.search(r" workers=(\d+)", f.read()).group(1))
    return s


# The batch sizes benchmarked per shape: one batch on every CPU (BM_ServerBatch), one per CPU (BM_ServerBatchPerWorker).
ENGINE_SIZES = {"L:32/E:512/H:8": ((1, 8, 16, 32, 64), (8, 16, 32)),
                "L:128/E:768/H:12": ((1, 2, 4, 8, 16, 32, 64), (1, 2, 4, 8, 16, 32))}


def engine_for(build, workers, mean_batch, shape):
    """The engine's in-process GFLOP/s on batches of the benchmarked size nearest the served `mean_batch`, in each
    layout the server's `workers` can compute them: one batch at a time on every CPU and, for more than one worker,
    one per CPU at once. Returns {"layouts": {label: (size, GFLOP/s)}, "gflops": the better, "label": its label}."""
    team_sizes, worker_sizes = ENGINE_SIZES[shape]
    layouts = {"one batch on every CPU": engine_gflops_near(build, mean_batch, team_sizes, shape)}
    if workers > 1:
        layouts["one batch per CPU at once"] = engine_gflops_near(build, mean_batch, worker_sizes, shape,
                                                                  "BM_ServerBatchPerWorker")
    label = max(layouts, key=lambda k: layouts[k][1])
    return {"layouts": layouts, "gflops": layouts[label][1], "label": label}


def engine_text(engine):
    """The engine's layouts for a table cell: "one batch on every CPU, batches of 16: 190 GFLOP/s; ..."."""
    return "; ".join(f"{label}, batches of {size}: {gflops:.0f}" for label, (size, gflops) in engine["layouts"].items())


def served_row(label, sv, target):
    """A served / engine table row from a `served_step` result; `target` a fraction of the engine, or None."""
    share = sv["achieved_gflops"] / sv["engine"]["gflops"]
    met = "-" if target is None else ("yes" if share >= target else "NO")
    return (f"| {label} | {sv['achieved_gflops']:.0f} / {sv['engine']['gflops']:.0f} GFLOP/s = {100 * share:.0f}% "
            f"({sv['rps']:.0f} req/s, {sv['workers']} worker{'s' if sv['workers'] > 1 else ''}, mean batch "
            f"{sv['mean_batch']:.1f}; engine in-process GFLOP/s, {engine_text(sv['engine'])}) | "
            f"{'-' if target is None else f'>= {100 * target:.0f}%'} | {met} |")


def served_step(build, s, shape, dur, connections=1):
    """Saturates server `s` with `shape` (attnbench flags ending in --seq L) and compares it with its engine."""
    st = saturate(build, s, shape, dur, connections)
    return {"rps": st["requests_per_second"], "achieved_gflops": st["achieved_gflops"],
            "compute_gflops": st["compute_gflops"], "mean_batch": st["mean_batch"], "workers": s.workers, "step": st}


def mid_layer(batching):
    """The layer of the batching and PyTorch steps, E=512 H=8, so both measure the same attnserve."""
    return f'name: "mid" embed_dim: 512 num_heads: 8 seed: 3 batching {{ {batching} }}'


def torch_server(tmp):
    """bench/torch_server.py with its defaults (as users would run it), serving "mid" (E=512, H=8)."""
    return Proc(["/usr/bin/python3", os.path.join(BENCH_DIR, "torch_server.py"), "--port", "0",
                 "--layer", "mid:512:8"],
                r"torch_server ready: grpc_port=(\d+)", os.path.join(tmp, "torch_server.log"))


def compare_with_torch(build, tmp, dur, sweep_dur, procs):
    """Step 6: each server started on its own, so neither competes for the cores while the other is measured: the
    concurrency-64 run for `dur`, then the sweep for `sweep_dur` per point.
    Returns {label: {"c64": attnbench step, "sweep": [steps]}}."""
    starts = (("attnserve", lambda: server(build, tmp, "vs_torch", [mid_layer("max_batch_size: 64")])),
               ("PyTorch server", lambda: torch_server(tmp)))
    runs = {}
    for label, start in starts:
        s = start()
        procs.append(s)
        target = f"127.0.0.1:{s.ports[0]}"
        shape = ("--layer", "mid", "--seq", "32")
        c64 = attnbench(build, target, *shape, "--concurrency", "64", "--duration", dur)[0]
        sweep = attnbench(build, target, *shape, "--concurrency", ",".join(map(str, SWEEP_CONCURRENCY)),
                          "--duration", sweep_dur)
        s.stop()
        runs[label] = {"c64": c64, "sweep": sweep}
    return runs


def torch_results(runs):
    """The flat numbers of step 6 for the results JSON and the table row."""
    ours, theirs = runs["attnserve"]["c64"], runs["PyTorch server"]["c64"]
    out = {"vs_torch_ratio": ours["requests_per_second"] / theirs["requests_per_second"]}
    for key, step in (("attnserve", ours), ("torch", theirs)):
        out[f"vs_torch_{key}_rps"] = step["requests_per_second"]
        out[f"vs_torch_{key}_p50_ms"] = step["latency_ms"]["p50"]
        out[f"vs_torch_{key}_errors"] = step["errors"]
    out["vs_torch_sweep"] = {label: [{"concurrency": s["concurrency"], "rps": s["requests_per_second"],
                                      "p50_ms": s["latency_ms"]["p50"], "p99_ms": s["latency_ms"]["p99"],
                                      "errors": s["errors"]} for s in run["sweep"]]
                             for label, run in runs.items()}
    return out


def sweep_table(runs):
    """The sweep as markdown lines: per concurrency, each server's requests/s, p50 / p99 and errors."""
    labels = list(runs)
    lines = ["| concurrency | " + " | ".join(f"{l} req/s | {l} p50 / p99 ms" for l in labels) + " | ratio |",
             "|---|" + "---|---|" * len(labels) + "---|"]
    for steps in zip(*(runs[l]["sweep"] for l in labels)):
        cells = [f"{s['requests_per_second']:.0f}" + (f" ({s['errors']} errors)" if s["errors"] else "")
                 + f" | {s['latency_ms']['p50']:.2f} / {s['latency_ms']['p99']:.2f}" for s in steps]
        ratio = steps[0]["requests_per_second"] / max(steps[-1]["requests_per_second"], 1e-9)
        lines.append(f"| {steps[0]['concurrency']} | " + " | ".join(cells) + f" | {ratio:.2f}x |")
    return lines


def write_charts(runs, out_dir):
    """Draws serving_throughput.png (requests/s vs concurrency) and serving_latency_cdf.png (the concurrency-64
    runs' latency percentiles as CDF points) into out_dir; returns their paths. matplotlib is imported here so
    the benchmark's other steps need only the standard library."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    os.makedirs(out_dir, exist_ok=True)
    throughput, cdf = (os.path.join(out_dir, f"serving_{n}.png") for n in ("throughput", "latency_cdf"))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, run in runs.items():
        xs = [s["concurrency"] for s in run["sweep"]]
        ax.plot(xs, [s["requests_per_second"] for s in run["sweep"]], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set(xlabel="concurrency (requests in flight)", ylabel="requests/s", ylim=(0, None),
           title="Serving throughput, E=512 H=8 B=1 L=32")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(throughput, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, run in runs.items():
        latency = run["c64"]["latency_ms"]
        ax.plot([latency[k] for k, _ in CDF_POINTS], [q for _, q in CDF_POINTS], marker="o", label=label)
    ax.set_xscale("log")
    # Labels at 1-2-5 steps: the latencies often span less than a decade, which would leave one label.
    ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax.set(xlabel="latency (ms, log scale)", ylabel="fraction of requests", ylim=(0, 1.02),
           title="Latency CDF at concurrency 64, E=512 H=8 B=1 L=32\n(points: min, p50, p90, p99, p99.9, max)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(cdf, dpi=120)
    plt.close(fig)
    return throughput, cdf


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default="build")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per measured step")
    ap.add_argument("--sweep-duration", type=float, default=3.0, help="seconds per point of the concurrency sweep")
    ap.add_argument("--charts-dir", default=os.path.join(BENCH_DIR, "results"), help="where the PNGs go")
    args = ap.parse_args()
    build, dur = args.build, f"{args.duration}s"
    tmp = tempfile.mkdtemp(prefix="attnserve_bench_")
    procs = []
    results = {}
    try:
        # 1. The floor.
        echo = Proc([f"{build}/bench/attnserve_echo_server", "--address", "127.0.0.1:0"], r"ready: port=(\d+)",
                    os.path.join(tmp, "echo.log"))
        procs.append(echo)
        e = attnbench(build, f"127.0.0.1:{echo.ports[0]}", "--echo", "--payload-bytes", "4096",
                      "--concurrency", "1,32", "--duration", dur)
        results["echo_c1_p50_ms"] = e[0]["latency_ms"]["p50"]
        results["echo_c1_rps"] = e[0]["requests_per_second"]
        results["echo_c32_rps"] = e[1]["requests_per_second"]
        results["echo_c32_p50_ms"] = e[1]["latency_ms"]["p50"]
        echo.stop()

        # 2. Latency, E=256 H=4 B=1 L=16, concurrency 1.
        s = server(build, tmp, "latency", ['name: "small" embed_dim: 256 num_heads: 4 seed: 1'])
        procs.append(s)
        lat = attnbench(build, f"127.0.0.1:{s.ports[0]}", "--layer", "small", "--seq", "16",
                        "--concurrency", "1", "--duration", dur)[0]
        s.stop()
        eng = engine_bench(build, "BM_ServerBatch/R:1/L:16/E:256/H:4")
        engine_us = next(iter(eng.values()))["real_time"]  # microseconds (benchmark unit)
        results["lat_p50_ms"] = lat["latency_ms"]["p50"]
        results["lat_p99_ms"] = lat["latency_ms"]["p99"]
        results["lat_server_compute_p50_us"] = lat["server"]["compute_us"]["p50"]
        results["lat_engine_us"] = engine_us
        results["lat_bound_ms"] = results["echo_c1_p50_ms"] + engine_us / 1000 + 0.05

        # 3. Batching: dynamic vs max_batch_size 1 at concurrency 64, L=32, E=512 H=8.
        for layout, workers in (("one_worker", 1), ("default", None)):
            for label, batching in (("dynamic", "max_batch_size: 64"), ("single", "max_batch_size: 1")):
                s = server(build, tmp, f"batch_{label}_{layout}", [mid_layer(batching)], worker_threads=workers)
                procs.append(s)
                r = attnbench(build, f"127.0.0.1:{s.ports[0]}", "--layer", "mid", "--seq", "32",
                              "--concurrency", "64", "--duration", dur)[0]
                s.stop()
                results[f"batch_{layout}_{label}"] = {"rps": r["requests_per_second"], "workers": s.workers,
                                                      "p50_ms": r["latency_ms"]["p50"],
                                                      "mean_batch": r["server"]["batch_size"]["mean"]}
            results[f"batch_{layout}_ratio"] = (results[f"batch_{layout}_dynamic"]["rps"]
                                                / results[f"batch_{layout}_single"]["rps"])

        # 3b. Served / engine at step 3's shape, c=64: one connection, and 16 (many clients).
        s = server(build, tmp, "served", [mid_layer("max_batch_size: 64")])
        procs.append(s)
        for conns in SERVED_CONNECTIONS:
            results[f"served_{conns}"] = served_step(build, s, ("--layer", "mid", "--seq", "32"), dur, conns)
        s.stop()

        # 3c. The same with one worker: every batch on every CPU, one at a time.
        s = server(build, tmp, "served_one_worker", [mid_layer("max_batch_size: 64")], worker_threads=1)
        procs.append(s)
        results["served_one_worker"] = served_step(build, s, ("--layer", "mid", "--seq", "32"), dur,
                                                   SERVED_CONNECTIONS[-1])
        s.stop()

        # 4. Efficiency at saturation, B=1 L=128 on E=768 H=12; 5. open loop at 70% of the maximum.
        s = server(build, tmp, "efficiency", ['name: "base" embed_dim: 768 num_heads: 12 seed: 2'])
        procs.append(s)
        target = f"127.0.0.1:{s.ports[0]}"
        results["efficiency"] = served_step(build, s, ("--layer", "base", "--seq", "128"), dur)
        rate = int(0.7 * results["efficiency"]["rps"])
        ol = attnbench(build, target, "--layer", "base", "--seq", "128", "--rate", str(rate), "--duration", dur)[0]
        s.stop()
        results["ol_rate"] = rate
        results["ol_p50_ms"] = ol["latency_ms"]["p50"]
        results["ol_p99_ms"] = ol["latency_ms"]["p99"]
        results["ol_errors"] = ol["errors"]
        # The engine's runs come after the servers', so that no server is measured while it warms up its layers.
        for key, shape in (("served_1", "L:32/E:512/H:8"), ("served_16", "L:32/E:512/H:8"),
                           ("served_one_worker", "L:32/E:512/H:8"), ("efficiency", "L:128/E:768/H:12")):
            sv = results[key]
            sv["engine"] = engine_for(build, sv["workers"], sv["mean_batch"], shape)

        # 6. attnserve vs the PyTorch server at concurrency 64, then both over a range of concurrency.
        runs = compare_with_torch(build, tmp, dur, f"{args.sweep_duration}s", procs)
        results.update(torch_results(runs))
    finally:
        for p in procs:
            p.stop()

    r = results
    def yes(ok):
        return "yes" if ok else "NO"
    print(json.dumps(r, indent=1), file=sys.stderr)
    print("| measurement | value | target | met |")
    print("|---|---|---|---|")
    print(f"| echo floor, 4 KiB, c=1: p50 | {r['echo_c1_p50_ms'] * 1000:.0f} us "
          f"({r['echo_c1_rps']:.0f} req/s) | - | - |")
    print(f"| echo floor, 4 KiB, c=32: throughput | {r['echo_c32_rps']:.0f} req/s "
          f"(p50 {r['echo_c32_p50_ms'] * 1000:.0f} us) | - | - |")
    print(f"| latency E=256 H=4 B=1 L=16, c=1: p50 | {r['lat_p50_ms'] * 1000:.0f} us "
          f"(p99 {r['lat_p99_ms'] * 1000:.0f} us; engine in-process {r['lat_engine_us']:.0f} us, "
          f"server compute p50 {r['lat_server_compute_p50_us']:.0f} us) | "
          f"<= {r['lat_bound_ms'] * 1000:.0f} us | {yes(r['lat_p50_ms'] <= r['lat_bound_ms'])} |")
    for layout, target in (("one_worker", 2.0), ("default", None)):
        dyn, single, ratio = r[f"batch_{layout}_dynamic"], r[f"batch_{layout}_single"], r[f"batch_{layout}_ratio"]
        workers = "`worker_threads: 1`" if layout == "one_worker" else f"default, {dyn['workers']} workers"
        print(f"| batching E=512 H=8 L=32, c=64 ({workers}): dynamic / max_batch_size=1 | {dyn['rps']:.0f} / "
              f"{single['rps']:.0f} req/s = {ratio:.2f}x (mean batch {dyn['mean_batch']:.1f}) | "
              f"{'-' if target is None else f'>= {target:g}x'} | {'-' if target is None else yes(ratio >= target)} |")
    for conns in SERVED_CONNECTIONS:
        print(served_row(f"served / engine E=512 H=8 L=32, c=64, {conns} connection{'s' if conns > 1 else ''}",
                         r[f"served_{conns}"], 0.8))
    print(served_row(f"served / engine, `worker_threads: 1` (not the default), c=64, {SERVED_CONNECTIONS[-1]} "
                     "connections", r["served_one_worker"], None))
    print(served_row("efficiency E=768 H=12 B=1 L=128, c=64: achieved / in-process", r["efficiency"], 0.7))
    print(f"| open loop at 70% of max ({r['ol_rate']} req/s): p99 / p50 | "
          f"{r['ol_p99_ms']:.2f} / {r['ol_p50_ms']:.2f} ms = {r['ol_p99_ms'] / r['ol_p50_ms']:.1f}x "
          f"({r['ol_errors']} errors) | <= 5x | "
          f"{yes(r['ol_p99_ms'] <= 5 * r['ol_p50_ms'])} |")
    print(f"| vs PyTorch server (grpcio, nn.MultiheadAttention) E=512 H=8 L=32, c=64: attnserve / PyTorch | "
          f"{r['vs_torch_attnserve_rps']:.0f} / {r['vs_torch_torch_rps']:.0f} req/s = {r['vs_torch_ratio']:.2f}x "
          f"(p50 {r['vs_torch_attnserve_p50_ms']:.2f} / {r['vs_torch_torch_p50_ms']:.2f} ms; errors "
          f"{r['vs_torch_attnserve_errors']} / {r['vs_torch_torch_errors']}) | >= 2.5x | "
          f"{yes(r['vs_torch_ratio'] >= 2.5)} |")
    print()
    print(f"Concurrency sweep, E=512 H=8 B=1 L=32, {args.sweep_duration:g} s per point (ratio: attnserve / PyTorch):")
    print()
    print("\n".join(sweep_table(runs)))
    print()
    print("Charts: " + ", ".join(write_charts(runs, args.charts_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
