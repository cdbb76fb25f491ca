#!/usr/bin/python3
"""Sessions behind a proxy (deploy/session-proxy/nginx.conf, Debian's nginx) with two attnserve replicas on
loopback: the calls of 50 sessions, each carrying its id in the x-attnserve-session metadata, all reach the
replica that holds the session (exactly one replica has it) and every output is exact; both replicas get
sessions; once one replica is killed, only its sessions fail, with NOT_FOUND or UNAVAILABLE, and the other's
go on.

    /usr/bin/python3 tests/integration/session_proxy_test.py path/to/attnserve
"""

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

import grpc
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kserve_test as kt  # noqa: E402  (stubs, the server harness)
from checks import expect, stop_process  # noqa: E402

SESSIONS = 50
TIMEOUT = 30
HEADER = "x-attnserve-session"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nginx(tmp, replicas, upstream_tls=None):
    """The shipped config with our replicas and a free port, in the foreground, one process. `upstream_tls`:
    nginx directives that make it speak TLS to the replicas (grpcs), as deploy/k8s/SECURITY.md shows."""
    text = open(os.path.join(kt.REPO_ROOT, "deploy", "session-proxy", "nginx.conf")).read()
    if upstream_tls:
        text, n = re.subn(r"grpc_pass grpc://attnserve;\n", "grpc_pass grpcs://attnserve;\n" + upstream_tls, text)
        expect(n == 1, "nginx.conf has its grpc_pass line")
    servers = "".join(f"    server 127.0.0.1:{p};\n" for p in replicas)
    text, n = re.subn(r"    # replicas begin\n.*?    # replicas end\n", servers, text, flags=re.S)
    expect(n == 1, "nginx.conf has its replicas block")
    port = free_port()
    text, n = re.subn(r"listen 127\.0\.0\.1:8080 http2;", f"listen 127.0.0.1:{port} http2;", text)
    expect(n == 1, "nginx.conf has its listen line")
    conf = os.path.join(tmp, "nginx.conf")
    open(conf, "w").write(text)
    log = open(os.path.join(tmp, "nginx.log"), "w")
    proc = subprocess.Popen(["nginx", "-p", tmp, "-c", conf, "-g", "daemon off; master_process off;"],
                            stdout=log, stderr=log)
    for _ in range(200):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, port
        expect(proc.poll() is None, "nginx exited: " + open(os.path.join(tmp, "nginx.log")).read())
        time.sleep(0.05)
    raise RuntimeError("nginx did not listen")


def tensor(a):
    return kt.pb.Tensor(shape=list(a.shape), dtype=kt.pb.FLOAT32, raw_data=a.astype("<f4").tobytes())


def array(t):
    return np.frombuffer(t.raw_data, "<f4").reshape(tuple(t.shape))


def holder(replicas, spb, sid):
    """Indices of the replicas that hold session `sid` (asked directly, not through the proxy)."""
    found = []
    for i, stub in enumerate(replicas):
        try:
            stub.GetSession(spb.GetSessionRequest(session_id=sid), timeout=TIMEOUT)
            found.append(i)
        except grpc.RpcError as e:
            expect(e.code() == grpc.StatusCode.NOT_FOUND, f"GetSession on replica {i}: {e.code()}")
    return found


def main():
    binary = os.path.abspath(sys.argv[1])
    tmp = tempfile.mkdtemp(prefix="attnserve_session_proxy_")
    kt.generate_stubs(tmp)
    from attnserve.v1 import session_pb2 as spb  # noqa: E402
    from attnserve.v1 import session_pb2_grpc as spbg  # noqa: E402
    g = kt.Golden(next(c for c in kt.GOLDEN_CASES if c["name"] == "causal"))
    servers = [kt.Server(binary, tmp, f"replica{i}", g.config_text()) for i in range(2)]
    nginx, port = start_nginx(tmp, [s.port for s in servers])
    try:
        proxy = spbg.SessionServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        direct = [spbg.SessionServiceStub(s.channel) for s in servers]
        rng = np.random.default_rng(7)
        xs, where = {}, {}
        for i in range(SESSIONS):
            sid = f"chat-{i}"
            md = ((HEADER, sid),)
            proxy.CreateSession(spb.CreateSessionRequest(session_id=sid, layers=[g.layer]), metadata=md,
                                timeout=TIMEOUT)
            x = rng.standard_normal((10, 32)).astype(np.float32)
            outs = [proxy.Append(spb.AppendRequest(session_id=sid, layer=g.layer, query=tensor(x[a:b])),
                                 metadata=md, timeout=TIMEOUT) for a, b in ((0, 8), (8, 9), (9, 10))]
            got = np.concatenate([array(o.output) for o in outs])
            want = array(servers[0].v1.Infer(kt.pb.InferRequest(layer=g.layer, query=tensor(x), is_causal=True),
                                             timeout=TIMEOUT).output)
            expect(np.abs(got - want).max() <= 1e-6, f"{sid}: outputs through the proxy differ from causal Infer")
            found = holder(direct, spb, sid)
            expect(len(found) == 1, f"{sid} is held by replicas {found}: every call must reach one replica")
            xs[sid], where[sid] = x, found[0]
        # A fork named "<parent>:<suffix>" routes with its parent (the proxy hashes the id up to its first ':').
        for i in range(10):
            sid, fork = f"chat-{i}", f"chat-{i}:alt"
            proxy.ForkSession(spb.ForkSessionRequest(session_id=sid, new_session_id=fork),
                              metadata=((HEADER, sid),), timeout=TIMEOUT)
            r = proxy.Append(spb.AppendRequest(session_id=fork, layer=g.layer, query=tensor(xs[sid][:1])),
                             metadata=((HEADER, fork),), timeout=TIMEOUT)
            expect(r.position == 11 and holder(direct, spb, fork) == [where[sid]], f"{fork} lives with {sid}")
        counts = [list(where.values()).count(i) for i in range(2)]
        expect(min(counts) >= 5, f"sessions per replica {counts}: the hash should spread them")
        print(f"PASS {SESSIONS} sessions through the proxy, each on one replica ({counts}), all exact", flush=True)

        servers[0].proc.send_signal(signal.SIGKILL)
        servers[0].proc.wait(10)
        codes = {}
        for sid, x in xs.items():
            try:
                proxy.Append(spb.AppendRequest(session_id=sid, layer=g.layer, query=tensor(x[:1])),
                             metadata=((HEADER, sid),), timeout=TIMEOUT)
                code = grpc.StatusCode.OK
            except grpc.RpcError as e:
                code = e.code()
            expected = ((grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE) if where[sid] == 0
                        else (grpc.StatusCode.OK,))
            expect(code in expected, f"{sid} (replica {where[sid]}) after replica 0 died: {code}")
            codes[code] = codes.get(code, 0) + 1
        print(f"PASS replica 0 killed: its sessions fail, the others go on ({codes})", flush=True)
    finally:
        stop_process(nginx, 10)
        for s in servers:
            if s.alive():
                s.stop()
    print("session_proxy_test: PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
