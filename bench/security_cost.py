#!/usr/bin/python3
"""What TLS, mTLS and tokens cost, beside plaintext in the same run (issue #9's numbers for BENCHMARKS.md).

    /usr/bin/python3 bench/security_cost.py [--build build] [--duration 5] [--rounds 3]

Makes a CA, a server certificate (SAN localhost, 127.0.0.1) and a client certificate with the openssl
command, and a token file; then starts attnserve on loopback once per mode (plaintext, token, TLS,
TLS + token, mTLS + token) and drives each with attnbench on layer `small` (E=256, H=4, B=1, L=16: small
requests, where the transport's share is largest): p50 at concurrency 1, requests/s at concurrency 64.
Modes are interleaved over --rounds rounds and the medians reported, with each mode's ratio to plaintext, and
the server's own CPU time per request (from /proc: client and server share this machine's cores, so the
requests/s also pay for the client's encryption).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serving_bench import Proc  # noqa: E402

TOKEN = "bench-token-0123456789abcdef"
READY = r"ready: grpc_port=(\d+) metrics_port=(\d+)"


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_credentials(d):
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
            "-subj", "/CN=attnserve-bench-ca", cwd=d)
    with open(os.path.join(d, "san.ext"), "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj",
                f"/CN={name}", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.crt", "-days", "2", "-extfile", "san.ext", cwd=d)
    import hashlib
    with open(os.path.join(d, "tokens"), "w") as f:
        f.write(f"sha256:{hashlib.sha256(TOKEN.encode()).hexdigest()} infer\n")
    with open(os.path.join(d, "token"), "w") as f:
        f.write(TOKEN + "\n")


def modes(d):
    p = lambda n: os.path.join(d, n)  # noqa: E731
    tls_server = ["--tls-cert-file", p("server.crt"), "--tls-key-file", p("server.key")]
    tls_client = ["--tls", "--tls-root-certs", p("ca.crt")]
    token_server = ["--auth-token-file", p("tokens")]
    token_client = ["--token-file", p("token")]
    mtls_client = ["--tls-cert", p("client.crt"), "--tls-key", p("client.key")]
    return [
        ("plaintext", [], []),
        ("token", token_server, token_client),
        ("TLS", tls_server, tls_client),
        ("TLS + token", tls_server + token_server, tls_client + token_client),
        ("mTLS + token", tls_server + token_server + ["--tls-client-ca-file", p("ca.crt")],
         tls_client + token_client + mtls_client),
    ]


def server_cpu_seconds(pid):
    """User + system CPU time of the server process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_mode(build, d, server_args, client_args, duration):
    proc = Proc([f"{build}/server/attnserve", "--grpc-address", "127.0.0.1:0", "--metrics-address", "127.0.0.1:0",
                 "--shutdown-grace", "5s", *server_args], READY, os.path.join(d, "server.log"))
    try:
        cpu_before = server_cpu_seconds(proc.p.pid)
        out = subprocess.run([f"{build}/tools/attnbench", "--target", f"localhost:{proc.ports[0]}", "--json",
                              "--quiet", "--layer", "small", "--seq", "16", "--concurrency", "1,64", "--duration",
                              f"{duration}s", "--warmup", "1s", *client_args],
                             check=True, capture_output=True, text=True).stdout
        cpu = server_cpu_seconds(proc.p.pid) - cpu_before
    finally:
        proc.stop()
    steps = json.loads(out)
    assert all(s["errors"] == 0 for s in steps), steps
    requests = sum(s["requests"] for s in steps)  # measured steps only; warm-ups add a little CPU
    return steps[0]["latency_ms"]["p50"], steps[1]["requests_per_second"], cpu / requests * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build")
    ap.add_argument("--duration", type=float, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        make_credentials(d)
        results = {name: ([], [], []) for name, _, _ in modes(d)}
        for r in range(a.rounds):
            for name, server_args, client_args in modes(d):
                p50, rps, cpu_us = run_mode(a.build, d, server_args, client_args, a.duration)
                for column, value in zip(results[name], (p50, rps, cpu_us)):
                    column.append(value)
                print(f"round {r + 1} {name}: p50 {p50:.3f} ms, {rps:.0f} requests/s, server CPU {cpu_us:.0f} us "
                      "per request", file=sys.stderr)
    base_p50 = statistics.median(results["plaintext"][0])
    base_rps = statistics.median(results["plaintext"][1])
    base_cpu = statistics.median(results["plaintext"][2])
    print("| mode | p50 at c=1 (ms) | vs plaintext | requests/s at c=64 | vs plaintext | server CPU per request (us) "
          "| vs plaintext |")
    print("|---|---|---|---|---|---|---|")
    for name, columns in results.items():
        p50, rps, cpu = (statistics.median(c) for c in columns)
        print(f"| {name} | {p50:.3f} | {p50 / base_p50 - 1:+.1%} | {rps:.0f} | {rps / base_rps - 1:+.1%} | {cpu:.0f} "
              f"| {cpu / base_cpu - 1:+.1%} |")


if __name__ == "__main__":
    main()
