#!/usr/bin/env python3
"""Open every page of the built book (target/book/) in headless Chromium and fail on what a reader
would see broken.

    python3 scripts/book_check.py [--book target/book] [--shots reports/book] [--lesson 08-09-flash-attention.html]
                                  [--allow-missing GLOB ...]

Serves the book over http on 127.0.0.1 (a free port), drives Chromium through the DevTools
protocol over --remote-debugging-pipe (no Python packages needed), opens every .html page mdBook
wrote, waits for MathJax to finish, and reports, per page:

- a link to a local file or page that the server does not have (404), or to an anchor (#id) that
  the target page does not contain;
- an image that did not load (naturalWidth == 0);
- a MathJax error: an `merror` node or a red undefined-macro node in any formula, "Math input
  error" / "Math Processing Error" in the text, or a `$`, `\\(`, `\\[` left unrendered in the text
  (outside code), or typeset TeX that differs from the `$…$` in the lesson's Markdown;
- a console error, an uncaught exception, a failed request or a response >= 400.

Screenshots (1280×900 PNG) of the landing page (at the ladder table) and of one lesson, scrolled to a
formula followed by a figure, go to --shots. Exit status 1 and a list "page: item" on any failure.
"""
import argparse
import fnmatch
import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from book_preprocess import math_spans  # noqa: E402

W, H = 1280, 900


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass


class Chrome:
    """Chromium over --remote-debugging-pipe: JSON messages separated by NUL on fds 3 (in) / 4 (out)."""

    def __init__(self, exe):
        self.profile = tempfile.mkdtemp(prefix="book-check-chromium-")
        to_chrome_r, self.to_chrome_w = os.pipe()
        self.from_chrome_r, from_chrome_w = os.pipe()
        # move the child's ends above 4, so that the renumbering below cannot clobber them
        to_chrome_r, from_chrome_w = (self._high(to_chrome_r), self._high(from_chrome_w))

        args = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions", "--hide-scrollbars",
                "--force-device-scale-factor=1", "--window-size=%d,%d" % (W, H),
                "--user-data-dir=" + self.profile, "--remote-debugging-pipe", "about:blank"]
        # the pipe ends become fds 3 and 4 of Chromium (bash does the renumbering)
        wire = 'exec "$@" 3<&%d 4>&%d %d<&- %d>&-' % (to_chrome_r, from_chrome_w, to_chrome_r, from_chrome_w)
        self.proc = subprocess.Popen(["bash", "-c", wire, "bash"] + args,
                                     pass_fds=(to_chrome_r, from_chrome_w),
                                     stdout=subprocess.DEVNULL, stderr=None if os.environ.get("BOOK_CHECK_DEBUG") else subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self.buf = b""
        self.next_id = 0
        self.events = []
        self.session = None

    @staticmethod
    def _high(fd):
        import fcntl
        high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(fd)
        return high

    def _read(self, timeout):
        deadline = time.time() + timeout
        while b"\0" not in self.buf:
            import select
            left = deadline - time.time()
            if left <= 0:
                raise TimeoutError("no message from Chromium")
            r, _, _ = select.select([self.from_chrome_r], [], [], left)
            if r:
                chunk = os.read(self.from_chrome_r, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed the pipe (exit %s)" % self.proc.poll())
                self.buf += chunk
        msg, self.buf = self.buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method, params=None, session=True, timeout=60):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self.to_chrome_w, json.dumps(msg).encode() + b"\0")
        while True:
            m = self._read(timeout)
            if m.get("id") == self.next_id:
                if "error" in m:
                    raise RuntimeError("%s: %s" % (method, m["error"]))
                return m.get("result", {})
            self.events.append(m)

    def wait_event(self, method, timeout=60):
        deadline = time.time() + timeout
        for i, e in enumerate(self.events):
            if e.get("method") == method:
                return self.events.pop(i)
        while True:
            m = self._read(max(0.01, deadline - time.time()))
            if m.get("method") == method:
                return m
            self.events.append(m)

    def eval(self, expr, timeout=60):
        r = self.send("Runtime.evaluate", {"expression": expr, "awaitPromise": True,
                                           "returnByValue": True, "timeout": timeout * 1000},
                      timeout=timeout + 5)
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            raise RuntimeError("evaluate: %s %s" % (d.get("text"), d.get("exception", {}).get("description")))
        return r["result"].get("value")

    def close(self):
        try:
            self.send("Browser.close", session=False, timeout=10)
        except Exception:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)


