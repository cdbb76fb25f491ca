#!/usr/bin/python3
"""Who may talk to the attnserve binary: TLS and mTLS on the gRPC port (and certificate rotation while
serving), bearer tokens and their scopes (and the token file's reload), what layer info shows to whom,
/metrics basic auth, reflection (guarded or disabled), the plaintext health port, and attnctl's TLS and
token flags.

    /usr/bin/python3 tests/integration/security_test.py path/to/attnserve [path/to/attnctl] [case ...]

attnctl defaults to ../tools/attnctl next to the server's directory (the build tree's layout). Two server
processes: "tls" (TLS + mTLS + tokens + reflection + a health port) and "plain" (plaintext + tokens +
/metrics basic auth + --disable-reflection, with a layer loaded from a weights file). Certificates are made
with Debian's python3-cryptography into a temporary directory; stubs are generated from proto/ with protoc.
Ends with the line "N passed, M failed"; exits 1 when any case failed.
"""

import base64
import datetime
import hashlib
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

# gRPC logs every failed handshake at ERROR on stderr; the refused handshakes here are the point.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import grpc  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from checks import expect, run_cases, stop_process  # noqa: E402
import numpy as np  # noqa: E402
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
GOLDEN_DIR = os.path.join(REPO_ROOT, "tests", "golden")
RELOAD_WAIT = 3.0  # token and metrics-user files: a change takes effect within this
ROTATION_WAIT = 5.0  # TLS files (tls_reload_interval_ms: 1000)
REFLECTION_METHOD = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
LIST_SERVICES = b"\x3a\x00"  # ServerReflectionRequest{list_services: ""}


def generate_stubs(out_dir):
    v1 = os.path.join(REPO_ROOT, "proto", "attnserve", "v1")
    protos = sorted(os.path.join(v1, f) for f in os.listdir(v1) if f.endswith(".proto"))
    plugin = "--plugin=protoc-gen-grpc_python=/usr/bin/grpc_python_plugin"
    subprocess.run(["protoc", "-I", os.path.join(REPO_ROOT, "proto"), f"--python_out={out_dir}",
                    f"--grpc_python_out={out_dir}", plugin, *protos], check=True)
    health_dir = os.path.join(REPO_ROOT, "tests", "protos")
    subprocess.run(["protoc", "-I", health_dir, f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", plugin,
                    os.path.join(health_dir, "grpc_health_v1.proto")], check=True)
    sys.path.insert(0, out_dir)
    global pb, pbg, spb, spbg, hpb, hpbg
    from attnserve.v1 import attention_pb2 as pb  # noqa: E402
    from attnserve.v1 import attention_pb2_grpc as pbg  # noqa: E402
    from attnserve.v1 import session_pb2 as spb  # noqa: E402
    from attnserve.v1 import session_pb2_grpc as spbg  # noqa: E402
    import grpc_health_v1_pb2 as hpb  # noqa: E402
    import grpc_health_v1_pb2_grpc as hpbg  # noqa: E402


# ---- certificates ---------------------------------------------------------------------------------------

def pem_key(key):
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def pem_cert(cert):
    return cert.public_bytes(serialization.Encoding.PEM)


class CA:
    """A self-signed CA (EC P-256) that issues server and client certificates."""

    def __init__(self, name):
        now = datetime.datetime.utcnow()
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (x509.CertificateBuilder().subject_name(self.name).issuer_name(self.name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(days=1))
                     .not_valid_after(now + datetime.timedelta(days=30))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                  content_commitment=False, key_encipherment=False,
                                                  data_encipherment=False, key_agreement=False,
                                                  encipher_only=False, decipher_only=False), critical=True)
                     .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
                     .sign(self.key, hashes.SHA256()))
        self.pem = pem_cert(self.cert)

    def issue(self, cn, server, not_before=None, not_after=None):
        """(cert PEM, key PEM) of a leaf: a server one (SAN DNS:localhost + IP:127.0.0.1) or a client one."""
        now = datetime.datetime.utcnow()
        key = ec.generate_private_key(ec.SECP256R1())
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
             .issuer_name(self.name).public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(not_before or now - datetime.timedelta(days=1))
             .not_valid_after(not_after or now + datetime.timedelta(days=30))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                   else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        if server:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                             x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                critical=False)
        return pem_cert(b.sign(self.key, hashes.SHA256())), pem_key(key)


class Pki:
    """Everything the cases need, as bytes and as files in `dir`."""

    def __init__(self, dir):
        self.dir = dir
        self.ca = CA("attnserve test CA")
        self.other_ca = CA("unrelated test CA")
        self.server = self.ca.issue("localhost", server=True)
        self.server2 = self.other_ca.issue("localhost", server=True)  # the rotation's new pair
        self.client = self.ca.issue("client", server=False)
        self.other_client = self.other_ca.issue("intruder", server=False)
        past = datetime.datetime.utcnow()
        self.expired_client = self.ca.issue("expired", server=False, not_before=past - datetime.timedelta(days=30),
                                            not_after=past - datetime.timedelta(days=1))
        self.files = {}
        for name, data in (("ca.pem", self.ca.pem), ("other_ca.pem", self.other_ca.pem),
                           ("server.pem", self.server[0]), ("server.key", self.server[1]),
                           ("client.pem", self.client[0]), ("client.key", self.client[1])):
            self.files[name] = write_file(os.path.join(dir, name), data)


