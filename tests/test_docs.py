"""What a newcomer reads stays short, its links lead somewhere, and its two commands are the real ones."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").rglob("*.md"))

# The README's two commands, byte for byte: they do all the set-up, so a fresh clone runs them as written.
COMMAND_1 = "bash scripts/setup_env.sh && .venv/bin/python jobs/distill.py"
COMMAND_2 = "bash scripts/setup_env.sh && .venv/bin/python -m pytest"

_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def relative_links(markdown: str) -> list[str]:
    """Targets of the Markdown links and images outside code blocks and code spans, minus URLs and pure anchors."""
    text = _CODE_SPAN.sub("", _FENCE.sub("", markdown))
    targets = []
    for target in _LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # http(s)://, mailto:, ... and links within the page
        targets.append(target.split("#", 1)[0])
    return targets


def test_relative_links_finds_links_and_images_but_not_code() -> None:
    md = ("See [a](docs/A.md#x), ![pic](img/p.png) and [web](https://x.org).\n"
          "`[not](a/link.md)` [anchor](#top)\n```\n[also not](b.md)\n```\n")
    assert relative_links(md) == ["docs/A.md", "img/p.png"]


def test_readme_is_at_most_150_lines() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; keep it <= 150 and move detail to docs/"


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    missing = [t for t in relative_links(page.read_text()) if not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to files that do not exist: {missing}"


def test_readme_gives_the_two_commands_that_ci_and_a_fresh_clone_run() -> None:
    readme = README.read_text()
    first_block = _FENCE.search(readme)
    assert first_block, "README.md has no code block: the quickstart's two commands go in the first one"
    commands = [line for line in first_block.group(0).splitlines()[1:-1] if line and not line.startswith("#")]
    assert commands == [COMMAND_1, COMMAND_2], (
        f"README's quickstart block must hold exactly the two commands {[COMMAND_1, COMMAND_2]}, got {commands}")
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert len(ci) == 1 and (ci[0] == COMMAND_2 or ci[0].startswith(COMMAND_2 + " -")), (
        f".ci/run must run README command 2 ({COMMAND_2!r}, output flags allowed), got {ci}")


def test_command_1_runs_the_embedded_default() -> None:
    out = subprocess.run([sys.executable, "jobs/distill.py", "--print-config"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    # each key is followed by its description as a YAML comment
    assert [line.split("  #")[0] for line in out.stdout.splitlines()[:2]] == ["recipe: embedded", "teacher: embedded"], \
        out.stdout[:500]
