"""scripts/check-links.py fails on a broken link or anchor and passes the links GitHub resolves.

Each case writes a small repository of Markdown files into a temporary directory and runs the
checker on it as `make lint` does. Run with `python3 -m unittest discover -s tests/docs` (the
Makefile's `links` target); standard library only."""

import subprocess
import sys
import tempfile
import textwrap
import unittest
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "check-links.py"


class CheckLinks(unittest.TestCase):
    def run_checker(self, files: dict[str, str]) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            for name, text in files.items():
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                (root / name).write_text(textwrap.dedent(text))
            markdown = [str(root / n) for n in files if n.endswith(".md")]
            return subprocess.run([sys.executable, str(SCRIPT), "--root", str(root), *markdown],
                                  capture_output=True, text=True)

    def assert_passes(self, files: dict[str, str]) -> None:
        result = self.run_checker(files)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def assert_fails(self, files: dict[str, str], *expected: str) -> None:
        result = self.run_checker(files)
        self.assertEqual(result.returncode, 1, f"a broken link passed:\n{result.stdout}{result.stderr}")
        for text in expected:
            self.assertIn(text, result.stdout)

    def test_links_that_resolve_pass(self):
        self.assert_passes({
            "README.md": """\
                # Project
                See [the guide](docs/guide.md), [a section](docs/guide.md#the-drain-token-x-drain-token),
                [here](#project), [a directory](docs), [a file](LICENSE), ![img](docs/pic.png "title"),
                [outside](https://example.com/missing.md#nothing), [mail](mailto:a@b.c), [ref][r].

                [r]: docs/guide.md#whats-new
                """,
            "docs/guide.md": """\
                # Guide
                ## The drain token (`X-Drain-Token`)
                ## What's new?
                """,
            "docs/pic.png": "",
            "LICENSE": "",
        })

    def test_a_missing_file_fails(self):
        self.assert_fails({"README.md": "[gone](docs/gone.md)\n"},
                          "README.md:1: docs/gone.md: no such file or directory")

    def test_a_missing_anchor_fails(self):
        self.assert_fails({
            "README.md": "[x](guide.md#the-drain)\n",
            "guide.md": "# Guide\n## The drain token\n",
        }, "no heading with the anchor #the-drain in guide.md")

    def test_a_missing_anchor_in_the_same_file_fails(self):
        self.assert_fails({"README.md": "# Title\n[x](#nope)\n"}, "README.md:2: #nope")

    def test_a_broken_reference_definition_fails(self):
        self.assert_fails({"README.md": "[x][r]\n\n[r]: gone.md\n"}, "README.md:3: gone.md")

    def test_an_undefined_reference_fails(self):
        self.assert_fails({"README.md": "[x][nowhere]\n"}, "an undefined reference")

    def test_a_link_out_of_the_repository_fails(self):
        self.assert_fails({"README.md": "[x](../elsewhere.md)\n"}, "leaves the repository")

    def test_github_slugs(self):
        # Punctuation dropped, code spans and emphasis kept as text, each space a hyphen (so a
        # dropped arrow between two spaces leaves two hyphens), repeated headings numbered.
        self.assert_passes({
            "a.md": """\
                [1](#catalog-mode-virtual-nodes-sessions-and-the-reaper)
                [2](#services)
                [3](#propagation-the-app-flips--v1healthservice-shows-it)
                [4](#propagation-the-app-flips--v1healthservice-shows-it-1)
                [5](#why-a-prestop-hook-drains-not-the-sidecars-sigterm)
                [6](#agent-mode-vs-catalog-mode-issue-12)
                [7](#bold-and-linked)
                [8](#setext-heading)
                [9](#explicit)

                # Catalog mode: virtual nodes, sessions and the reaper
                ## `services[]`
                ### Propagation: the app flips → `/v1/health/service` shows it
                ### Propagation: the app flips → `/v1/health/service` shows it
                ## Why a preStop hook drains, not the sidecar's SIGTERM
                ### Agent mode vs catalog mode (issue 12)
                ## **Bold** and [linked](a.md)
                Setext heading
                --------------
                <a id="explicit"></a>
                """,
        })

    def test_a_repeated_heading_has_no_second_plain_anchor(self):
        self.assert_fails({"a.md": "[x](#notes-2)\n# Notes\n# Notes\n"}, "#notes-2")

    def test_links_in_code_are_not_links(self):
        self.assert_passes({
            "a.md": """\
                ```sh
                [not a link](gone.md)
                ```
                Inline `[also not](gone.md)` code.

                    [indented code](gone.md)
                """,
        })

    def test_headings_in_code_blocks_are_not_anchors(self):
        self.assert_fails({"a.md": "[x](#comment)\n```sh\n# comment\n```\n"}, "#comment")


if __name__ == "__main__":
    unittest.main()
