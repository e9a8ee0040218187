#!/usr/bin/env python3
"""mdBook preprocessor for notebooks-md/ (configured in book.toml, run by `mdbook build`).

The lessons are written for GitHub, which renders `$…$` and `$$…$$` math and resolves links
relative to the repository. mdBook does neither, so this preprocessor, on a copy of each chapter
(the Markdown files are not changed):

1. Math: `$…$` becomes `\\(…\\)` and `$$…$$` becomes `\\[…\\]` (MathJax's own delimiters), and
   every ASCII punctuation character inside the math is backslash-escaped, so that Markdown hands
   the TeX to MathJax unchanged (otherwise `\\` becomes `\`, `\,` becomes `,`, `_…_` becomes
   emphasis, `<t` becomes a tag). Code spans and fenced code blocks are left alone.
2. Links and images: every relative link is resolved against the chapter's place in the
   repository. Targets inside notebooks-md/ stay where mdBook puts them; Markdown files outside it
   (notes/perf.md, reports/gpu-performance.md, …) are added to the book as chapters under a
   "Notes the lessons link to" part, at repo/<path>; any other file outside it is linked at
   repo/<path> and listed in <build-dir>.assets.txt, which scripts/book.sh copies into the book.
3. Placeholders «CPU:topic:path|fmt» (filled in later from reports/lessons/): their `|` is escaped
   so that a placeholder in a table row does not split the cell.

mdBook protocol: `book_preprocess.py supports <renderer>` exits 0; otherwise [context, book] JSON
on stdin, the book JSON on stdout.
"""
import json
import os
import posixpath
import re
import sys

