#!/usr/bin/python3
"""The Grafana dashboard (deploy/observability/dashboard.json) without a Grafana: every panel's queries
evaluated over a time range by a Prometheus (/api/v1/query_range), drawn as one PNG grid, one subplot per
panel, titled and grouped as in the dashboard.

    /usr/bin/python3 bench/dashboard_png.py --prometheus http://127.0.0.1:9090 --out dashboard.png \
        [--start UNIX --end UNIX | --last 5m] [--instance REGEX] [--layer REGEX] [--rate-interval 15s]

Debian's python3 and python3-matplotlib. bench/dashboard-run.sh runs a benchmark and calls this on it.
The functions that read the dashboard and substitute its variables as Grafana does are shared with
tests/integration/dashboard_test.py, which evaluates every query against a real Prometheus.
"""

import argparse
import json
import math
import os
import re
import sys
import time
import urllib.parse
import urllib.request

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
DASHBOARD = os.path.join(REPO_ROOT, "deploy", "observability", "dashboard.json")

# ---- the dashboard, read as Grafana reads it ---------------------------------------------------------------


def load_dashboard(path=DASHBOARD):
    with open(path) as f:
        return json.load(f)


def query_panels(dashboard):
    """The panels that query (rows excluded; a collapsed row's panels included), in dashboard order, each
    with its row's title as "row"."""
    out, row = [], ""
    for p in dashboard.get("panels", []):
        if p.get("type") == "row":
            row = p.get("title", "")
            for inner in p.get("panels", []):
                out.append(dict(inner, row=row))
            continue
        out.append(dict(p, row=row))
    return out


def variable_query(variable):
    """A query variable's query text: a string (Grafana 9) or {"query": ...} (Grafana 10)."""
    q = variable.get("query", "")
    return q.get("query", "") if isinstance(q, dict) else q


_VAR = re.compile(r"\$(?:\{(\w+)(?::(\w+))?\}|(\w+))|\[\[(\w+)\]\]")


def substitute(text, values):
    """Grafana's variable interpolation: $name, ${name}, ${name:format} and [[name]] replaced by
    values[name]; a name without a value raises KeyError (an undefined variable)."""
    def one(m):
        name = m.group(1) or m.group(3) or m.group(4)
        if name not in values:
            raise KeyError(f"undefined variable ${name}")
        return values[name]
    return _VAR.sub(one, text)


def regex_value(selected):
    """How Grafana's Prometheus datasource writes the selected values of a multi-value variable into a
    `=~` matcher: each regex-escaped (backslashes doubled for the PromQL string), several as (a|b)."""
    escaped = [re.sub(r"([$^*+?.()|{}\[\]'])", r"\\\\\1", v.replace("\\", "\\" * 4)) for v in selected]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def builtin_values(rate_interval="1m", interval="15s", range_="1h"):
    """Grafana's global variables as a dashboard's queries use them."""
    seconds = parse_duration(range_)
    return {"__rate_interval": rate_interval, "__interval": interval,
            "__interval_ms": str(int(parse_duration(interval) * 1000)), "__range": range_,
            "__range_s": str(int(seconds)), "__range_ms": str(int(seconds * 1000))}


def parse_duration(text):
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)?", text)
    if not m:
        raise ValueError(f"duration {text!r}: expected e.g. 500ms, 15s, 5m, 1h")
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}[m.group(2)]


_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(.*?)\s*,\s*)?(\w+)\s*\)\s*$", re.S)


def label_values_call(query):
    """label_values(selector, label) or label_values(label) -> (selector or None, label)."""
    m = _LABEL_VALUES.match(query)
    if not m:
        raise ValueError(f"not a label_values(...) query: {query!r}")
    return m.group(1) or None, m.group(2)


def legend(fmt, labels):
    if not fmt or fmt == "__auto":
        inner = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()) if k != "__name__")
        return labels.get("__name__", "") + "{" + inner + "}"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt).strip()


# ---- Prometheus's HTTP API ---------------------------------------------------------------------------------


def prometheus_get(base, path, params, timeout=30):
    """GET base+path?params -> the decoded JSON answer (also for an HTTP error, whose body Prometheus fills
    with status "error" and the reason)."""
    url = base.rstrip("/") + path + "?" + urllib.parse.urlencode(params, doseq=True)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            return json.loads(body)
        except ValueError:
            return {"status": "error", "error": f"HTTP {e.code}: {body[:300]!r}"}


# ---- the PNG -----------------------------------------------------------------------------------------------

