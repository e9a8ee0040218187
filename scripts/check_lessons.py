#!/usr/bin/env python3
"""Every quoted number of the lessons (and of the README, reports/gpu-performance.md, notes/perf.md and notes/flash-attention.md) against the
committed result it comes from.

A lesson quotes a number from a committed run by following it with a marker naming the file and
the JSON path of the value:

    the Transformer reaches 5.937<!--n:t0805_full_transformer:metrics.transformer.valid_loss-->

(`topic` resolves to reports/lessons/<topic>/results.json; a topic that starts with `reports/` names
any committed JSON file, e.g. `reports/gpu-runs/x/results.json:metrics.a`; the path is dotted keys,
`[N]` list indexes and `["key"]` for keys holding dots or spaces). The checker reads each
marker, looks the value up, and checks that the number printed before it equals the value to the
printed precision (a trailing %, ×, k or M scales as written: "12.5k" is 12 500, "3.2%" of a
fraction 0.032 — write the marker's path to the value as stored). The number may be in e-notation,
`1.2e-4` or `-3.5E+02` (or with the power written out, `2.1 × 10⁻⁵`), whose precision is the
mantissa's: 1.2e-4 matches values within 0.05e-4.
A binary size unit after it, B, KiB, MiB or GiB (with or without a space before it), says the value
is stored in bytes: "2.05 MiB" is 2.05 × 2^20 bytes to ±0.005 × 2^20, "24 KiB" is 24 576 ± 512. A
value stored in MiB already is marked as a plain number, the marker before the unit:
"530<!--n:…--> MiB".

    python3 scripts/check_lessons.py            check every marker (CI)
    python3 scripts/check_lessons.py --refresh  rewrite every marked number with the committed value
                                                (same decimals, thousands separators, unit and
                                                notation: 1.2e-4 stays in e-notation, its exponent
                                                written as before: e-4, e-04, E+02 or × 10⁻⁴)
    python3 scripts/check_lessons.py --fill     replace «topic:path» and «topic:path|FMT»
                                                placeholders by the value (FMT: a Python format
                                                spec, default .3f; .2e gives e-notation; a spec
                                                ending in %, or in " KiB"/"MiB"/… for a value in
                                                bytes, scales and appends the unit) followed by its
                                                marker

Exits non-zero naming the lesson, line, marker and both numbers when a number does not match, a
file or a path is missing, or a placeholder is left unfilled.
"""
import json
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
LESSONS = sorted((ROOT / "notebooks-md").glob("*.md")) + [ROOT / "README.md", ROOT / "reports" / "gpu-performance.md", ROOT / "notes" / "perf.md", ROOT / "notes" / "flash-attention.md"]
# The number: optional sign, digits with thousands separators, decimals, and an optional power of
# ten, in e-notation (1.2e-4, 3.5E+02) or written out (2.1 × 10⁻⁵).
NUMBER = r"-?[0-9][0-9,]*(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+|\s?×\s?10[⁻⁺]?[⁰¹²³⁴⁵⁶⁷⁸⁹]+)?"
MARKER = re.compile(rf"({NUMBER})\s*(KiB|MiB|GiB|B|%|×|x|k|M|G)?\s*(?:\*\*)?<!--n:([^:>]+):(.+?)-->")
PLACEHOLDER = re.compile(r"«(?:CPU:)?([A-Za-z0-9_./-]+):([^»|]+)(?:\|([^»]+))?»")
# A path: dot-separated keys, [N] list indexes, ["any key"] for keys with dots or spaces.
PATH_PART = re.compile(r'\["([^"]+)"\]|\[(\d+)\]|([^.\[\]]+)')
SCALE = {None: 1.0, "%": 0.01, "×": 1.0, "x": 1.0, "k": 1e3, "M": 1e6, "G": 1e9,
         "B": 1.0, "KiB": 2.0 ** 10, "MiB": 2.0 ** 20, "GiB": 2.0 ** 30}
BINARY = re.compile(r"\s*(KiB|MiB|GiB|B)$")
EXPONENT = re.compile(r"([eE])([+-]?)([0-9]+)$|(\s?×\s?10)([⁻⁺]?)([⁰¹²³⁴⁵⁶⁷⁸⁹]+)$")
SUPERSCRIPT = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹", "0123456789")


