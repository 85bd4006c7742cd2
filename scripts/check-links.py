#!/usr/bin/env python3
"""Checks that every relative link and anchor in the project's Markdown files resolves.

    python3 scripts/check-links.py [--root DIR] [FILE.md ...]

Without FILEs it checks every Markdown file git knows in the repository (tracked, or new and not
ignored). A link resolves when its path names a file or directory inside the repository and, when it
carries an `#anchor` into a Markdown file, that file has a heading (or an explicit `id`/`name`) with
that anchor, slugged as GitHub slugs headings: lower case, punctuation dropped, each space a hyphen,
`-1`, `-2`, ... for repeats. Links with a scheme (`https:`, `mailto:`) are not followed; links
inside code blocks and code spans are not links. Prints one line per broken link and exits 1 if
there is any. Standard library only, so `make lint` needs nothing but Python 3.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
ATX = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
HTML_ID = re.compile(r"""<[^>]*\b(?:id|name)\s*=\s*["']([^"']+)["']""", re.I)
# [text](target "title") and ![alt](target); the target may be <...>.
INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*(<[^>]*>|[^)\s]*)(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^)]*\)))?\s*\)")
REFERENCE_DEF = re.compile(r"^ {0,3}\[([^\]]+)\]:\s*(<[^>]*>|\S+)")
REFERENCE_USE = re.compile(r"\[([^\[\]]+)\]\[([^\[\]]*)\]")
HTML_LINK = re.compile(r"""<(?:a|img)\b[^>]*\b(?:href|src)\s*=\s*["']([^"']+)["']""", re.I)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def strip_code(lines: list[str], spans: bool = True) -> list[str]:
    """The lines with code blocks blanked and, with `spans`, code spans removed (line numbers
    kept). Headings keep their code spans: GitHub slugs their text."""
    out, fence = [], None
    for line in lines:
        m = FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)[0] * len(m.group(1))
            out.append("")
        elif fence is not None:
            if line.strip().startswith(fence) and set(line.strip()) <= {fence[0]}:
                fence = None
            out.append("")
        elif line.startswith(("    ", "\t")) and (not out or not out[-1].strip()):
            out.append("")  # an indented code block's first line (after a blank line)
        else:
            out.append(re.sub(r"(`+)(?:(?!\1).)+?\1", "", line) if spans else line)
    return out


def heading_text(raw: str) -> str:
    """A heading's text as GitHub renders it: inline markup gone, link text kept."""
    text = re.sub(r"!\[([^\]]*)\]\([^)]*\)", r"\1", raw)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"(?<!\w)_(.+?)_(?!\w)", r"\1", text)
    return text


def slug(text: str) -> str:
    """GitHub's heading anchor (github-slugger): lower case, every character that is not a letter,
    a digit, a mark, `_`, `-` or a space dropped, each space made a hyphen."""
    return re.sub(r"[^\w\- ]", "", heading_text(text).strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a Markdown file offers."""
    lines = strip_code(path.read_text(encoding="utf-8").splitlines(), spans=False)
    seen: dict[str, int] = {}
    found: set[str] = set()

    def add(text: str) -> None:
        base = slug(text)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")

    previous = ""
    for line in lines:
        m = ATX.match(line)
        if m:
            add(m.group(2))
        elif SETEXT.match(line) and previous.strip() and not previous.startswith((" " * 4, "\t")) and not ATX.match(previous):
            if not (line.strip().startswith("-") and previous.lstrip().startswith(("|", "-", "*", "+"))):
                add(previous.strip())
        found.update(HTML_ID.findall(line))
        previous = line
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link in a Markdown file."""
    lines = strip_code(path.read_text(encoding="utf-8").splitlines())
    definitions = {}
    for line in lines:
        m = REFERENCE_DEF.match(line)
        if m:
            definitions[m.group(1).strip().lower()] = m.group(2)
    found = []
    for number, line in enumerate(lines, 1):
        if REFERENCE_DEF.match(line):
            target = REFERENCE_DEF.match(line).group(2)
            found.append((number, target))
            continue
        for m in INLINE.finditer(line):
            found.append((number, m.group(1)))
        for m in REFERENCE_USE.finditer(line):
            label = (m.group(2) or m.group(1)).strip().lower()
            if label not in definitions:
                found.append((number, f"[{label}] (an undefined reference)"))
        for m in HTML_LINK.finditer(line):
            found.append((number, m.group(1)))
    return [(n, t[1:-1] if t.startswith("<") and t.endswith(">") else t) for n, t in found]


def check(path: Path, root: Path, cache: dict[Path, set[str]]) -> list[str]:
    problems = []
    for number, target in links(path):
        where = f"{path.relative_to(root)}:{number}"
        if target.endswith("(an undefined reference)"):
            problems.append(f"{where}: {target}")
            continue
        if not target or SCHEME.match(target) or target.startswith("//"):
            continue
        file_part, _, anchor = target.partition("#")
        file_part = unquote(file_part.split("?", 1)[0])
        if file_part.startswith("/"):
            resolved = (root / file_part.lstrip("/")).resolve()
        elif file_part:
            resolved = (path.parent / file_part).resolve()
        else:
            resolved = path.resolve()
        if resolved != root and root not in resolved.parents:
            problems.append(f"{where}: {target}: leaves the repository")
            continue
        if not resolved.exists():
            problems.append(f"{where}: {target}: no such file or directory")
            continue
        if anchor and resolved.is_file() and resolved.suffix.lower() == ".md":
            if resolved not in cache:
                cache[resolved] = anchors(resolved)
            if unquote(anchor) not in cache[resolved]:
                problems.append(f"{where}: {target}: no heading with the anchor #{anchor} in {resolved.relative_to(root)}")
    return problems


def markdown_files(root: Path) -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", "*.md"],
        cwd=root, capture_output=True, check=True).stdout.decode().split("\0")
    return [root / name for name in listed if name and (root / name).is_file()]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="the repository (default: this script's)")
    parser.add_argument("files", nargs="*", type=Path, help="Markdown files (default: every one git knows)")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    files = [f.resolve() for f in args.files] or markdown_files(root)
    cache: dict[Path, set[str]] = {}
    problems = [p for f in sorted(files) for p in check(f, root, cache)]
    for p in problems:
        print(p)
    print(f"check-links: {len(files)} files, {len(problems)} broken links", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
