#!/usr/bin/env python3
"""Every quoted number of the lessons against the committed result it comes from.

A lesson quotes a number from a committed run by following it with a marker naming the file and
the JSON path of the value:

    the Transformer reaches 5.937<!--n:t0805_full_transformer:metrics.transformer.valid_loss-->

(`topic` resolves to reports/lessons/<topic>/results.json; a topic that starts with `reports/` names
any committed JSON file, e.g. `reports/gpu-runs/x/results.json:metrics.a`; the path is dotted keys,
`[N]` list indexes and `["key"]` for keys holding dots or spaces). The checker reads each
marker, looks the value up, and checks that the number printed before it equals the value to the
printed precision (a trailing %, ×, k or M scales as written: "12.5k" is 12 500, "3.2%" of a
fraction 0.032 — write the marker's path to the value as stored).

    python3 scripts/check_lessons.py            check every marker (CI)
    python3 scripts/check_lessons.py --refresh  rewrite every marked number with the committed value
                                                (same decimals, thousands separators and unit)
    python3 scripts/check_lessons.py --fill     replace «topic:path» and «topic:path|FMT»
                                                placeholders by the value (FMT: a Python format
                                                spec, default .3f) followed by its marker

Exits non-zero naming the lesson, line, marker and both numbers when a number does not match, a
file or a path is missing, or a placeholder is left unfilled.
"""
import json
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
LESSONS = sorted((ROOT / "notebooks-md").glob("*.md")) + [ROOT / "README.md"]
MARKER = re.compile(r"(-?[0-9][0-9,]*(?:\.[0-9]+)?)\s*(%|×|x|k|M|G)?\s*(?:\*\*)?<!--n:([^:>]+):(.+?)-->")
PLACEHOLDER = re.compile(r"«(?:CPU:)?([A-Za-z0-9_./-]+):([^»|]+)(?:\|([^»]+))?»")
# A path: dot-separated keys, [N] list indexes, ["any key"] for keys with dots or spaces.
PATH_PART = re.compile(r'\["([^"]+)"\]|\[(\d+)\]|([^.\[\]]+)')
SCALE = {None: 1.0, "%": 0.01, "×": 1.0, "x": 1.0, "k": 1e3, "M": 1e6, "G": 1e9}


def source(topic):
    if topic.startswith("reports/"):
        return ROOT / topic
    return ROOT / "reports" / "lessons" / topic / "results.json"


def lookup(topic, path, cache={}):
    f = source(topic)
    if f not in cache:
        if not f.exists():
            raise KeyError(f"{f.relative_to(ROOT)} does not exist")
        cache[f] = json.loads(f.read_text())
    value = cache[f]
    for quoted, index, plain in PATH_PART.findall(path):
        part = quoted or plain
        if index and isinstance(value, list) and int(index) < len(value):
            value = value[int(index)]
        elif not index and isinstance(value, dict) and part in value:
            value = value[part]
        else:
            raise KeyError(f"{f.relative_to(ROOT)} has no {path} (stopped at '{part or index}')")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise KeyError(f"{f.relative_to(ROOT)}:{path} is not a number: {value!r}")
    return float(value)


def matches(printed, unit, value):
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    shown = float(printed.replace(",", "")) * SCALE[unit]
    tolerance = 0.5 * 10 ** (-decimals) * SCALE[unit] * (1 + 1e-9)
    return abs(shown - value) <= tolerance


def fill(text, where):
    def repl(m):
        topic, path, fmt = m.group(1), m.group(2), m.group(3) or ".3f"
        try:
            value = lookup(topic, path)
        except (KeyError, ValueError, IndexError) as e:
            print(f"{where}: left {m.group(0)}: {e}")
            return m.group(0)
        unit = ""
        if fmt.endswith("%"):
            return f"{value * 100:{fmt[:-1]}}%<!--n:{topic}:{path}-->"
        return f"{value:{fmt}}{unit}<!--n:{topic}:{path}-->"
    return PLACEHOLDER.sub(repl, text)


def refresh(text, where):
    def repl(m):
        printed, unit, topic, key = m.groups()
        try:
            value = lookup(topic, key) / SCALE[unit]
        except (KeyError, ValueError, IndexError) as e:
            print(f"{where}: kept {printed}: {e}")
            return m.group(0)
        decimals = len(printed.split(".")[1]) if "." in printed else 0
        new = f"{value:,.{decimals}f}" if "," in printed else f"{value:.{decimals}f}"
        return m.group(0).replace(printed, new, 1)
    return MARKER.sub(repl, text)


def check(path):
    problems, count = [], 0
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        for m in PLACEHOLDER.finditer(line):
            problems.append(f"{path.name}:{lineno}: unfilled placeholder {m.group(0)}")
        for m in MARKER.finditer(line):
            count += 1
            printed, unit, topic, key = m.groups()
            try:
                value = lookup(topic, key)
            except (KeyError, ValueError, IndexError) as e:
                problems.append(f"{path.name}:{lineno}: {e}")
                continue
            if not matches(printed, unit, value):
                problems.append(f"{path.name}:{lineno}: prints {printed}{unit or ''} but {topic}:{key} is {value}")
    return problems, count


def main():
    if "--refresh" in sys.argv:
        for p in LESSONS:
            text = p.read_text()
            new = refresh(text, p.name)
            if new != text:
                p.write_text(new)
                print(f"refreshed {p.relative_to(ROOT)}")
    if "--fill" in sys.argv:
        for p in LESSONS:
            text = p.read_text()
            new = fill(text, p.name)
            if new != text:
                p.write_text(new)
                print(f"filled {p.relative_to(ROOT)}")
    problems, total = [], 0
    for p in LESSONS:
        found, n = check(p)
        problems += found
        total += n
    for line in problems:
        print(line)
    print(f"{total} quoted numbers checked, {len(problems)} problems")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