_UNITS = {  # Grafana unit -> (scale, axis label)
    "s": (1000.0, "ms"), "reqps": (1.0, "requests/s"), "ops": (1.0, "per second"),
    "percentunit": (100.0, "%"), "bytes": (1.0 / (1 << 20), "MiB"), "short": (1.0, ""), "none": (1.0, ""),
}


def render(base, dashboard, out, start, end, values, step=None, title=None, columns=3):
    """Draws every panel of `dashboard` over [start, end] from the Prometheus at `base` into `out` (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    from datetime import datetime

    panels = query_panels(dashboard)
    step = step or max(1.0, (end - start) / 300)
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6.2 * columns, 3.3 * rows), squeeze=False)
    problems = []
    for i, panel in enumerate(panels):
        ax = axes[i // columns][i % columns]
        defaults = panel.get("fieldConfig", {}).get("defaults", {})
        custom = defaults.get("custom", {})
        scale, ylabel = _UNITS.get(defaults.get("unit", "short"), (1.0, defaults.get("unit", "")))
        ylabel = custom.get("axisLabel") or ylabel
        log_scale = custom.get("scaleDistribution", {}).get("type") == "log"
        steps = custom.get("lineInterpolation") == "stepAfter"
        drawn = 0
        for t in panel.get("targets", []):
            try:
                expr = substitute(t["expr"], values)
            except KeyError as e:
                problems.append(f"{panel['title']} {t.get('refId')}: {e.args[0]}")
                continue
            ans = prometheus_get(base, "/api/v1/query_range", {"query": expr, "start": start, "end": end,
                                                               "step": step})
            if ans.get("status") != "success":
                problems.append(f"{panel['title']} {t.get('refId')}: {ans.get('error')}")
                continue
            dashed = t.get("legendFormat", "").startswith("capacity")
            for series in ans["data"]["result"]:
                xs = [datetime.fromtimestamp(float(ts)) for ts, _ in series["values"]]
                ys = [float(v) * scale for _, v in series["values"]]
                if not any(math.isfinite(y) for y in ys):
                    continue
                ax.plot(xs, ys, linewidth=1.2, linestyle="--" if dashed else "-",
                        drawstyle="steps-post" if steps else "default",
                        label=legend(t.get("legendFormat", ""), series["metric"]))
                drawn += 1
        row = panel.get("row", "")
        ax.set_title((row + ": " if row else "") + panel["title"], fontsize=10, loc="left")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
        ax.set_xlim(datetime.fromtimestamp(start), datetime.fromtimestamp(end))
        if drawn:
            if log_scale:  # Grafana's log axis; symlog keeps the zeros a log axis would drop
                ax.set_yscale("symlog", base=custom["scaleDistribution"].get("log", 10), linthresh=1)
            ax.set_ylim(bottom=0)
            ax.legend(fontsize=6, loc="upper left", ncol=2 if drawn > 4 else 1, framealpha=0.6)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
    for j in range(len(panels), rows * columns):
        axes[j // columns][j % columns].axis("off")
    title = title or dashboard.get("title", "dashboard")
    fig.suptitle(title, fontsize=12, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.012 * (title.count("\n") + 2)))
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return problems


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prometheus", default="http://127.0.0.1:9090", help="Prometheus base URL")
    ap.add_argument("--dashboard", default=DASHBOARD)
    ap.add_argument("--out", required=True, help="PNG to write")
    ap.add_argument("--start", type=float, help="range start, unix seconds (default: --last before --end)")
    ap.add_argument("--end", type=float, help="range end, unix seconds (default: now)")
    ap.add_argument("--last", default="15m", help="range length when --start is not given (default 15m)")
    ap.add_argument("--step", type=float, help="seconds between points (default: range / 300, at least 1)")
    ap.add_argument("--instance", default=".*", help="value of $instance (a regex; default all)")
    ap.add_argument("--layer", default=".*", help="value of $layer (a regex; default all)")
    ap.add_argument("--rate-interval", default="15s", help="value of $__rate_interval (default 15s)")
    ap.add_argument("--title", help="figure title, \\n for a new line (default: the dashboard's)")
    args = ap.parse_args()
    end = args.end or time.time()
    start = args.start or end - parse_duration(args.last)
    values = dict(builtin_values(args.rate_interval, args.rate_interval, f"{int(end - start)}s"),
                  datasource="", instance=args.instance, layer=args.layer)
    problems = render(args.prometheus, load_dashboard(args.dashboard), args.out, start, end, values,
                      step=args.step, title=args.title and args.title.replace("\\n", "\n"))
    for p in problems:
        print(f"dashboard_png: {p}", file=sys.stderr)
    print(f"dashboard_png: wrote {args.out} ({int(end - start)} s from {args.prometheus})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
