#!/usr/bin/env python3
"""Every line-anchored link of the lessons and notes points at the code it names.

A link into the code with a line range names what it points at in backticks:

    [`LayerNorm`](../crates/t0804_transformer_block/src/blocks.rs#L14-L63)
    [`DecoderOnlyLm::hidden`](../crates/t0804_transformer_block/src/lm.rs#L146-L160)
    [`blocks.rs`: `FeedForward`](../crates/t0804_transformer_block/src/blocks.rs#L84-L151)

The item is the last backticked name of the label that is not a file name (the last `::` segment
of a path; call parentheses are ignored). The checker finds the item's definition in the target
file (`fn`, `struct`, `enum`, `trait`, `impl`, `const`, `static`, `type`, `mod`, `macro_rules!`;
for `A::b`, the `fn b` after `impl … A`) and requires the anchor to start at the item's first
line (its doc comment, or the definition itself) and end at its last line (the closing brace, or
the semicolon of a one-line item) or at the end of the `impl` blocks of that name that follow it
(a type with its methods). Code moves; the names stay.

    python3 scripts/check_anchors.py          check (CI): exits 1 naming each stale or unnamed anchor
    python3 scripts/check_anchors.py --fix    rewrite every stale anchor to the item's lines
    (either with file names after it: only those documents)
"""
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "notebooks-md").glob("*.md")) + [
    ROOT / "README.md",
    ROOT / "ARCHITECTURE.md",
    ROOT / "notes" / "perf.md",
    ROOT / "notes" / "flash-attention.md",
    ROOT / "reports" / "gpu-performance.md",
]
LINK = re.compile(r"\[((?:[^\[\]]|\[[^\]]*\])+)\]\(([^)#\s]+)#L(\d+)(?:-L(\d+))?\)")
TICKED = re.compile(r"`([^`]+)`")
KEYWORDS = r"(?:fn|struct|enum|trait|const|static|type|mod|union)"


def item_name(label):
    """The item a label names: its last backticked name that is not a file name."""
    names = []
    for t in TICKED.findall(label):
        t = re.sub(r"\(.*", "", t).strip()  # `modern(cfg)` → `modern`
        t = re.sub(r"<.*", "", t)
        if re.search(r"\.(rs|cu|cuh|py|sh|md|toml)$", t) or "/" in t:
            continue
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(::[A-Za-z_][A-Za-z0-9_]*)*!?", t):
            names.append(t)
    return names[-1] if names else None


def definitions(lines, name):
    """Line indexes (0-based) where `name` is defined; for `Type::method`, methods inside an impl of Type."""
    parts = name.rstrip("!").split("::")
    last = parts[-1]
    if name.endswith("!"):
        pat = re.compile(rf"^\s*macro_rules!\s+{re.escape(last)}\b")
    else:
        pat = re.compile(
            rf"^\s*(?:pub(?:\([^)]*\))?\s+)?(?:unsafe\s+|async\s+|const\s+|extern\s+\"C\"\s+)*"
            rf"(?:{KEYWORDS}\s+{re.escape(last)}\b|impl\b[^{{]*\b{re.escape(last)}\b)"
        )
    hits = [i for i, line in enumerate(lines) if pat.search(line)]
    if len(parts) >= 2 and hits:
        owner = parts[-2]
        header = re.compile(
            rf"^(?:impl\b[^{{]*\bfor\s+{re.escape(owner)}\b|impl(?:<[^>]*>)?\s+{re.escape(owner)}\b"
            rf"|(?:pub\s+)?trait\s+{re.escape(owner)}\b)"
        )
        blocks = [(j, extent(lines, j)[1]) for j, line in enumerate(lines) if header.match(line)]
        if blocks:  # `Type::method`: a method inside an impl of Type (or the trait Type)
            return [i for i in hits if any(j < i <= end for j, end in blocks)]
        # no impl of that name here: `module::item`, the item itself
    # A struct and its impl both match a type name: the definition (struct/enum/trait/fn) first.
    defs = [i for i in hits if not re.match(r"^\s*impl\b", lines[i])]
    return defs or hits


