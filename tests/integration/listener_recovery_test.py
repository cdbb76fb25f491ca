#!/usr/bin/python3
"""The listener survives descriptor exhaustion: attnserve with its file limit lowered to 200 (soft and hard, so
it cannot raise it), 400 TCP connections opened to its gRPC port (EMFILE in its accept loop), then closed.
gRPC 1.51 never accepts again after that (CVE-2023-4785); the server's own probe must see it, turn
NOT_SERVING, drain and exit with status 3 for its supervisor to restart it. A server that accepts again
instead (a gRPC that recovers) passes too. Either way the outcome is printed.

    /usr/bin/python3 tests/integration/listener_recovery_test.py path/to/attnserve

Ends with "N passed, M failed"; exit 1 on failure.
"""

import os
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time

FD_LIMIT = 200
CONNECTIONS = 400


def start(binary, log_path):
    def lower_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))

    log = open(log_path, "w")
    proc = subprocess.Popen([binary, "--grpc-address", "127.0.0.1:0", "--metrics-address", "127.0.0.1:0",
                             "--listener-check-interval", "1s", "--shutdown-grace", "5s", "--log-level", "info"],
                            stdout=log, stderr=subprocess.STDOUT, preexec_fn=lower_limit)
    deadline = time.time() + 60
    while time.time() < deadline:
        m = re.search(r"ready: grpc_port=(\d+)", open(log_path).read())
        if m:
            return proc, int(m.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError("attnserve did not start: " + open(log_path).read()[-2000:])


def accepts(port, timeout=2.0):
    """True when the port answers the HTTP/2 preface (the process accepted the connection)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as c:
            c.settimeout(timeout)
            c.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
            return len(c.recv(64)) > 0
    except OSError:
        return False


def main():
    binary = os.path.abspath(sys.argv[1])
    tmp = tempfile.mkdtemp(prefix="attnserve_listener_")
    log_path = os.path.join(tmp, "server.log")
    proc, port = start(binary, log_path)
    failed = 0
    try:
        conns = []
        for _ in range(CONNECTIONS):
            try:
                conns.append(socket.create_connection(("127.0.0.1", port), timeout=2))
            except OSError:
                break
        time.sleep(2)
        for c in conns:
            c.close()
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None and not accepts(port):
            time.sleep(0.5)
        log = open(log_path, errors="replace").read()
        if proc.poll() is None and accepts(port):
            print(f"PASS {len(conns)} connections against a limit of {FD_LIMIT}: the server accepts again")
        elif proc.poll() == 3 and "no longer accepts connections" in log and "exiting with status 3" in log:
            line = next(l for l in log.splitlines() if "no longer accepts" in l)
            print(f"PASS {len(conns)} connections against a limit of {FD_LIMIT}: detected and exited 3 to be "
                  f"restarted; {line.split('] ', 1)[-1][:200]}")
        else:
            failed = 1
            print(f"FAIL neither recovered nor exited 3 (exit {proc.poll()}):\n{log[-3000:]}")
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)
    print(f"{1 - failed} passed, {failed} failed")
    return failed


if __name__ == "__main__":
    sys.exit(main())