# Runs in the page once it has loaded; resolves when MathJax has typeset everything.
SETTLE = r"""
new Promise(resolve => {
  const fin = () => Promise.all([...document.images].map(i => i.complete ? 0 :
      new Promise(r => { i.onload = i.onerror = r; }))).then(() => document.fonts.ready)
      .then(() => resolve(true));
  if (window.MathJax && MathJax.Hub && MathJax.Hub.Queue) MathJax.Hub.Queue(fin);
  else fin();
})
"""

COLLECT = r"""
(() => {
  const main = document.querySelector('main') || document.body;
  const out = {images: [], links: [], ids: [], math: 0, mathErrors: [], leftovers: [], tex: [], mathjax: !!window.MathJax};
  for (const img of document.images)
    out.images.push({src: img.getAttribute('src'), url: img.currentSrc || img.src,
                     ok: img.complete && img.naturalWidth > 0});
  for (const a of document.querySelectorAll('a[href]'))
    out.links.push({href: a.getAttribute('href'), url: a.href});
  for (const e of document.querySelectorAll('[id]')) out.ids.push(e.id);
  for (const e of document.querySelectorAll('a[name]')) out.ids.push(e.getAttribute('name'));
  if (window.MathJax && MathJax.Hub && MathJax.Hub.getAllJax) {
    for (const jax of MathJax.Hub.getAllJax()) {
      out.math++;
      out.tex.push(jax.originalText);
      let mml = '';
      try { mml = jax.root.toMathML(''); } catch (e) { mml = 'toMathML failed: ' + e; }
      if (/<merror|mathcolor="red"|toMathML failed/.test(mml))
        out.mathErrors.push(jax.originalText.slice(0, 120));
    }
  }
  for (const e of document.querySelectorAll('.merror, .MathJax_Error'))
    out.mathErrors.push('error node: ' + e.textContent.slice(0, 120));
  const text = main.innerText;
  for (const s of ['Math input error', 'Math Processing Error'])
    if (text.includes(s)) out.mathErrors.push(s);
  // text nodes outside code, scripts and rendered math
  const skip = new Set(['CODE', 'PRE', 'SCRIPT', 'STYLE', 'NOSCRIPT']);
  const walker = document.createTreeWalker(main, NodeFilter.SHOW_TEXT, {acceptNode: n => {
    for (let p = n.parentElement; p && p !== main; p = p.parentElement) {
      if (skip.has(p.tagName) || /MathJax|MJX|mjx/.test(String(p.className || '')))
        return NodeFilter.FILTER_REJECT;
    }
    return NodeFilter.FILTER_ACCEPT;
  }});
  for (let n; (n = walker.nextNode());) {
    const t = n.textContent;
    const m = t.match(/\$|\\\(|\\\)|\\\[|\\\]/);
    if (m) out.leftovers.push(t.slice(Math.max(0, m.index - 40), m.index + 40).replace(/\s+/g, ' '));
  }
  return out;
})()
"""