def extent(lines, i):
    """(first, last) 0-based lines of the item defined at line i: doc comments and attributes above
    it, through its closing brace (or the `;` ending a one-line item)."""
    first = i
    while first > 0 and re.match(r"^\s*(///|#\[|#!\[)", lines[first - 1]):
        first -= 1
    depth, opened = 0, False
    for j in range(i, len(lines)):
        code = re.sub(r"//.*", "", lines[j])
        code = re.sub(r'"(\\.|[^"\\])*"', '""', code)
        code = re.sub(r"'(\\.|[^'\\])'", "''", code)
        for ch in code:
            if ch in "{[(":
                depth += 1
                opened = opened or ch == "{"
            elif ch in "}])":
                depth -= 1
        if depth <= 0 and (opened or code.rstrip().endswith(";")):
            return first, j
    return first, i


def with_impls(lines, name, first, last):
    """`last` extended over the `impl … name` blocks (and their doc comments) that follow it."""
    short = name.split("::")[-1]
    j = last + 1
    while True:
        k = j
        while k < len(lines) and (not lines[k].strip() or re.match(r"^\s*(///|#\[)", lines[k])):
            k += 1
        if k < len(lines) and re.match(rf"^impl\b[^{{]*\b{re.escape(short)}\b", lines[k]):
            _, last = extent(lines, k)
            j = last + 1
        else:
            return last


def main():
    fix = "--fix" in sys.argv
    only = [pathlib.Path(a).resolve() for a in sys.argv[1:] if a != "--fix"]
    known = {d.resolve() for d in DOCS}
    unknown = [str(o) for o in only if o not in known]
    if unknown:
        sys.exit(f"not among the checked documents: {', '.join(unknown)}")
    problems, fixed, checked = [], 0, 0
    for doc in DOCS:
        if only and doc.resolve() not in only:
            continue
        if not doc.exists():
            problems.append(f"{doc.relative_to(ROOT)}: missing")
            continue
        text = doc.read_text()
        out_lines = []
        for n, line in enumerate(text.splitlines(keepends=True), 1):
            def repl(m):
                nonlocal fixed, checked
                label, path, a = m.group(1), m.group(2), int(m.group(3))
                b = int(m.group(4) or a)
                target = (doc.parent / path).resolve()
                where = f"{doc.relative_to(ROOT)}:{n}: [{label}]({path}#L{a}{'-L' + str(b) if m.group(4) else ''})"
                if not target.is_file():
                    problems.append(f"{where}: no file {path}")
                    return m.group(0)
                name = item_name(label)
                if name is None:
                    problems.append(f"{where}: the label names no item in backticks")
                    return m.group(0)
                checked += 1
                lines = target.read_text().splitlines()
                defs = definitions(lines, name)
                if not defs:
                    problems.append(f"{where}: `{name}` is not defined in {path}")
                    return m.group(0)
                # (first line with docs, definition line, last line, last line with its impls)
                spans = []
                for i in defs:
                    f, l = extent(lines, i)
                    spans.append((f + 1, i + 1, l + 1, with_impls(lines, name, f, l) + 1))
                if any(a in (f, d) and b in (l, li) for f, d, l, li in spans):
                    return m.group(0)
                f, d, l, li = min(spans, key=lambda s: abs(s[0] - a))
                end = li if b - a > l - f else l  # a span that held the methods keeps them
                if fix:
                    fixed += 1
                    return f"[{label}]({path}#L{f}-L{end})"
                problems.append(f"{where}: `{name}` is at L{f}-L{end}")
                return m.group(0)
            out_lines.append(LINK.sub(repl, line))
        new = "".join(out_lines)
        if fix and new != text:
            doc.write_text(new)
    for p in problems:
        print(p)
    print(f"{checked} line anchors checked, {fixed} fixed, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