def split_exponent(printed):
    """'1.2e-4' -> ('1.2', -4, style); '2.1 × 10⁻⁵' -> ('2.1', -5, style); '1,024.5' -> ('1,024.5', None, None).

    The style (how the exponent is written: 'e' or 'E' or ' × 10', an explicit plus sign, the
    number of digits) lets write_exponent write a new power the same way."""
    m = EXPONENT.search(printed)
    if not m:
        return printed, None, None
    if m.group(1):
        power = int(m.group(2) + m.group(3))
        return printed[:m.start()], power, (m.group(1), m.group(2) == "+", len(m.group(3)))
    power = int(m.group(6).translate(SUPERSCRIPT)) * (-1 if m.group(5) == "⁻" else 1)
    return printed[:m.start()], power, (m.group(4), m.group(5) == "⁺", len(m.group(6)))


def write_exponent(power, style):
    mark, plus, width = style
    digits = f"{abs(power):0{width}d}"
    if mark in "eE":
        return mark + ("-" if power < 0 else "+" if plus else "") + digits
    return mark + ("⁻" if power < 0 else "⁺" if plus else "") + digits.translate(str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹"))


def number(printed):
    """The printed number's value, before the unit's scale."""
    mantissa, power, _ = split_exponent(printed)
    return float(mantissa.replace(",", "") + (f"e{power}" if power is not None else ""))


def precision(printed):
    """Half a unit in the last printed place, before the unit's scale."""
    mantissa, power, _ = split_exponent(printed)
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    return 0.5 * 10.0 ** ((power or 0) - decimals)


def write_like(value, printed):
    """The value written as `printed` is: same decimals, separators and notation."""
    mantissa, power, style = split_exponent(printed)
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    if power is None:
        return f"{value:,.{decimals}f}" if "," in mantissa else f"{value:.{decimals}f}"
    shown = abs(float(mantissa.replace(",", "")))
    if shown == 0 or 1 <= shown < 10:      # normalised as printed: let the exponent follow the value
        new_mantissa, new_power = f"{value:.{decimals}e}".split("e")
        new_power = int(new_power)
    else:                                   # e.g. 12.5e-3: keep the printed exponent
        new_power = power
        new_mantissa = f"{value / 10.0 ** power:.{decimals}f}"
    return new_mantissa + write_exponent(new_power, style)


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
    shown = number(printed) * SCALE[unit]
    tolerance = precision(printed) * SCALE[unit] * (1 + 1e-9)
    return abs(shown - value) <= tolerance


def fill(text, where):
    def repl(m):
        topic, path, fmt = m.group(1), m.group(2), m.group(3) or ".3f"
        try:
            value = lookup(topic, path)
        except (KeyError, ValueError, IndexError) as e:
            print(f"{where}: left {m.group(0)}: {e}")
            return m.group(0)
        if fmt.endswith("%"):
            return f"{value * 100:{fmt[:-1]}}%<!--n:{topic}:{path}-->"
        unit = BINARY.search(fmt)
        if unit:
            return f"{value / SCALE[unit.group(1)]:{fmt[:unit.start()]}}{unit.group(0)}<!--n:{topic}:{path}-->"
        return f"{value:{fmt}}<!--n:{topic}:{path}-->"
    return PLACEHOLDER.sub(repl, text)


def refresh(text, where):
    def repl(m):
        printed, unit, topic, key = m.groups()
        try:
            value = lookup(topic, key) / SCALE[unit]
        except (KeyError, ValueError, IndexError) as e:
            print(f"{where}: kept {printed}: {e}")
            return m.group(0)
        return m.group(0).replace(printed, write_like(value, printed), 1)
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
                shown = f"{printed} {unit}" if unit in ("B", "KiB", "MiB", "GiB") else f"{printed}{unit or ''}"
                scaled = f" ({value / SCALE[unit]:.6g} {unit})" if SCALE[unit] != 1 else ""
                problems.append(f"{path.name}:{lineno}: prints {shown} but {topic}:{key} is {value}{scaled}")
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