def write_file(path, data, atomic=True):
    """Writes `data` to `path`; atomic: through a temporary file and os.replace (what a watcher should see)."""
    if isinstance(data, str):
        data = data.encode()
    if not atomic:
        with open(path, "wb") as f:
            f.write(data)
        return path
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def sha256_hex(s):
    return hashlib.sha256(s.encode()).hexdigest()


# ---- servers ---------------------------------------------------------------------------------------------

def golden_layer():
    cases = json.load(open(os.path.join(GOLDEN_DIR, "cases.json")))["cases"]
    c = next(c for c in cases if c["name"] == "causal")
    path = os.path.join(GOLDEN_DIR, "causal.weights.safetensors")
    return c, path


def config_text():
    c, path = golden_layer()
    return (f'security {{ tls_reload_interval_ms: 1000 }}\n'
            f'layers {{ name: "small" embed_dim: 64 num_heads: 4 seed: 1 }}\n'
            f'layers {{ name: "golden" embed_dim: {c["embed_dim"]} num_heads: {c["num_heads"]} '
            f'weights_path: "{path}" weights_prefix: "{c["weights_prefix"]}" }}\n')


class Server:
    """The binary on loopback ports chosen by the OS, its log in a file."""

    def __init__(self, binary, tmp, name, flags):
        cfg = os.path.join(tmp, f"{name}.pbtxt")
        write_file(cfg, config_text())
        self.name = name
        self.log_path = os.path.join(tmp, f"{name}.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([binary, "--config", cfg, "--grpc-address", "127.0.0.1:0",
                                      "--metrics-address", "127.0.0.1:0", "--shutdown-grace", "5s", *flags],
                                     stdout=self.log, stderr=self.log)
        self.health_port = 0
        deadline = time.time() + 60
        while time.time() < deadline:
            text = self.log_text()
            m = re.search(r"ready: grpc_port=(\d+) metrics_port=(\d+)", text)
            if m:
                self.port, self.metrics_port = int(m.group(1)), int(m.group(2))
                h = re.search(r"ready: .* health_port=(\d+)", text)
                self.health_port = int(h.group(1)) if h else 0
                print(f"server {name}: pid {self.proc.pid}, grpc_port={self.port} metrics_port={self.metrics_port} "
                      f"health_port={self.health_port}", flush=True)
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"attnserve ({name}) exited: " + text[-3000:])
            time.sleep(0.05)
        else:
            raise RuntimeError(f"attnserve ({name}) not ready in 60 s")

    def log_text(self):
        return open(self.log_path, errors="replace").read()

    def alive(self):
        return self.proc.poll() is None

    def metrics(self, auth=None):
        """(HTTP status, body) of GET /metrics; auth: (user, password) for basic auth."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.metrics_port}/metrics")
        if auth:
            req.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")

    def stop(self):
        """SIGTERM; the exit status (None when it had to be killed)."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self.log.close()
                return None
        self.log.close()
        return self.proc.returncode

    def kill(self):
        if self.alive():
            self.proc.kill()
            self.proc.wait()
        self.log.close()


CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]  # no connection shared between the cases' channels


def plain_channel(port):
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)


def tls_channel(port, root_pem, client=None):
    """A TLS channel to 127.0.0.1:port trusting root_pem; client: (cert PEM, key PEM) for mTLS."""
    creds = grpc.ssl_channel_credentials(root_certificates=root_pem, private_key=client[1] if client else None,
                                         certificate_chain=client[0] if client else None)
    return grpc.secure_channel(f"127.0.0.1:{port}", creds, options=CHANNEL_OPTIONS)


def bearer(token):
    return (("authorization", f"Bearer {token}"),) if token is not None else ()


# ---- requests --------------------------------------------------------------------------------------------

def infer_request(layer="small", shape=(1, 8, 64), rid="", seed=7):
    r = pb.InferRequest(layer=layer, id=rid)
    r.query.shape.extend(shape)
    r.query.dtype = pb.FLOAT32
    r.query.raw_data = np.random.default_rng(seed).standard_normal(shape, np.float32).tobytes()
    return r


def output(resp):
    return np.frombuffer(resp.output.raw_data, np.float32)


def infer(channel, token=None, timeout=10):
    return pbg.AttentionServiceStub(channel).Infer(infer_request(), metadata=bearer(token), timeout=timeout)


def check_output(resp, shape=(1, 8, 64)):
    expect(list(resp.output.shape) == list(shape), f"output shape {list(resp.output.shape)}")
    out = output(resp)
    expect(out.size == int(np.prod(shape)), f"{out.size} output values")
    expect(bool(np.all(np.isfinite(out))), "non-finite output values")
    return out


def health(channel, timeout=5):
    return hpbg.HealthStub(channel).Check(hpb.HealthCheckRequest(service=""), timeout=timeout).status


def reflection_list(channel, token=None, timeout=5):
    call = channel.stream_stream(REFLECTION_METHOD, request_serializer=None, response_deserializer=None)
    return b"".join(call(iter([LIST_SERVICES]), metadata=bearer(token), timeout=timeout))


