#!/usr/bin/env bash
# Build the lessons (notebooks-md/) into a browsable mdBook at target/book/ and check every page in
# headless Chromium (scripts/book_check.py). Installs what is missing: mdbook (Debian's package if
# apt has one, else `cargo install mdbook` 0.4.52, niced), chromium and MathJax 2 (Debian's
# libjs-mathjax: the book loads MathJax from its own folder, so it works offline).
#
#   scripts/book.sh              # build + check; screenshots into reports/book/
#   scripts/book.sh --no-check   # build only
#   scripts/book.sh --allow-missing 'figures/*/cpu/*' --allow-missing 'repo/reports/lessons/*'
#                                # check, but list the CPU outputs scripts/lessons.sh has not
#                                # written yet as PENDING instead of failing on them
#   open target/book/index.html  (or: python3 -m http.server -d target/book)
set -euo pipefail
cd "$(dirname "$0")/.."
MDBOOK_VERSION=0.4.52
OUT=target/book

apt_install() {
  if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" \
    || { $SUDO apt-get update && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@"; }
}
apt_has() { apt-cache policy "$1" 2>/dev/null | grep -q 'Candidate: [0-9]'; }

export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v mdbook >/dev/null; then
  if apt_has mdbook; then
    apt_install mdbook
  else
    echo "book.sh: no mdbook package in apt; cargo install mdbook $MDBOOK_VERSION (niced)" >&2
    nice -n 19 cargo install mdbook --locked --version "$MDBOOK_VERSION" --no-default-features --features search
  fi
fi
case "$(mdbook --version)" in
  "mdbook v0.4."*) ;;
  *) echo "book.sh: warning: $(mdbook --version); the book is set up for mdbook 0.4 (MathJax 2)" >&2 ;;
esac
MATHJAX=/usr/share/javascript/mathjax
[ -f "$MATHJAX/MathJax.js" ] || apt_install libjs-mathjax fonts-mathjax

mdbook build

# Files the lessons link to outside notebooks-md/ (listed by scripts/book_preprocess.py), at
# repo/<path>; missing ones are left for the check to report.
while IFS= read -r f; do
  if [ -e "$f" ]; then
    mkdir -p "$OUT/repo/$(dirname "$f")"
    cp -rL "$f" "$OUT/repo/$(dirname "$f")/"
  fi
done < "$OUT.assets.txt"

# MathJax from the book's own folder instead of the CDN mdBook links (2.7.1 there, 2.7.9 here).
mkdir -p "$OUT/mathjax/fonts/HTML-CSS/TeX" "$OUT/mathjax/localization"
cp -rL "$MATHJAX/MathJax.js" "$MATHJAX/config" "$MATHJAX/extensions" "$MATHJAX/jax" "$OUT/mathjax/"
cp -rL "$MATHJAX/localization/en" "$OUT/mathjax/localization/"
cp -rL "$MATHJAX/fonts/HTML-CSS/TeX/woff" "$MATHJAX/fonts/HTML-CSS/TeX/otf" "$OUT/mathjax/fonts/HTML-CSS/TeX/"
python3 - "$OUT" <<'EOF'
import os, sys
book = sys.argv[1]
cdn = "https://cdnjs.cloudflare.com/ajax/libs/mathjax/2.7.1/MathJax.js"
n = 0
for d, _, fs in os.walk(book):
    if os.path.relpath(d, book).split(os.sep)[0] == "mathjax":
        continue
    for f in fs:
        if f.endswith(".html"):
            p = os.path.join(d, f)
            s = open(p, encoding="utf-8").read()
            if cdn + "?config=TeX-AMS-MML_HTMLorMML" in s:
                root = os.path.relpath(book, d).replace(os.sep, "/")
                # CommonHTML output: HTML-CSS (mdBook's default) probes fonts with url(about:blank),
                # which Chromium reports as a console error on every page
                s = s.replace(cdn + "?config=TeX-AMS-MML_HTMLorMML",
                              ("" if root == "." else root + "/") + "mathjax/MathJax.js?config=TeX-AMS_CHTML")
                open(p, "w", encoding="utf-8").write(s)
                n += 1
if n == 0:
    sys.exit("book.sh: found no MathJax CDN link in the built pages (mdbook's template changed?)")
print("book.sh: %d pages load MathJax from mathjax/" % n)
EOF
echo "book.sh: built $OUT/index.html"

[ "${1:-}" = "--no-check" ] && exit 0
command -v chromium >/dev/null || apt_install chromium
python3 scripts/book_check.py --book "$OUT" --shots reports/book "$@"
