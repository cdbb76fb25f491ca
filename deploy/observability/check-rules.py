#!/usr/bin/env python3
"""Checks deploy/observability/rules.yaml beyond what promtool checks (run by test-rules.sh).

  check-rules.py [--rules F] [--prometheusrule F] [--servicemonitor F] [--docs F] [--metrics-source F ...]
                 [--tests DIR]

- The PrometheusRule of deploy/k8s/components/prometheusrule holds exactly rules.yaml's groups (parsed, so
  comments and layout may differ), with the ServiceMonitor's labels.
- Every metric a rule reads is one the server registers (server/observability/metrics.cc, and
  server/api/call_counts.cc for attnserve_grpc_calls_total; histograms with their _bucket,
  _count and _sum series), every label value it selects on is one the server writes (code: the canonical
  status names; state, reason, result: literals of metrics.cc; le: a latency bucket bound as /metrics writes
  it), and every recording rule it reads is defined earlier in its own group (a group's rules run in order;
  groups run independently, so a rule reading another group's result would see it one evaluation late).
- Every alert has labels.severity (critical or warning), a summary, a description naming a metric it reads,
  and a runbook_url docs/operations.md#ANCHOR where ANCHOR is a heading of docs/operations.md.
- The latency SLO's threshold is the same bucket in every slow_ratio rule and the one its alerts name.
- Every alert has a promtool test in tests/ where it must fire and one where it must not.
Exit 1 naming every problem.
"""
import argparse
import glob
import os
import re
import sys

import yaml

# absl::StatusCodeToString's names: the `code` label of attnserve_requests_total.
STATUS_CODES = {
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED",
    "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
}
# metrics.cc's LatencyBuckets() as prometheus-cpp writes them in /metrics (1-2-5 steps, 50 us to 10 s).
LATENCY_BUCKETS = ["5e-05", "0.0001", "0.0002", "0.0005", "0.001", "0.002", "0.005", "0.01", "0.02", "0.05",
                   "0.1", "0.2", "0.5", "1", "2", "5", "10"]
# Prometheus's own series that rules may read.
PROMETHEUS_SERIES = {"up"}
PROMQL_WORDS = {
    "sum", "by", "without", "rate", "increase", "histogram_quantile", "or", "and", "unless", "on", "ignoring",
    "group_left", "group_right", "avg_over_time", "max_over_time", "min_over_time", "bool", "count", "max", "min",
    "avg", "round", "vector", "absent", "e", "inf", "nan",
}


def load(path):
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def registered_metrics(sources):
    """Names the sources (metrics.cc, call_counts.cc) register, and which of them are histograms."""
    text = "\n".join(open(source, encoding="utf-8").read() for source in sources)
    names = set(re.findall(r'"(attnserve_[a-z0-9_]+)"', text))
    histograms = set(re.findall(r'Histogram\(\s*r,\s*"(attnserve_[a-z0-9_]+)"', text))
    histograms |= set(re.findall(r'BuildHistogram\(\)\s*\.Name\("(attnserve_[a-z0-9_]+)"\)', text))
    literals = set(re.findall(r'"([a-z_]+)"', text))
    return names, histograms, literals


def series_names(names, histograms):
    out = set(names) | PROMETHEUS_SERIES
    for h in histograms:
        out |= {h + "_bucket", h + "_count", h + "_sum"}
    return out


def strip_strings(expr):
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)


def identifiers(expr):
    """Metric and rule names an expression reads (not functions, keywords or label names)."""
    bare = strip_strings(expr)
    bare = re.sub(r"(?<![\w:.])\d+(?:\.\d+)?(?:[eE][+-]?\d+)?", "", bare)  # numbers (1e9)
    bare = re.sub(r"\{[^}]*\}", "", bare)                      # matchers
    bare = re.sub(r"\[[^\]]*\]", "", bare)                     # ranges
    bare = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", bare)
    out = []
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", bare):
        word = m.group(0)
        following = bare[m.end():].lstrip()
        if word.lower() in PROMQL_WORDS or following.startswith("("):
            continue
        out.append(word)
    return out