def service_names(answer):
    """The service names in a ServerReflectionResponse's bytes (list_services_response)."""
    return sorted(set(n.decode() for n in re.findall(rb"[A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)+", answer)))


def expect_reflection_unimplemented(channel, token, what):
    """Reflection must not be served: UNIMPLEMENTED. When it answers, the message names what it listed."""
    answer = b""

    def call():
        nonlocal answer
        answer = reflection_list(channel, token)

    code, details = rpc_code(call)
    expect(code == grpc.StatusCode.UNIMPLEMENTED,
           f"{what}: expected UNIMPLEMENTED, got {code.name} {details[:200]}".rstrip()
           + (f", listing the services {service_names(answer)}" if code == grpc.StatusCode.OK else ""))


def rpc_code(fn):
    """The status code of fn() (OK when it returns), and its message."""
    try:
        fn()
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        return e.code(), e.details() or ""


def expect_code(fn, code, what):
    got, details = rpc_code(fn)
    expect(got == code, f"{what}: expected {code.name}, got {got.name}: {details[:300]}")
    return details


def eventually(fn, seconds, step=0.1):
    """Polls fn() until it is true or `seconds` passed; (result, elapsed)."""
    t = time.time()
    while True:
        ok = fn()
        if ok or time.time() - t > seconds:
            return ok, time.time() - t
        time.sleep(step)


# ---- the suite's state -----------------------------------------------------------------------------------

class Env:
    pass


def setup(binary, attnctl, tmp, e):
    e.tmp, e.binary, e.attnctl = tmp, binary, attnctl
    e.pki = Pki(tmp)
    e.tokens = {name: "tok-" + base64.urlsafe_b64encode(os.urandom(18)).decode()
                for name in ("infer", "admin", "both", "new", "never", "owner", "other")}
    # The tls server's tokens: fixed for the whole run.
    e.tls_token_file = write_file(os.path.join(tmp, "tls_tokens"),
                                  f"# test tokens\nsha256:{sha256_hex(e.tokens['infer'])} infer\n"
                                  f"sha256:{sha256_hex(e.tokens['admin'])} admin\n")
    # The plain server's tokens: rewritten by the reload cases.
    e.plain_token_lines = [f"sha256:{sha256_hex(e.tokens['infer'])} infer",
                           f"sha256:{sha256_hex(e.tokens['admin'])} admin",
                           f"sha256:{sha256_hex(e.tokens['both'])} infer,admin",
                           f"sha256:{sha256_hex(e.tokens['owner'])} infer",
                           f"sha256:{sha256_hex(e.tokens['other'])} infer"]
    e.plain_token_file = write_file(os.path.join(tmp, "plain_tokens"), "\n".join(e.plain_token_lines) + "\n")
    e.metrics_user = ("prom", "pw-" + base64.urlsafe_b64encode(os.urandom(12)).decode())
    e.metrics_auth_file = write_file(os.path.join(tmp, "metrics_users"),
                                     f"{e.metrics_user[0]} sha256:{sha256_hex(e.metrics_user[1])}\n")
    f = e.pki.files
    e.tls = e.plain = None
    e.tls = Server(binary, tmp, "tls", ["--tls-cert-file", f["server.pem"], "--tls-key-file", f["server.key"],
                                        "--tls-client-ca-file", f["ca.pem"], "--auth-token-file", e.tls_token_file,
                                        "--health-address", "127.0.0.1:0"])
    e.plain = Server(binary, tmp, "plain", ["--auth-token-file", e.plain_token_file,
                                            "--metrics-auth-file", e.metrics_auth_file, "--disable-reflection"])
    return e


def tls_ok(e, root=None, client="valid"):
    clients = {"valid": e.pki.client, "none": None, "other_ca": e.pki.other_client, "expired": e.pki.expired_client}
    return tls_channel(e.tls.port, root or e.pki.ca.pem, clients[client])


def transport_refused(e, channel, what):
    """An Infer on `channel` (with a valid token) must fail at the transport: UNAVAILABLE."""
    with channel:
        code, details = rpc_code(lambda: infer(channel, e.tokens["infer"], timeout=5))
    print(f"    {what}: {code.name} ({details[:120]})")
    expect(code == grpc.StatusCode.UNAVAILABLE, f"{what}: expected UNAVAILABLE, got {code.name}: {details[:300]}")


# ---- cases on the TLS server (TLS + mTLS + tokens + reflection + health port) ---------------------------

def case_plaintext_client_against_tls_port_fails(e):
    transport_refused(e, plain_channel(e.tls.port), "plaintext client on the TLS port")


def case_tls_client_with_right_ca_works(e):
    with tls_ok(e) as ch:
        a = check_output(infer(ch, e.tokens["infer"]))
        b = check_output(infer(ch, e.tokens["infer"]))
        expect(np.array_equal(a, b), "two identical requests answered differently")
        expect(health(ch) == hpb.HealthCheckResponse.SERVING, "health over TLS not SERVING")


def case_tls_client_trusting_wrong_ca_fails(e):
    transport_refused(e, tls_ok(e, root=e.pki.other_ca.pem), "client trusting an unrelated CA")