# Scrolls to the first formula that has a loaded figure below it within the viewport.
SCROLL_TO_MATH_AND_FIGURE = r"""
(() => {
  const imgs = [...document.querySelectorAll('main img')].filter(i => i.naturalWidth > 0);
  const maths = [...document.querySelectorAll('main .MathJax_Display, main .MathJax')];
  for (const img of imgs) {
    const it = img.getBoundingClientRect().top + scrollY;
    const above = maths.map(m => m.getBoundingClientRect().top + scrollY)
                       .filter(t => t < it && it - t < 450);
    if (above.length) { window.scrollTo(0, Math.max(0, Math.min(...above) - 80)); return true; }
  }
  if (imgs.length) { window.scrollTo(0, imgs[0].getBoundingClientRect().top + scrollY - 300); }
  return false;
})()
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--book", default="target/book")
    ap.add_argument("--shots", default="reports/book")
    ap.add_argument("--src", default="notebooks-md", help="the lessons' Markdown (to compare the typeset TeX)")
    ap.add_argument("--lesson", default="08-09-flash-attention.html",
                    help="the lesson page to screenshot (one with math and a figure)")
    ap.add_argument("--allow-missing", action="append", default=[], metavar="GLOB",
                    help="report a missing file whose path in the book matches GLOB as PENDING, not as a "
                         "failure; e.g. before scripts/lessons.sh has run: --allow-missing 'figures/*/cpu/*' "
                         "--allow-missing 'repo/reports/lessons/*'")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = ap.parse_args()
    book = os.path.abspath(args.book)

    pages = sorted(os.path.relpath(os.path.join(d, f), book).replace(os.sep, "/")
                   for d, _, fs in os.walk(book) for f in fs if f.endswith(".html"))
    # repo/… holds the files the lessons link to: .html there are chapters mdBook rendered
    pages = [p for p in pages if p != "toc.html"]
    if "index.html" not in pages:
        sys.exit("book_check: no index.html under %s (build the book first: scripts/book.sh)" % book)

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=book))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    origin = "http://127.0.0.1:%d" % server.server_address[1]

    failures = []  # (page, item)
    ids = {}       # page path -> set of ids
    links = {}     # url -> set of pages linking it
    chrome = Chrome(args.chromium)
    try:
        t = chrome.send("Target.createTarget", {"url": "about:blank"}, session=False)
        chrome.session = chrome.send("Target.attachToTarget", {"targetId": t["targetId"], "flatten": True},
                                     session=False)["sessionId"]
        for d in ("Page", "Runtime", "Log", "Network"):
            chrome.send(d + ".enable")
        # print.html calls window.print() once loaded; a print dialog would stall the page
        chrome.send("Page.addScriptToEvaluateOnNewDocument", {"source": "window.print = () => {};"})
        chrome.send("Emulation.setDeviceMetricsOverride",
                    {"width": W, "height": H, "deviceScaleFactor": 1, "mobile": False})
        os.makedirs(args.shots, exist_ok=True)
        for page in pages:
            chrome.events.clear()
            url = origin + "/" + page
            chrome.send("Page.navigate", {"url": url})
            chrome.wait_event("Page.loadEventFired")
            chrome.eval(SETTLE)
            try:
                got = chrome.eval(COLLECT)
            except RuntimeError as e:
                raise RuntimeError("%s: %s" % (page, e))
            ids[page] = set(got["ids"])
            for img in got["images"]:
                if not img["ok"]:
                    failures.append((page, "image did not load (naturalWidth 0): %s" % img["src"]))
            for l in got["links"]:
                u = urllib.parse.urlsplit(l["url"])
                if u.scheme in ("http", "https") and u.netloc == urllib.parse.urlsplit(origin).netloc:
                    links.setdefault(l["url"], set()).add(page)
            if page.endswith(".html") and not page.startswith(("404", "toc")) and got["math"] == 0 \
                    and any(ch in open(os.path.join(book, page), encoding="utf-8").read()
                            for ch in ("\\(", "\\[")) and not got["mathjax"]:
                failures.append((page, "MathJax did not load"))
            # the TeX MathJax typeset must be the TeX written in the lesson (Markdown escapes
            # would otherwise eat `\\`, `\,`, `\_` … without an error)
            md = os.path.join(args.src, page[:-5] + ".md")
            if page != "index.html" and os.path.isfile(md):
                want = [t.strip() for t in math_spans(open(md, encoding="utf-8").read())]
                have = [t.strip() for t in got["tex"]]
                if want != have:
                    diff = next(((w, h) for w, h in zip(want, have) if w != h), (len(want), len(have)))
                    failures.append((page, "typeset TeX differs from %s: %r vs %r" % (md, diff[0], diff[1])))
            for e in got["mathErrors"]:
                failures.append((page, "MathJax error: %s" % e))
            for s in got["leftovers"]:
                failures.append((page, "unrendered math delimiter in text: …%s…" % s))
            # everything the browser reported while loading and typesetting the page; a missing
            # file is reported once (Chromium also logs it as a console error)
            missing = {img["url"] for img in got["images"] if not img["ok"]}
            for e in chrome.events:
                if e.get("method") == "Network.responseReceived" and e["params"]["response"]["status"] >= 400:
                    missing.add(e["params"]["response"]["url"])
            for e in chrome.events:
                m, p = e.get("method"), e.get("params", {})
                if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                    msg = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
                    failures.append((page, "console error: %s" % msg[:200]))
                elif m == "Runtime.exceptionThrown":
                    d = p.get("exceptionDetails", {})
                    failures.append((page, "uncaught exception: %s" % (
                        d.get("exception", {}).get("description") or d.get("text"))[:200]))
                elif m == "Log.entryAdded" and p["entry"].get("level") == "error" \
                        and not (p["entry"].get("source") == "network" and p["entry"].get("url") in missing):
                    failures.append((page, "console error: %s %s" % (
                        p["entry"].get("text", "")[:200], p["entry"].get("url", ""))))
                elif m == "Network.loadingFailed" and not p.get("canceled"):
                    failures.append((page, "request failed: %s" % p.get("errorText")))
                elif m == "Network.responseReceived" and p["response"]["status"] >= 400 \
                        and not page.startswith("404") \
                        and not any(i["url"] == p["response"]["url"] for i in got["images"]):
                    failures.append((page, "HTTP %d for %s" % (p["response"]["status"], p["response"]["url"])))
            if page in ("index.html", args.lesson):
                if page == args.lesson:
                    chrome.eval(SCROLL_TO_MATH_AND_FIGURE)
                    time.sleep(0.3)
                else:  # the ladder: its rungs and the CPU numbers per rung
                    chrome.eval("(document.getElementById('the-ladder') || document.body).scrollIntoView()")
                    chrome.eval("window.scrollBy(0, -60)")
                shot = chrome.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": False})
                name = "landing.png" if page == "index.html" else "lesson-" + page.replace(".html", ".png")
                with open(os.path.join(args.shots, name), "wb") as f:
                    import base64
                    f.write(base64.b64decode(shot["data"]))
                print("screenshot %s" % os.path.join(args.shots, name))
    finally:
        chrome.close()

    # links: the file must be served; an #anchor on a page of the book must exist there
    base = origin + "/"
    for url, froms in sorted(links.items()):
        target, _, frag = url.partition("#")
        rel = urllib.parse.unquote(target[len(base):]) if target.startswith(base) else target
        status = None
        try:
            with urllib.request.urlopen(urllib.request.Request(target, method="HEAD"), timeout=10) as r:
                status = r.status
        except urllib.error.HTTPError as e:
            status = e.code
        for page in sorted(froms):
            if status != 200:
                failures.append((page, "link to missing %s (HTTP %s)" % (rel or "/", status)))
            elif frag and rel.endswith(".html") and rel in ids and urllib.parse.unquote(frag) not in ids[rel]:
                failures.append((page, "link to missing anchor %s#%s" % (rel, frag)))
    server.shutdown()

    print("book_check: %d pages, %d distinct local links" % (len(pages), len(links)))

    def pending(item):
        if not item.startswith(("link to missing", "image did not load")):
            return False
        path = item.split()[-1] if item.startswith("image") else item.split()[3]
        return any(fnmatch.fnmatch(path, pat) for pat in args.allow_missing)

    pend = [(p, i) for p, i in failures if pending(i)]
    failures = [(p, i) for p, i in failures if not pending(i)]
    for page, item in sorted(set(pend)):
        print("PENDING %s: %s" % (page, item))
    if pend:
        print("book_check: %d missing files allowed by --allow-missing" % len(set(pend)))
    if failures:
        seen = set()
        for page, item in failures:
            if (page, item) not in seen:
                seen.add((page, item))
                print("FAIL %s: %s" % (page, item))
        print("book_check: %d failures" % len(seen))
        sys.exit(1)
    print("book_check: OK")


if __name__ == "__main__":
    main()