def matchers(expr):
    for block in re.findall(r"\{([^}]*)\}", expr):
        for name, op, value in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"', block):
            yield name, op, value


def github_anchor(heading):
    slug = heading.strip().lower()
    slug = re.sub(r"[^\w\- ]", "", slug)
    return slug.replace(" ", "-")


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.normpath(os.path.join(here, "..", ".."))
    ap = argparse.ArgumentParser()
    ap.add_argument("--rules", default=os.path.join(here, "rules.yaml"))
    ap.add_argument("--prometheusrule", default=os.path.join(root, "deploy/k8s/components/prometheusrule/prometheusrule.yaml"))
    ap.add_argument("--servicemonitor", default=os.path.join(root, "deploy/k8s/components/servicemonitor/servicemonitor.yaml"))
    ap.add_argument("--docs", default=os.path.join(root, "docs/operations.md"))
    ap.add_argument("--metrics-source", nargs="+", default=[os.path.join(root, "server/observability/metrics.cc"),
                                                            os.path.join(root, "server/api/call_counts.cc")])
    ap.add_argument("--tests", default=os.path.join(here, "tests"))
    args = ap.parse_args()

    problems = []
    rules = load(args.rules)
    groups = rules.get("groups") or []

    # 1. The PrometheusRule holds the same groups.
    pr = load(args.prometheusrule)
    if pr.get("apiVersion") != "monitoring.coreos.com/v1" or pr.get("kind") != "PrometheusRule":
        problems.append(f"{args.prometheusrule}: not a monitoring.coreos.com/v1 PrometheusRule")
    if (pr.get("spec") or {}).get("groups") != groups:
        pr_groups = (pr.get("spec") or {}).get("groups") or []
        detail = "a different number of groups" if len(pr_groups) != len(groups) else ""
        for a, b in zip(groups, pr_groups):
            if a != b:
                rules_a, rules_b = a.get("rules") or [], b.get("rules") or []
                which = next((ra.get("alert") or ra.get("record") for ra, rb in zip(rules_a, rules_b) if ra != rb),
                             "its rule list")
                detail = f"group {a.get('name')}, rule {which}"
                break
        problems.append(f"{args.prometheusrule}: spec.groups differ from {args.rules} ({detail}); "
                        "regenerate with deploy/observability/test-rules.sh --update")
    sm = load(args.servicemonitor)
    if (pr.get("metadata") or {}).get("labels") != (sm.get("metadata") or {}).get("labels"):
        problems.append(f"{args.prometheusrule}: metadata.labels differ from the ServiceMonitor's")

    # 2. Metrics, label values and rule references.
    names, histograms, literals = registered_metrics(args.metrics_source)
    known_series = series_names(names, histograms)
    recorded_anywhere = {r["record"] for g in groups for r in g.get("rules") or [] if "record" in r}
    group_names = [g.get("name") for g in groups]
    if len(set(group_names)) != len(group_names):
        problems.append("group names are not unique")
    for g in groups:
        defined = set()
        for r in g.get("rules") or []:
            what = r.get("record") or r.get("alert")
            expr = str(r.get("expr", ""))
            for ident in identifiers(expr):
                if ":" in ident:
                    if ident not in recorded_anywhere:
                        problems.append(f"{what}: reads {ident}, which no rule records")
                    elif ident not in defined:
                        problems.append(f"{what}: reads {ident}, which is not recorded before it in group {g['name']}")
                elif ident not in known_series:
                    problems.append(f"{what}: reads {ident}, which metrics.cc does not register")
            for label, op, value in matchers(expr):
                if label == "code":
                    bad = [c for c in value.split("|") if c not in STATUS_CODES]
                    if bad:
                        problems.append(f"{what}: code {'|'.join(bad)} is not a canonical status code name")
                elif label in ("state", "reason", "result") and value not in literals:
                    problems.append(f'{what}: {label}="{value}" is not a value metrics.cc writes')
                elif label == "le" and value not in LATENCY_BUCKETS:
                    problems.append(f'{what}: le="{value}" is not a latency bucket bound ({" ".join(LATENCY_BUCKETS)})')
            if "record" in r:
                defined.add(r["record"])

    # 3. Alerts: severity, annotations, runbook anchors.
    docs_text = open(args.docs, encoding="utf-8").read() if os.path.exists(args.docs) else ""
    if not docs_text:
        problems.append(f"{args.docs}: missing")
    anchors = {github_anchor(m) for m in re.findall(r"^#+\s+(.*)$", docs_text, flags=re.M)}
    alerts = [r for g in groups for r in g.get("rules") or [] if "alert" in r]
    for a in alerts:
        name = a["alert"]
        if (a.get("labels") or {}).get("severity") not in ("critical", "warning"):
            problems.append(f"{name}: labels.severity must be critical or warning")
        ann = a.get("annotations") or {}
        for key in ("summary", "description", "runbook_url"):
            if not ann.get(key):
                problems.append(f"{name}: no annotations.{key}")
        description = ann.get("description", "")
        if not any(re.search(rf"\b{re.escape(n)}\b", description) for n in names | PROMETHEUS_SERIES):
            problems.append(f"{name}: the description names no metric")
        url = ann.get("runbook_url", "")
        m = re.fullmatch(r"docs/operations\.md#([\w-]+)", url)
        if not m:
            problems.append(f"{name}: runbook_url {url!r} is not docs/operations.md#ANCHOR")
        elif m.group(1) not in anchors:
            problems.append(f"{name}: runbook_url anchor #{m.group(1)} is no heading of {args.docs}")

    # 4. One latency threshold.
    slo_rules = [r for g in groups for r in g.get("rules") or [] if ":slow_ratio_rate" in r.get("record", "")]
    les = {value for r in slo_rules for label, _, value in matchers(str(r["expr"])) if label == "le"}
    if len(slo_rules) != 4 or len(les) != 1:
        problems.append(f"the four slow_ratio_rate rules must select one le bucket (found {len(slo_rules)} rules, "
                        f"le {sorted(les)})")
    else:
        le = les.pop()
        seconds = float(le)
        shown = f"{seconds * 1000:g} ms" if seconds < 1 else f"{seconds:g} s"
        for a in alerts:
            if a["alert"] != "AttnserveLatencySLOBurn":
                continue
            text = " ".join(str(v) for v in (a.get("annotations") or {}).values())
            if f'le="{le}"' not in text or shown not in text:
                problems.append(f'AttnserveLatencySLOBurn ({a["labels"].get("burn")}): its annotations must name '
                                f'le="{le}" and "{shown}", the threshold of the slow_ratio rules')

    # 5. Each alert fires in some test and stays silent in another.
    fires, silent = set(), set()
    test_files = sorted(glob.glob(os.path.join(args.tests, "*.yaml")))
    if not test_files:
        problems.append(f"{args.tests}: no tests")
    for f in test_files:
        for t in load(f).get("tests") or []:
            for case in t.get("alert_rule_test") or []:
                (fires if case.get("exp_alerts") else silent).add(case.get("alertname"))
    for name in sorted({a["alert"] for a in alerts}):
        if name not in fires:
            problems.append(f"{name}: no test where it must fire")
        if name not in silent:
            problems.append(f"{name}: no test where it must not fire")

    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"{len(groups)} groups, {len(recorded_anywhere)} recording rules, {len(alerts)} alert rules: "
          "PrometheusRule identical, metrics and label values real, runbook anchors present, "
          "every alert tested firing and silent")
    return 0


if __name__ == "__main__":
    sys.exit(main())