def case_mtls_without_client_cert_fails(e):
    transport_refused(e, tls_ok(e, client="none"), "no client certificate")


def case_mtls_client_cert_from_wrong_ca_fails(e):
    transport_refused(e, tls_ok(e, client="other_ca"), "client certificate of an unrelated CA")


def case_mtls_expired_client_cert_fails(e):
    transport_refused(e, tls_ok(e, client="expired"), "expired client certificate")


def case_mtls_valid_client_cert_works(e):
    with tls_ok(e) as ch:
        layers = pbg.AttentionServiceStub(ch).ListLayers(pb.ListLayersRequest(), metadata=bearer(e.tokens["infer"]),
                                                         timeout=10)
        names = sorted(l.config.name for l in layers.layers)
        expect(names == ["golden", "small"], f"layers {names}")
        check_output(infer(ch, e.tokens["infer"]))


def case_tls_health_without_token_serving(e):
    with tls_ok(e) as ch:
        expect(health(ch) == hpb.HealthCheckResponse.SERVING, "not SERVING")
        expect_code(lambda: infer(ch, None), grpc.StatusCode.UNAUTHENTICATED, "Infer without a token over mTLS")


def case_health_port_plaintext(e):
    expect(e.tls.health_port > 0, "no health_port in the ready line")
    with plain_channel(e.tls.health_port) as ch:
        expect(health(ch) == hpb.HealthCheckResponse.SERVING, "health port not SERVING")
        expect_code(lambda: infer(ch, e.tokens["infer"]), grpc.StatusCode.UNIMPLEMENTED, "Infer on the health port")
        expect_reflection_unimplemented(ch, e.tokens["infer"], "reflection (with an infer token) on the health port")


def case_reflection_guarded_by_tokens(e):
    with tls_ok(e) as ch:
        expect_code(lambda: reflection_list(ch, None), grpc.StatusCode.UNAUTHENTICATED, "reflection without a token")
        expect_code(lambda: reflection_list(ch, "tok-not-listed"), grpc.StatusCode.UNAUTHENTICATED,
                    "reflection with an unlisted token")
        expect_code(lambda: reflection_list(ch, e.tokens["admin"]), grpc.StatusCode.PERMISSION_DENIED,
                    "reflection with an admin-only token")
        answer = reflection_list(ch, e.tokens["infer"])
        expect(b"attnserve.v1.AttentionService" in answer, f"services not listed: {answer[:200]!r}")


def attnctl(e, token_file=None, env_token=None, root=None):
    f = e.pki.files
    args = [e.attnctl, "--target", f"localhost:{e.tls.port}", "--tls", "--tls-root-certs", root or f["ca.pem"],
            "--tls-cert", f["client.pem"], "--tls-key", f["client.key"], "--timeout-ms", "5000"]
    if token_file:
        args += ["--token-file", token_file]
    env = {k: v for k, v in os.environ.items() if k not in ("ATTNSERVE_TOKEN", "ATTNSERVE_TARGET")}
    if env_token:
        env["ATTNSERVE_TOKEN"] = env_token
    return subprocess.run(args + ["list"], capture_output=True, text=True, timeout=30, env=env)


def case_attnctl_with_token_file(e):
    tf = write_file(os.path.join(e.tmp, "attnctl_token"), e.tokens["infer"] + "\n")
    r = attnctl(e, token_file=tf)
    expect(r.returncode == 0, f"exit {r.returncode}: {r.stderr.strip()[:300]}")
    expect("golden" in r.stdout and "small" in r.stdout, f"layers not listed: {r.stdout[:300]}")


def case_attnctl_with_env_token(e):
    r = attnctl(e, env_token=e.tokens["infer"])
    expect(r.returncode == 0, f"exit {r.returncode}: {r.stderr.strip()[:300]}")
    expect("golden" in r.stdout and "small" in r.stdout, f"layers not listed: {r.stdout[:300]}")


def case_attnctl_without_token(e):
    r = attnctl(e)
    print(f"    attnctl list without a token: exit {r.returncode}, stderr {r.stderr.strip()[:160]!r}")
    expect(r.returncode != 0, "exit 0 without a token")
    expect("UNAUTHENTICATED" in r.stderr, f"stderr lacks UNAUTHENTICATED: {r.stderr.strip()[:300]}")


def attnbench(e, token_file, stream):
    """attnbench for a second on the plain server (tokens required); the CSV row's requests and errors."""
    args = [os.path.join(os.path.dirname(e.attnctl), "attnbench"), "--target", f"127.0.0.1:{e.plain.port}",
            "--concurrency", "2", "--duration", "1", "--warmup", "0", "--seq", "8", "--csv"]
    if token_file:
        args += ["--token-file", token_file]
    if stream:
        args.append("--stream")
    env = {k: v for k, v in os.environ.items() if k != "ATTNSERVE_TOKEN"}
    return subprocess.run(args, capture_output=True, text=True, timeout=60, env=env)


