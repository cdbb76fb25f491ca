#!/usr/bin/python3
"""The Grafana dashboard (deploy/observability/dashboard.json) and the Prometheus rules
(deploy/observability/rules.yaml) against a real attnserve scraped by a real Prometheus.

    /usr/bin/python3 tests/integration/dashboard_test.py path/to/attnserve path/to/attnbench \
        [--dashboard FILE] [--rules FILE] [--prometheus FILE]

Starts the attnserve binary on loopback (two MHA layers, sessions on) and Debian's Prometheus
(/usr/bin/prometheus) scraping its metrics port every second as job "attnserve", with rules.yaml as its rule
file when there is one; drives attnbench for a few seconds: a closed loop on one layer, a session run on the
other, requests past max_sequence_length (INVALID_ARGUMENT), and a few for an unknown layer (NOT_FOUND) from
Python stubs. Then:

  - the dashboard's model: the template variables (datasource, instance, layer), and every panel's
    description, datasource (${datasource}) and selectors (each attnserve_* selector filters
    instance=~"$instance", and layer=~"$layer" when the metric has a layer label);
  - every template variable query through Prometheus's label API: it returns the instance and both layers;
  - every panel's query through /api/v1/query, with the variables substituted as Grafana does (one
    instance and two layers selected, then All): each parses and returns at least one finite sample;
  - every attnserve_* metric the dashboard and the rules name is in /metrics;
  - the rules load and evaluate without error;
  - bench/dashboard_png.py draws the dashboard from the same Prometheus (when python3-matplotlib is there).

Prints one FAIL line per broken check, naming the panel, query or metric; ends with "N passed, M failed" and
exits 1 when any failed.
"""

import argparse
import importlib.util
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import grpc

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import kserve_test as kt  # noqa: E402  (stub generation, the server harness)
from checks import stop_process  # noqa: E402

REPO_ROOT = kt.REPO_ROOT
sys.path.insert(0, os.path.join(REPO_ROOT, "bench"))
import dashboard_png as dash  # noqa: E402  (the dashboard read as Grafana reads it)

RULES = os.path.join(REPO_ROOT, "deploy", "observability", "rules.yaml")
LAYERS = ("small", "decode")  # "small": stateless requests and errors; "decode": a session
CONFIG = (
    'layers { name: "small" embed_dim: 64 num_heads: 4 seed: 1 max_sequence_length: 256 }\n'
    'layers { name: "decode" embed_dim: 64 num_heads: 4 seed: 2 }\n'
    "sessions { kv_cache_bytes: 16777216 }\n"
)
RATE_INTERVAL = "1m"  # what Grafana's $__rate_interval is for a short range; covers the whole run