PUNCT = set("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
REPO_PREFIX = "repo"
EXTRA_PART = "Notes the lessons link to"


def esc_math(tex):
    return "".join("\\" + c if c in PUNCT else c for c in tex)


def protect(text, stash):
    """Replace code spans and math by placeholders \x00N\x00; math is converted on the way."""
    out = []
    i, n = 0, len(text)

    def put(s):
        stash.append(s)
        return "\x00%d\x00" % (len(stash) - 1)

    while i < n:
        c = text[i]
        if c == "\\" and i + 1 < n:
            out.append(text[i:i + 2])
            i += 2
        elif c == "`":
            j = i
            while j < n and text[j] == "`":
                j += 1
            run = text[i:j]
            k = j
            end = -1
            while True:
                k = text.find(run, k)
                if k < 0:
                    break
                if (k + len(run) < n and text[k + len(run)] == "`") or text[k - 1] == "`":
                    k2 = k
                    while k2 < n and text[k2] == "`":
                        k2 += 1
                    k = k2
                    continue
                end = k
                break
            if end < 0:
                out.append(run)
                i = j
            else:
                out.append(put(text[i:end + len(run)]))
                i = end + len(run)
        elif text.startswith("$$", i):
            j = text.find("$$", i + 2)
            if j < 0:
                out.append("$$")
                i += 2
            else:
                out.append(put("\\\\[" + esc_math(text[i + 2:j]) + "\\\\]"))
                i = j + 2
        elif c == "$":
            # inline math: $ not followed by a space, closed on the same line by a $ that is not
            # preceded by a space or a backslash and not followed by a digit (pandoc's rule)
            m = None
            if i + 1 < n and not text[i + 1].isspace():
                k = i + 1
                while True:
                    k = text.find("$", k)
                    if k < 0 or "\n" in text[i:k]:
                        break
                    if text[k - 1] in " \t\\" or (k + 1 < n and text[k + 1].isdigit()):
                        k += 1
                        continue
                    m = k
                    break
            if m is None:
                out.append(c)
                i += 1
            else:
                out.append(put("\\\\(" + esc_math(text[i + 1:m]) + "\\\\)"))
                i = m + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def restore(text, stash):
    return re.sub(r"\x00(\d+)\x00", lambda m: stash[int(m.group(1))], text)


FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
LINK = re.compile(r"(!?\[(?:[^\]\\]|\\.)*\])\(\s*([^)\s]+)(\s+\"[^\"]*\")?\s*\)")
PLACEHOLDER = re.compile(r"«[^»\n]*»")


def math_spans(content):
    """The TeX of every `$…$` / `$$…$$` span of a Markdown text, outside code (for the check)."""
    stash, block, fence = [], [], None
    for line in content.split("\n") + [""]:
        m = FENCE.match(line)
        if fence is None and m:
            protect("\n".join(block), stash)
            block, fence = [], m.group(1)
        elif fence is not None:
            if line.strip().startswith(fence[0] * len(fence)) and line.strip().strip(fence[0]) == "":
                fence = None
        else:
            block.append(line)
    protect("\n".join(block), stash)
    return [re.sub(r"\\(.)", r"\1", s[3:-3], flags=re.S) for s in stash if s.startswith(("\\\\(", "\\\\["))]


class Book:
    def __init__(self, root, src, build_dir):
        self.root, self.src, self.build_dir = root, src, build_dir
        self.chapters = {}      # repo path -> output page path (.html, relative to book root)
        self.assets = set()     # repo paths to copy to repo/<path>
        self.extra = []         # repo paths of out-of-book Markdown files to add as chapters

    def out_of(self, repo_path):
        """Output path (relative to book root) of a repo path a chapter links to."""
        if repo_path in self.chapters:
            return self.chapters[repo_path]
        if repo_path == self.src or repo_path.startswith(self.src + "/"):
            # a file inside the source dir: mdBook copies it as is
            return posixpath.relpath(repo_path, self.src)
        if repo_path.endswith(".md"):
            if os.path.isfile(os.path.join(self.root, repo_path)) and repo_path not in self.extra:
                self.extra.append(repo_path)
            return posixpath.join(REPO_PREFIX, repo_path[:-3] + ".html")
        self.assets.add(repo_path)
        return posixpath.join(REPO_PREFIX, repo_path)

    def fix_links(self, text, repo_path, out_path):
        base = posixpath.dirname(repo_path)
        out_dir = posixpath.dirname(out_path)

        def repl(m):
            label, target, title = m.group(1), m.group(2), m.group(3) or ""
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith(("#", "/")):
                return m.group(0)
            path, _, frag = target.partition("#")
            trailing = "/" if path.endswith("/") else ""
            resolved = posixpath.normpath(posixpath.join(base, path))
            if resolved.startswith(".."):
                return m.group(0)  # outside the repository: leave it, the check reports it
            new = posixpath.relpath(self.out_of(resolved), out_dir or ".") + trailing
            return "%s(%s%s%s)" % (label, new, "#" + frag if frag else "", title)

        return LINK.sub(repl, text)

    def transform(self, content, repo_path, out_path):
        lines = content.split("\n")
        out, block, fence = [], [], None

        def flush():
            if block:
                stash = []
                text = protect("\n".join(block), stash)
                text = PLACEHOLDER.sub(lambda m: m.group(0).replace("|", "\\|"), text)
                text = self.fix_links(text, repo_path, out_path)
                out.append(restore(text, stash))
                block.clear()

        for line in lines:
            m = FENCE.match(line)
            if fence is None and m:
                flush()
                fence = m.group(1)
                out.append(line)
            elif fence is not None:
                out.append(line)
                if line.strip().startswith(fence[0] * len(fence)) and line.strip().strip(fence[0]) == "":
                    fence = None
            else:
                block.append(line)
        flush()
        return "\n".join(out)


def walk(items):
    for it in items:
        ch = it.get("Chapter") if isinstance(it, dict) else None
        if ch:
            yield ch
            yield from walk(ch.get("sub_items", []))


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "supports":
        sys.exit(0)
    context, book = json.load(sys.stdin)
    root = context["root"]
    cfg = context["config"]
    src = posixpath.normpath(cfg.get("book", {}).get("src", "src"))
    build_dir = cfg.get("build", {}).get("build-dir", "book")
    b = Book(root, src, build_dir)

    chapters = [ch for ch in walk(book["sections"]) if ch.get("path")]
    for ch in chapters:
        b.chapters[posixpath.join(src, ch["source_path"])] = ch["path"][:-3] + ".html"
    for ch in chapters:
        ch["content"] = b.transform(ch["content"], posixpath.join(src, ch["source_path"]),
                                    ch["path"][:-3] + ".html")

    # out-of-book Markdown files the chapters link to (and those they link to, in turn)
    added = []
    i = 0
    while i < len(b.extra):
        repo_path = b.extra[i]
        i += 1
        with open(os.path.join(root, repo_path), encoding="utf-8") as f:
            raw = f.read()
        m = re.search(r"^#\s+(.+)$", raw, re.M)
        name = m.group(1).strip() if m else repo_path
        path = posixpath.join(REPO_PREFIX, repo_path)
        b.chapters[repo_path] = path[:-3] + ".html"
        added.append({"Chapter": {
            "name": "%s (%s)" % (name, repo_path) if m else repo_path,
            "content": b.transform(raw, repo_path, path[:-3] + ".html"),
            "number": None, "sub_items": [], "path": path, "source_path": path,
            "parent_names": []}})
    if added:
        book["sections"].append("Separator")
        book["sections"].append({"PartTitle": EXTRA_PART})
        book["sections"].extend(added)

    manifest = os.path.join(root, build_dir.rstrip("/") + ".assets.txt")
    os.makedirs(os.path.dirname(manifest), exist_ok=True)
    with open(manifest, "w", encoding="utf-8") as f:
        for p in sorted(b.assets):
            f.write(p + "\n")
    json.dump(book, sys.stdout)


if __name__ == "__main__":
    main()