def case_attnbench_sends_its_token_unary_and_stream(e):
    tf = write_file(os.path.join(e.tmp, "attnbench_token"), e.tokens["infer"] + "\n")
    for stream in (False, True):
        what = "InferStream" if stream else "Infer"
        r = attnbench(e, tf, stream)
        expect(r.returncode == 0, f"attnbench {what} exit {r.returncode}: {r.stderr.strip()[:300]}")
        row = r.stdout.strip().splitlines()[-1].split(",")
        requests, errors = int(row[5]), int(row[7])
        print(f"    attnbench {what} with --token-file: {requests} requests, {errors} errors")
        expect(requests > 0 and errors == 0, f"{what} with a token: {requests} requests, {errors} errors")
    r = attnbench(e, None, stream=True)  # refused at its first call, the layer lookup
    expect(r.returncode != 0 and "UNAUTHENTICATED" in r.stderr,
           f"attnbench without a token: exit {r.returncode}, {r.stderr.strip()[:300]}")


def case_session_proxy_over_tls(e):
    """The session proxy (deploy/session-proxy/nginx.conf) speaking TLS to the TLS + mTLS + tokens server, with the
    directives deploy/k8s/SECURITY.md gives (grpcs, the CA, a client certificate): the client's token passes
    through it, a session opens and appends; without a token the call is still refused."""
    import session_proxy_test as spt  # noqa: E402  (its nginx harness)
    f = e.pki.files
    upstream_tls = (f"      grpc_ssl_trusted_certificate {f['ca.pem']};\n      grpc_ssl_verify on;\n"
                    "      grpc_ssl_name localhost;\n"
                    f"      grpc_ssl_certificate {f['client.pem']};\n      grpc_ssl_certificate_key {f['client.key']};\n")
    tmp = tempfile.mkdtemp(dir=e.tmp, prefix="proxy_")
    nginx, port = spt.start_nginx(tmp, [e.tls.port], upstream_tls=upstream_tls)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = spbg.SessionServiceStub(ch)
            route = ((spt.HEADER, "tls-s1"),)
            md = tuple(bearer(e.tokens["infer"])) + route
            stub.CreateSession(spb.CreateSessionRequest(session_id="tls-s1", layers=["small"]), metadata=md,
                               timeout=10)
            q = np.random.default_rng(4).standard_normal((2, 64), dtype=np.float32)
            r = spb.AppendRequest(session_id="tls-s1", layer="small")
            r.query.shape.extend(q.shape)
            r.query.dtype = pb.FLOAT32
            r.query.raw_data = q.tobytes()
            answer = stub.Append(r, metadata=md, timeout=10)
            expect(list(answer.output.shape) == [2, 64], f"append through the proxy: {answer.output.shape}")
            expect_code(lambda: stub.GetSession(spb.GetSessionRequest(session_id="tls-s1"), metadata=route,
                                                timeout=10), grpc.StatusCode.UNAUTHENTICATED,
                        "GetSession through the proxy without a token")
            stub.CloseSession(spb.CloseSessionRequest(session_id="tls-s1"), metadata=md, timeout=10)
    finally:
        stop_process(nginx, 10)
    print("    a session opened and appended through nginx over TLS with a client certificate")


def case_tls_rotation_while_serving(e):
    """The server's cert/key files replaced by a pair of the unrelated CA: new connections must verify with
    that CA (and no longer with the old one) within 5 s, with the server running throughout."""
    f = e.pki.files
    pid = e.tls.proc.pid
    old = tls_ok(e)  # a connection made before the rotation
    check_output(infer(old, e.tokens["infer"]))
    write_file(f["server.key"] + ".new", e.pki.server2[1], atomic=False)
    write_file(f["server.pem"] + ".new", e.pki.server2[0], atomic=False)
    os.replace(f["server.key"] + ".new", f["server.key"])
    os.replace(f["server.pem"] + ".new", f["server.pem"])

    def new_ca_works():
        with tls_ok(e, root=e.pki.other_ca.pem) as ch:
            return rpc_code(lambda: infer(ch, e.tokens["infer"], timeout=3))[0] == grpc.StatusCode.OK

    ok, took = eventually(new_ca_works, ROTATION_WAIT, 0.2)
    expect(e.tls.alive() and e.tls.proc.pid == pid, "the server exited during the rotation")
    expect(ok, f"new connections do not verify with the new CA {ROTATION_WAIT:.0f} s after the rotation")
    with tls_ok(e) as ch:
        code, details = rpc_code(lambda: infer(ch, e.tokens["infer"], timeout=5))
    print(f"    rotated after {took:.1f} s; old CA now: {code.name}; "
          f"connection from before the rotation: {rpc_code(lambda: infer(old, e.tokens['infer'], timeout=5))[0].name}")
    old.close()
    expect(code == grpc.StatusCode.UNAVAILABLE, f"the old CA still verifies: {code.name} {details[:200]}")
    r = attnctl(e, env_token=e.tokens["infer"], root=os.path.join(e.tmp, "other_ca.pem"))
    expect(r.returncode == 0, f"attnctl with the new CA: exit {r.returncode}: {r.stderr.strip()[:300]}")
    expect(e.tls.alive() and e.tls.proc.pid == pid, "the server exited after the rotation")


# ---- cases on the plaintext server (tokens + metrics auth + --disable-reflection) ------------------------