class Report:
    def __init__(self):
        self.passed = 0
        self.failed = []

    def check(self, ok, what, detail=""):
        if ok:
            self.passed += 1
        else:
            self.failed.append(what)
            print(f"FAIL {what}" + (f": {detail}" if detail else ""), flush=True)
        return ok


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_text(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


class Prometheus:
    """/usr/bin/prometheus on a free loopback port, data in a temporary directory, scraping one target."""

    def __init__(self, binary, tmp, target_port, rules):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        config = os.path.join(tmp, "prometheus.yml")
        with open(config, "w") as f:
            f.write("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n")
            if rules:
                f.write(f"rule_files:\n  - {json.dumps(rules)}\n")
            f.write("scrape_configs:\n  - job_name: attnserve\n    scrape_interval: 1s\n    scrape_timeout: 1s\n"
                    f"    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n")
        self.log_path = os.path.join(tmp, "prometheus.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp}/tsdb",
                                      f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                                     stdout=self.log, stderr=self.log)
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("prometheus exited: " + self.log_text()[-3000:])
            try:
                http_text(self.base + "/-/ready", timeout=2)
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("prometheus not ready in 30 s: " + self.log_text()[-3000:])

    def wait_for_first_scrape(self):
        """Prometheus applies discovered targets every 5 s: the load starts once the target has been scraped."""
        deadline = time.time() + 30
        while time.time() < deadline:
            ans = self.query('up{job="attnserve"} == 1')
            if ans.get("status") == "success" and ans["data"]["result"]:
                return
            time.sleep(0.2)
        raise RuntimeError("prometheus did not scrape attnserve in 30 s: "
                           + json.dumps(self.get("/api/v1/targets"))[:1000])

    def log_text(self):
        return open(self.log_path, errors="replace").read()

    def get(self, path, **params):
        return dash.prometheus_get(self.base, path, params)

    def query(self, expr):
        return self.get("/api/v1/query", query=expr, time=f"{time.time():.3f}")

    def stop(self):
        stop_process(self.proc, 20)
        self.log.close()


# ---- load --------------------------------------------------------------------------------------------------

def drive_load(attnbench, server, report):
    """A closed loop on "small" and a session on "decode" at once, then requests past max_sequence_length
    and for an unknown layer. About 6 s."""
    target = f"127.0.0.1:{server.port}"
    common = [attnbench, "--target", target, "--warmup", "0", "--quiet", "--json", "--timeout-ms", "10000"]
    closed = subprocess.Popen(common + ["--layer", "small", "--seq", "32", "--concurrency", "1,4",
                                        "--duration", "2500ms"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    session = subprocess.Popen(common + ["--layer", "decode", "--sessions", "1", "--context", "64",
                                         "--prefill", "32", "--duration", "4s"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    runs = {"closed loop": closed, "session": session}
    results = {}
    for name, p in runs.items():
        out, err = p.communicate(timeout=60)
        ok = report.check(p.returncode == 0, f"attnbench {name} run", f"exit {p.returncode}: {err.decode()[-500:]}")
        results[name] = json.loads(out) if ok else []
    bad = subprocess.run(common + ["--layer", "small", "--seq", "512", "--concurrency", "1", "--duration", "300ms"],
                         capture_output=True, timeout=60)
    steps = json.loads(bad.stdout) if bad.returncode == 0 else []
    refused = sum(s.get("errors", 0) for s in steps) if steps else 0
    report.check(refused > 0, "attnbench --seq 512 past max_sequence_length 256 is refused",
                 f"exit {bad.returncode}, {bad.stdout.decode()[-300:]} {bad.stderr.decode()[-300:]}")
    not_found = 0
    q = kt.pb.Tensor(shape=[1, 4, 64], dtype=kt.pb.FLOAT32, raw_data=bytes(4 * 4 * 64))
    for _ in range(5):
        try:
            server.v1.Infer(kt.pb.InferRequest(layer="no_such_layer", query=q), timeout=10)
        except grpc.RpcError as e:
            not_found += e.code() == grpc.StatusCode.NOT_FOUND
    report.check(not_found == 5, "Infer of an unknown layer answers NOT_FOUND", f"{not_found} of 5")
    for name, steps in results.items():
        done = sum(s.get("ok", 0) for s in steps)
        report.check(done > 0, f"attnbench {name} run answered requests", json.dumps(steps)[:500])


def requests_total(text):
    return sum(float(v) for v in re.findall(r"^attnserve_requests_total\{[^}]*\} (\S+)$", text, re.M))


def wait_for_scrapes(prom, server, report):
    """Until Prometheus holds the final request count, then two more scrapes."""
    want = requests_total(http_text(f"http://127.0.0.1:{server.metrics_port}/metrics"))
    got = None
    deadline = time.time() + 20
    while time.time() < deadline:
        ans = prom.query("sum(attnserve_requests_total)")
        result = ans.get("data", {}).get("result", []) if ans.get("status") == "success" else []
        got = float(result[0]["value"][1]) if result else None
        if got == want:
            break
        time.sleep(0.25)
    report.check(got == want, "Prometheus scraped the final attnserve_requests_total",
                 f"sum {got}, /metrics {want}; targets: {json.dumps(prom.get('/api/v1/targets'))[:800]}")
    time.sleep(2.5)


# ---- the dashboard's model ---------------------------------------------------------------------------------

SELECTOR = re.compile(r"\b(attnserve_[a-z0-9_]+)\b\s*(\{[^}]*\})?")


def metric_families(metrics_text):
    """/metrics -> {family name: (type, set of label names)}, histograms under their family name."""
    families = {}
    for m in re.finditer(r"^# TYPE (\S+) (\S+)$", metrics_text, re.M):
        families[m.group(1)] = (m.group(2), set())
    for m in re.finditer(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})? ", metrics_text, re.M):
        name = m.group(1)
        family = name if name in families else re.sub(r"_(bucket|sum|count)$", "", name)
        if family in families:
            families[family][1].update(re.findall(r'(\w+)="', m.group(2) or ""))
    return families


def family_of(name, families):
    """The /metrics family a name used in a query belongs to, or None."""
    if name in families:
        return name
    base = re.sub(r"_(bucket|sum|count)$", "", name)
    return base if base != name and families.get(base, ("",))[0] in ("histogram", "summary") else None


def check_model(d, families, report):
    report.check(isinstance(d.get("schemaVersion"), int) and 36 <= d["schemaVersion"] <= 39,
                 "dashboard schemaVersion is 36..39 (Grafana 9 and 10)", str(d.get("schemaVersion")))
    variables = {v.get("name"): v for v in d.get("templating", {}).get("list", [])}
    ds = variables.get("datasource", {})
    report.check(ds.get("type") == "datasource" and ds.get("query") == "prometheus",
                 "variable datasource: type datasource, query prometheus", json.dumps(ds)[:300])
    for name in ("instance", "layer"):
        v = variables.get(name, {})
        report.check(v.get("type") == "query" and v.get("multi") is True and v.get("includeAll") is True
                     and v.get("allValue") == ".*" and v.get("datasource", {}).get("uid") == "${datasource}",
                     f"variable {name}: query on ${{datasource}}, multi, includeAll, allValue .*",
                     json.dumps(v)[:300])
    ids = [p.get("id") for p in d.get("panels", [])]
    report.check(len(ids) == len(set(ids)) and None not in ids, "panel ids are unique", str(ids))
    for p in dash.query_panels(d):
        title = p.get("title", f"panel {p.get('id')}")
        report.check(bool(p.get("description", "").strip()), f"panel '{title}': has a description")
        report.check(p.get("datasource", {}).get("uid") == "${datasource}", f"panel '{title}': datasource",
                     json.dumps(p.get("datasource")))
        g = p.get("gridPos", {})
        report.check(all(k in g for k in "hwxy") and g["x"] + g["w"] <= 24, f"panel '{title}': gridPos", str(g))
        targets = p.get("targets", [])
        report.check(bool(targets), f"panel '{title}': has targets")
        refs = [t.get("refId") for t in targets]
        report.check(len(refs) == len(set(refs)), f"panel '{title}': refIds unique", str(refs))
        for t in targets:
            where = f"panel '{title}' {t.get('refId')}"
            report.check(t.get("datasource", {}).get("uid") == "${datasource}", f"{where}: datasource",
                         json.dumps(t.get("datasource")))
            for m in SELECTOR.finditer(t.get("expr", "")):
                name, sel = m.group(1), m.group(2) or ""
                report.check('instance=~"$instance"' in sel, f"{where}: {name} filters instance=~\"$instance\"",
                             t["expr"])
                family = family_of(name, families)
                if family and "layer" in families[family][1]:
                    report.check('layer=~"$layer"' in sel, f"{where}: {name} filters layer=~\"$layer\"", t["expr"])


# ---- queries through Prometheus ----------------------------------------------------------------------------

def check_variables(d, prom, instance, report):
    """label_values(...) as Grafana runs it: /api/v1/label/<name>/values, match[] = the selector."""
    values = dict(dash.builtin_values(RATE_INTERVAL), datasource="", instance=dash.regex_value([instance]),
                  layer=dash.regex_value(list(LAYERS)))
    want = {"instance": {instance}, "layer": set(LAYERS)}
    for v in d.get("templating", {}).get("list", []):
        if v.get("type") != "query":
            continue
        query = dash.variable_query(v)
        try:
            selector, label = dash.label_values_call(dash.substitute(query, values))
        except (KeyError, ValueError) as e:
            report.check(False, f"variable {v.get('name')}: {query}", str(e))
            continue
        params = {"match[]": selector} if selector else {}
        ans = prom.get(f"/api/v1/label/{label}/values", **params)
        got, expected = set(ans.get("data") or []), want.get(v["name"], set())
        report.check(ans.get("status") == "success" and got and expected <= got, f"variable {v['name']}: {query}",
                     f"values {sorted(got)}, expected {sorted(expected)}; {ans.get('error', '')}")


def check_panel_queries(d, prom, values, setting, report):
    """Each target's expr with `values` substituted: status success, a vector with a finite sample."""
    for p in dash.query_panels(d):
        for t in p.get("targets", []):
            where = f"panel '{p.get('title')}' {t.get('refId')} ({setting})"
            try:
                expr = dash.substitute(t.get("expr", ""), values)
            except KeyError as e:
                report.check(False, where, f"{e}: {t.get('expr')}")
                continue
            ans = prom.query(expr)
            if not report.check(ans.get("status") == "success", f"{where}: parses",
                                f"{ans.get('errorType')}: {ans.get('error')}: {expr}"):
                continue
            result = ans["data"].get("result", [])
            finite = [r for r in result if math.isfinite(float(r["value"][1]))]
            report.check(bool(finite), f"{where}: returns data",
                         f"{len(result)} series, none finite: {expr} -> {json.dumps(result)[:300]}")


# ---- metric names ------------------------------------------------------------------------------------------

def rule_exprs(path):
    """Every expr of a rules file (python3-yaml when present, else the expr: lines)."""
    text = open(path).read()
    try:
        import yaml
    except ImportError:
        return re.findall(r"^\s*-?\s*expr:\s*(.*(?:\n\s{6,}\S.*)*)", text, re.M)
    doc = yaml.safe_load(text) or {}
    return [str(r["expr"]) for g in doc.get("groups", []) for r in g.get("rules", []) if "expr" in r]


def check_metric_names(dashboard_path, rules_path, families, report):
    used = {}
    for name in set(re.findall(r"\battnserve_[a-zA-Z0-9_:]+", open(dashboard_path).read())):
        used.setdefault(name, set()).add("dashboard.json")
    if rules_path:
        for expr in rule_exprs(rules_path):
            for name in re.findall(r"\battnserve_[a-zA-Z0-9_:]+", expr):
                used.setdefault(name, set()).add("rules.yaml")
    names = sorted(n for n in used if ":" not in n)  # with ':': a recording rule's name, made by the rules
    for name in names:
        report.check(family_of(name, families) is not None, f"metric {name} (in {', '.join(sorted(used[name]))}) "
                     "is in /metrics")
    return len(names)


def check_rules(prom, report):
    """Every group of the rule file loaded; after an evaluation each rule's health is ok."""
    deadline = time.time() + 15
    rules = []
    while time.time() < deadline:
        ans = prom.get("/api/v1/rules")
        rules = [r for g in ans.get("data", {}).get("groups", []) for r in g.get("rules", [])]
        if rules and all(r.get("health") != "unknown" for r in rules):
            break
        time.sleep(0.5)
    report.check(bool(rules), "rules.yaml: Prometheus loaded its rules", prom.log_text()[-1000:])
    recorded = 0
    for r in rules:
        report.check(r.get("health") in ("ok", "unknown") and not r.get("lastError"),
                     f"rule {r.get('name')}: evaluates", f"health {r.get('health')}: {r.get('lastError')}")
        if r.get("type") == "recording":
            ans = prom.query(r["name"])
            recorded += bool(ans.get("status") == "success" and ans["data"]["result"])
    print(f"rules: {len(rules)} loaded, {sum(r.get('type') == 'recording' for r in rules)} recording "
          f"({recorded} with data), {sum(r.get('type') == 'alerting' for r in rules)} alerting", flush=True)


def check_png(prom, d, start, tmp, report):
    if importlib.util.find_spec("matplotlib") is None:
        print("SKIP bench/dashboard_png.py: python3-matplotlib is not installed", flush=True)
        return
    out = os.path.join(tmp, "dashboard.png")
    values = dict(dash.builtin_values("5s", "5s"), datasource="", instance=".*", layer=".*")
    problems = dash.render(prom.base, d, out, start, time.time(), values, step=1)
    head = open(out, "rb").read(8) if os.path.exists(out) else b""
    report.check(not problems and head == b"\x89PNG\r\n\x1a\n" and os.path.getsize(out) > 20000,
                 "bench/dashboard_png.py draws every panel", "; ".join(problems))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("attnserve")
    ap.add_argument("attnbench")
    ap.add_argument("--dashboard", default=dash.DASHBOARD)
    ap.add_argument("--rules", default=RULES, help="rule file to load when it exists ('' for none)")
    ap.add_argument("--prometheus", default="/usr/bin/prometheus")
    args = ap.parse_args()
    if not (args.prometheus and os.access(args.prometheus, os.X_OK)):
        print(f"FAIL no Prometheus binary ({args.prometheus!r}): apt-get install prometheus (scripts/install-deps.sh)")
        return 1
    started = time.time()
    report = Report()
    d = dash.load_dashboard(args.dashboard)
    rules = os.path.abspath(args.rules) if args.rules and os.path.exists(args.rules) else ""
    print(f"dashboard {args.dashboard}: {len(dash.query_panels(d))} panels; rules: {rules or 'none'}", flush=True)
    tmp = tempfile.mkdtemp(prefix="attnserve_dashboard_")
    kt.generate_stubs(tmp)
    server = kt.Server(os.path.abspath(args.attnserve), tmp, "dashboard", CONFIG)
    prom = None
    try:
        prom = Prometheus(args.prometheus, tmp, server.metrics_port, rules)
        prom.wait_for_first_scrape()
        load_start = time.time()
        drive_load(os.path.abspath(args.attnbench), server, report)
        wait_for_scrapes(prom, server, report)
        metrics_text = http_text(f"http://127.0.0.1:{server.metrics_port}/metrics")
        families = metric_families(metrics_text)
        check_model(d, families, report)
        instance = f"127.0.0.1:{server.metrics_port}"
        check_variables(d, prom, instance, report)
        builtins = dash.builtin_values(RATE_INTERVAL)
        check_panel_queries(d, prom, dict(builtins, datasource="", instance=dash.regex_value([instance]),
                                          layer=dash.regex_value(list(LAYERS))), "one instance, both layers", report)
        check_panel_queries(d, prom, dict(builtins, datasource="", instance=".*", layer=".*"), "All", report)
        n = check_metric_names(args.dashboard, rules, families, report)
        print(f"metric names checked against /metrics: {n}", flush=True)
        if rules:
            check_rules(prom, report)
        check_png(prom, d, load_start - 2, tmp, report)
        report.check(server.alive(), "the server is still running")
    finally:
        if prom:
            prom.stop()
        server.stop()
        if report.failed:
            print("---- server log (tail) ----\n" + server.log_text()[-1500:])
            if prom:
                print("---- prometheus log (tail) ----\n" + prom.log_text()[-1500:])
    if report.failed:
        print(f"kept {tmp} (server and prometheus logs, tsdb)")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{report.passed} passed, {len(report.failed)} failed in {time.time() - started:.0f} s")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
