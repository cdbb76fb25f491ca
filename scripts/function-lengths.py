#!/usr/bin/python3
"""Lists C++ function bodies longer than a limit (default 60 lines), for the style rule that functions fit on
a screen.

    scripts/function-lengths.py [--max 60] DIR...     exit 1 when any body is longer

A body is a top-level or class-member `{ ... }` whose opening line looks like a function signature (a `)`
before the `{`, not a control statement, initializer or lambda). Lines are counted from the signature's
`{` to its `}`. Heuristic, but it reads the project's own formatting (clang-format, Google style).
"""
import argparse
import pathlib
import re
import sys

CONTROL = re.compile(r"^\s*(if|for|while|switch|catch|do|else|return|case)\b|\[[^\]]*\]\s*\(.*\)\s*(mutable\s*)?(->[^{]*)?\{\s*$|=\s*\[")


def strip(line):
    line = re.sub(r'"(\\.|[^"\\])*"', '""', line)
    line = re.sub(r"'(\\.|[^'\\])*'", "''", line)
    return line.split("//")[0]


def functions(path):
    lines = path.read_text().splitlines()
    depth, start, name, results = 0, None, None, []
    in_comment = False
    signature = ""
    for i, raw in enumerate(lines, 1):
        line = strip(raw)
        if in_comment:
            if "*/" not in line:
                continue
            line, in_comment = line.split("*/", 1)[1], False
        if "/*" in line and "*/" not in line:
            line, in_comment = line.split("/*", 1)[0], True
        for ch in line:
            if ch == "{":
                if start is None and depth <= 2:
                    sig = (signature + " " + line.split("{")[0]).strip()
                    if ")" in sig and not CONTROL.search(line) and not re.search(r"\b(namespace|class|struct|enum|union)\b", sig.split("(")[0]):
                        m = re.search(r"([~\w:]+)\s*\([^()]*", sig)
                        start, name, body_depth = i, (m.group(1) if m else sig[:40]), depth
                depth += 1
            elif ch == "}":
                depth -= 1
                if start is not None and depth == body_depth:
                    results.append((name, start, i - start + 1))
                    start = None
        stripped = line.strip()
        if stripped.endswith((";", "}", "{")) or stripped.startswith("#") or not stripped:
            signature = ""
        else:
            signature = (signature + " " + stripped)[-400:]
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--max", type=int, default=60)
    ap.add_argument("dirs", nargs="+")
    args = ap.parse_args()
    long = []
    for d in args.dirs:
        for path in sorted(pathlib.Path(d).rglob("*")):
            if path.suffix in (".cc", ".h"):
                for name, start, n in functions(path):
                    if n > args.max:
                        long.append(f"{path}:{start}: {name} is {n} lines (max {args.max})")
    print("\n".join(long) if long else f"no function body over {args.max} lines")
    return 1 if long else 0


if __name__ == "__main__":
    sys.exit(main())