def case_no_token_unauthenticated(e):
    with plain_channel(e.plain.port) as ch:
        stub = pbg.AttentionServiceStub(ch)
        details = expect_code(lambda: stub.Infer(infer_request(), timeout=10), grpc.StatusCode.UNAUTHENTICATED,
                              "Infer without a token")
        expect_code(lambda: stub.ListLayers(pb.ListLayersRequest(), timeout=10), grpc.StatusCode.UNAUTHENTICATED,
                    "ListLayers without a token")
        expect_code(lambda: stub.GetLayer(pb.GetLayerRequest(name="small"), timeout=10),
                    grpc.StatusCode.UNAUTHENTICATED, "GetLayer without a token")
        print(f"    message: {details[:160]}")


def case_bad_token_unauthenticated(e):
    with plain_channel(e.plain.port) as ch:
        stub = pbg.AttentionServiceStub(ch)
        for md, what in ((bearer(e.tokens["never"]), "an unlisted token"),
                         ((("authorization", "Basic " + e.tokens["infer"]),), "a listed token as Basic"),
                         ((("authorization", "Bearer"),), "an empty Bearer"),
                         ((("authorization", f"Bearer {e.tokens['infer']}x"),), "a listed token plus a byte"),
                         ((("authorization", "Bearer " + sha256_hex(e.tokens["infer"])),), "the hash as the token")):
            expect_code(lambda: stub.Infer(infer_request(), metadata=md, timeout=10),
                        grpc.StatusCode.UNAUTHENTICATED, f"Infer with {what}")


def case_admin_only_token_on_infer_permission_denied(e):
    with plain_channel(e.plain.port) as ch:
        stub = pbg.AttentionServiceStub(ch)
        md = bearer(e.tokens["admin"])
        expect_code(lambda: stub.Infer(infer_request(), metadata=md, timeout=10), grpc.StatusCode.PERMISSION_DENIED,
                    "Infer with an admin-only token")
        expect_code(lambda: list(stub.InferStream(iter([infer_request()]), metadata=md, timeout=10)),
                    grpc.StatusCode.PERMISSION_DENIED, "InferStream with an admin-only token")
        expect_code(lambda: stub.ListLayers(pb.ListLayersRequest(), metadata=md, timeout=10),
                    grpc.StatusCode.PERMISSION_DENIED, "ListLayers with an admin-only token")


def case_infer_token_works_for_infer_and_stream(e):
    with plain_channel(e.plain.port) as ch:
        stub = pbg.AttentionServiceStub(ch)
        for token in ("infer", "both"):
            md = bearer(e.tokens[token])
            a = check_output(stub.Infer(infer_request(), metadata=md, timeout=10))
            answers = list(stub.InferStream(iter([infer_request(rid="s1"), infer_request(rid="s2")]), metadata=md,
                                            timeout=10))
            expect(sorted(r.id for r in answers) == ["s1", "s2"], f"stream answered {[r.id for r in answers]}")
            for r in answers:
                expect(not r.HasField("error"), f"stream request {r.id} failed: {r.error}")
                # The stream's two requests may share a batch, and oneDNN's gemm rounds an M=16 projection
                # differently from an M=8 one (1.5e-7 measured on an AVX2 machine): equal within f32 rounding.
                got = check_output(r)
                expect(np.allclose(got, a, rtol=1e-5, atol=1e-6),
                       f"the stream's answer differs from Infer's (max abs diff {np.abs(got - a).max():.3g})")
        expect_code(lambda: list(stub.InferStream(iter([infer_request(rid="x")]), timeout=10)),
                    grpc.StatusCode.UNAUTHENTICATED, "InferStream without a token")
        # The scheme is case-insensitive.
        check_output(stub.Infer(infer_request(), metadata=(("authorization", "bearer " + e.tokens["infer"]),),
                                timeout=10))


