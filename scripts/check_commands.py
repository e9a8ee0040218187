#!/usr/bin/env python3
"""Every `cargo run` command of the lessons and the README, parsed by the binary it runs.

For each line `cargo run [--release] -p CRATE [--example NAME] [--features …] [-- ARGS…]` in a
fenced code block or in inline code, runs the already built executable (target/debug/CRATE or
target/debug/examples/NAME, as `cargo test --workspace` leaves them) with `ARGS… --help`: clap
rejects an unknown subcommand, flag or value before it prints the help, so a command that would not
run as written fails here. Placeholders in capitals (DIR, FILE, N, …) are replaced by a harmless
value first. `shared`'s examples (small utilities with positional arguments) are skipped.

    python3 scripts/check_commands.py [--target-dir target]

Exits non-zero naming the file, line and clap's message for each command that does not parse.
"""
import pathlib
import re
import shlex
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
FILES = sorted((ROOT / "notebooks-md").glob("*.md")) + [ROOT / "README.md"]
COMMAND = re.compile(r"cargo run[^`\n]*")
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_.]*$")


def commands(path):
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        for m in COMMAND.finditer(line):
            text = m.group(0).split("#")[0].strip().rstrip("\\").strip()
            if "…" in text or "..." in text:
                continue  # an elided command: prose, not something to run
            yield lineno, text


def executable(words, target):
    crate, example = None, None
    for i, w in enumerate(words):
        if w == "-p" and i + 1 < len(words):
            crate = words[i + 1]
        if w == "--example" and i + 1 < len(words):
            example = words[i + 1]
    if crate is None or crate == "shared":
        return None  # shared's examples are small utilities with positional arguments, not clap
    return target / "debug" / ("examples/" + example if example else crate)


def arguments(words):
    if "--" not in words:
        return []
    args = words[words.index("--") + 1:]
    # Values written as placeholders (DIR, FILE, N) become something any parser accepts.
    return ["1" if PLACEHOLDER.match(a) and a not in ("--",) else a for a in args]


def main():
    target = ROOT / "target"
    if "--target-dir" in sys.argv:
        target = pathlib.Path(sys.argv[sys.argv.index("--target-dir") + 1])
    problems, checked = [], 0
    for path in FILES:
        for lineno, text in commands(path):
            try:
                words = shlex.split(text)
            except ValueError as e:
                problems.append(f"{path.name}:{lineno}: cannot split `{text}`: {e}")
                continue
            exe = executable(words, target)
            if exe is None:
                continue
            if not exe.exists():
                problems.append(f"{path.name}:{lineno}: `{text}`: {exe.relative_to(ROOT)} was not built (no such crate or example?)")
                continue
            args = arguments(words) + ["--help"]
            r = subprocess.run([str(exe)] + args, capture_output=True, text=True, timeout=60)
            checked += 1
            if r.returncode != 0:
                msg = (r.stderr or r.stdout).strip().splitlines()
                problems.append(f"{path.name}:{lineno}: `{text}`: {msg[0] if msg else 'exit ' + str(r.returncode)}")
    for p in problems:
        print(p)
    print(f"{checked} commands parsed by their binaries, {len(problems)} problems")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