def case_sessions_are_their_openers(e):
    """A session opened with one infer token is refused to another (PERMISSION_DENIED); an admin token may use it;
    ListSessions needs admin."""
    def append(stub, token, sid="sec-s1"):
        q = np.random.default_rng(3).standard_normal((2, 64), dtype=np.float32)
        r = spb.AppendRequest(session_id=sid, layer="small")
        r.query.shape.extend(q.shape)
        r.query.dtype = pb.FLOAT32
        r.query.raw_data = q.tobytes()
        return stub.Append(r, metadata=bearer(e.tokens[token]), timeout=10)

    with plain_channel(e.plain.port) as ch:
        stub = spbg.SessionServiceStub(ch)
        expect_code(lambda: stub.CreateSession(spb.CreateSessionRequest(session_id="sec-s1", layers=["small"]),
                                               timeout=10), grpc.StatusCode.UNAUTHENTICATED, "CreateSession without a token")
        stub.CreateSession(spb.CreateSessionRequest(session_id="sec-s1", layers=["small"]),
                           metadata=bearer(e.tokens["owner"]), timeout=10)
        other = bearer(e.tokens["other"])
        for what, call in (("Append", lambda: append(stub, "other")),
                           ("GetSession", lambda: stub.GetSession(spb.GetSessionRequest(session_id="sec-s1"),
                                                                  metadata=other, timeout=10)),
                           ("ForkSession", lambda: stub.ForkSession(
                               spb.ForkSessionRequest(session_id="sec-s1", new_session_id="sec-s2"), metadata=other,
                               timeout=10)),
                           ("CloseSession", lambda: stub.CloseSession(spb.CloseSessionRequest(session_id="sec-s1"),
                                                                      metadata=other, timeout=10))):
            code, details = rpc_code(call)
            expect(code == grpc.StatusCode.PERMISSION_DENIED and "was opened with another token" in details,
                   f"{what} with another infer token: {code.name} {details[:200]}")
        answer = append(stub, "owner")
        expect(list(answer.output.shape) == [2, 64], f"the opener's append: {answer.output.shape}")
        got = stub.GetSession(spb.GetSessionRequest(session_id="sec-s1"), metadata=bearer(e.tokens["both"]), timeout=10)
        expect(got.layers[0].tokens == 2, f"the admin token's GetSession: {got}")
        expect_code(lambda: stub.ListSessions(spb.ListSessionsRequest(), metadata=bearer(e.tokens["owner"]),
                                              timeout=10), grpc.StatusCode.PERMISSION_DENIED,
                    "ListSessions with an infer token")
        listed = stub.ListSessions(spb.ListSessionsRequest(), metadata=bearer(e.tokens["both"]), timeout=10)
        expect("sec-s1" in [s.session_id for s in listed.sessions], f"ListSessions: {listed}")
        stub.CloseSession(spb.CloseSessionRequest(session_id="sec-s1"), metadata=bearer(e.tokens["owner"]), timeout=10)


def case_health_without_token_serving(e):
    with plain_channel(e.plain.port) as ch:
        expect(health(ch) == hpb.HealthCheckResponse.SERVING, "not SERVING")


def case_weights_path_only_for_admin(e):
    _, path = golden_layer()
    with plain_channel(e.plain.port) as ch:
        stub = pbg.AttentionServiceStub(ch)
        seen = {}
        for token in ("infer", "both"):
            md = bearer(e.tokens[token])
            listed = {l.config.name: l for l in stub.ListLayers(pb.ListLayersRequest(), metadata=md,
                                                                  timeout=10).layers}
            got = stub.GetLayer(pb.GetLayerRequest(name="golden"), metadata=md, timeout=10)
            expect("golden" in listed, f"golden not listed: {sorted(listed)}")
            expect(listed["golden"].ready and got.ready, "golden not ready")
            seen[token] = (listed["golden"].config.weights_path, got.config.weights_path)
        print(f"    weights_path (ListLayers, GetLayer): infer token {seen['infer']}, infer+admin token "
              f"{seen['both']}")
        expect(seen["infer"] == ("", ""), f"weights_path shown to an infer-only token: {seen['infer']}")
        expect(seen["both"] == (path, path), f"weights_path for an admin token: {seen['both']}, want {path}")


def token_works(e, token):
    with plain_channel(e.plain.port) as ch:
        return rpc_code(lambda: infer(ch, token, timeout=5))[0]


def case_token_file_reload_add(e):
    line = f"sha256:{sha256_hex(e.tokens['new'])} infer"
    expect(token_works(e, e.tokens["new"]) == grpc.StatusCode.UNAUTHENTICATED, "the new token works before it is listed")
    with open(e.plain_token_file, "a") as f:  # appended in place, as an editor or `echo >>` does
        f.write(line + "\n")
    e.plain_token_lines.append(line)
    ok, took = eventually(lambda: token_works(e, e.tokens["new"]) == grpc.StatusCode.OK, RELOAD_WAIT)
    print(f"    appended token accepted after {took:.1f} s")
    expect(ok, f"the appended token is not accepted {RELOAD_WAIT:.0f} s later")
    expect(token_works(e, e.tokens["infer"]) == grpc.StatusCode.OK, "the old token stopped working")


def case_token_file_reload_remove(e):
    e.plain_token_lines = [l for l in e.plain_token_lines if sha256_hex(e.tokens["infer"]) not in l]
    write_file(e.plain_token_file, "\n".join(e.plain_token_lines) + "\n")
    ok, took = eventually(lambda: token_works(e, e.tokens["infer"]) == grpc.StatusCode.UNAUTHENTICATED, RELOAD_WAIT)
    print(f"    removed token refused after {took:.1f} s")
    expect(ok, f"the removed token still works {RELOAD_WAIT:.0f} s later")
    expect(token_works(e, e.tokens["new"]) == grpc.StatusCode.OK, "the remaining token stopped working")


def case_token_file_garbage_keeps_old_tokens(e):
    log_before = len(e.plain.log_text())
    write_file(e.plain_token_file, "this is not a token file\nsha256:xyz infer\n")
    time.sleep(2.5)  # past the ~1 s reload
    logged = e.plain.log_text()[log_before:]
    print(f"    server log after the broken file: {logged.strip()[-200:]!r}")
    expect(token_works(e, e.tokens["new"]) == grpc.StatusCode.OK, "the previous token no longer works")
    expect(token_works(e, e.tokens["both"]) == grpc.StatusCode.OK, "the previous infer,admin token no longer works")
    expect(token_works(e, e.tokens["infer"]) == grpc.StatusCode.UNAUTHENTICATED, "a removed token works again")
    expect(re.search(r"\[(error|err)\]", logged, re.I) or "error" in logged.lower(), "no error logged")
    # A valid file again is taken up.
    write_file(e.plain_token_file, "\n".join(e.plain_token_lines + [f"sha256:{sha256_hex(e.tokens['infer'])} infer"])
               + "\n")
    ok, _ = eventually(lambda: token_works(e, e.tokens["infer"]) == grpc.StatusCode.OK, RELOAD_WAIT)
    expect(ok, "a valid file written after the broken one was not taken up")


def case_metrics_basic_auth(e):
    user, password = e.metrics_user
    none, _ = e.plain.metrics()
    wrong, _ = e.plain.metrics((user, password + "x"))
    other_user, _ = e.plain.metrics(("nobody", password))
    right, body = e.plain.metrics((user, password))
    print(f"    /metrics: no auth {none}, wrong password {wrong}, wrong user {other_user}, right {right}")
    expect((none, wrong, other_user, right) == (401, 401, 401, 200), "unexpected statuses")
    expect("attnserve_" in body, "no attnserve_ metrics in the answer")


def case_metrics_auth_reload(e):
    old = e.metrics_user
    new = ("scraper", "pw2-" + base64.urlsafe_b64encode(os.urandom(12)).decode())
    write_file(e.metrics_auth_file, f"{new[0]} sha256:{sha256_hex(new[1])}\n")
    ok, took = eventually(lambda: e.plain.metrics(new)[0] == 200, RELOAD_WAIT)
    print(f"    new metrics user accepted after {took:.1f} s")
    expect(ok, f"the new user is not accepted {RELOAD_WAIT:.0f} s later")
    expect(e.plain.metrics(old)[0] == 401, "the removed user is still accepted")
    expect(e.plain.metrics()[0] == 401, "no auth accepted after the reload")
    e.metrics_user = new


def case_disable_reflection(e):
    with plain_channel(e.plain.port) as ch:
        code, _ = rpc_code(lambda: reflection_list(ch, None))
        print(f"    reflection without a token on --disable-reflection: {code.name}")
        expect(code in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNAUTHENTICATED), f"got {code.name}")
        expect_reflection_unimplemented(ch, e.tokens["both"], "reflection with a token on --disable-reflection")


CASES = [
    # tls server
    case_plaintext_client_against_tls_port_fails, case_tls_client_with_right_ca_works,
    case_tls_client_trusting_wrong_ca_fails, case_mtls_without_client_cert_fails,
    case_mtls_client_cert_from_wrong_ca_fails, case_mtls_expired_client_cert_fails,
    case_mtls_valid_client_cert_works, case_tls_health_without_token_serving, case_health_port_plaintext,
    case_reflection_guarded_by_tokens, case_attnctl_with_token_file, case_attnctl_with_env_token,
    case_attnctl_without_token, case_session_proxy_over_tls, case_tls_rotation_while_serving,
    # plain server
    case_no_token_unauthenticated, case_bad_token_unauthenticated, case_admin_only_token_on_infer_permission_denied,
    case_infer_token_works_for_infer_and_stream, case_health_without_token_serving, case_weights_path_only_for_admin,
    case_token_file_reload_add, case_token_file_reload_remove, case_token_file_garbage_keeps_old_tokens,
    case_metrics_basic_auth, case_metrics_auth_reload, case_disable_reflection,
    case_attnbench_sends_its_token_unary_and_stream, case_sessions_are_their_openers,
]


def main():
    binary = os.path.abspath(sys.argv[1])
    rest = sys.argv[2:]
    attnctl_path = os.path.join(os.path.dirname(os.path.dirname(binary)), "tools", "attnctl")
    if rest and os.path.sep in rest[0]:
        attnctl_path = os.path.abspath(rest.pop(0))
    only = rest  # optional: run only the cases whose names contain one of these
    tmp = tempfile.mkdtemp(prefix="attnserve_security_")
    started = time.time()
    generate_stubs(tmp)
    e = Env()
    passed = failed = 0
    try:
        e = setup(binary, attnctl_path, tmp, e)
        def both_alive(env):
            for srv in (env.tls, env.plain):
                expect(srv.alive(), f"the {srv.name} server died")

        passed, failed = run_cases(CASES, e, only, both_alive)
        t = time.time()
        codes = {s.name: s.stop() for s in (e.tls, e.plain)}
        if all(c == 0 for c in codes.values()):
            print(f"PASS sigterm_exits_0 ({time.time() - t:.1f} s)", flush=True)
            passed += 1
        else:
            print(f"FAIL sigterm_exits_0 ({time.time() - t:.1f} s): exit statuses {codes}", flush=True)
            failed += 1
    finally:
        for s in (getattr(e, "tls", None), getattr(e, "plain", None)):
            if s is not None:
                s.kill()
    if failed:
        for s in (e.tls, e.plain):
            print(f"---- {s.name} server log (tail) ----\n" + s.log_text()[-2000:])
    print(f"{passed} passed, {failed} failed in {time.time() - started:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
