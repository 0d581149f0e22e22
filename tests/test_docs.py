"""The README and the docs pages: every relative link resolves, and the README stays a two-minute read that starts
with the two commands (the second one is what `.ci/run` runs)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
MAX_README_LINES = 250

FENCE = re.compile(r"^\s*(```|~~~)")
ATX_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
# [text](target) and ![alt](target), with an optional "title"; the target may not hold spaces or parentheses
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^()\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its rendered text lower-cased, punctuation but `-` and `_` dropped, spaces
    turned into `-`."""
    text = CODE_SPAN.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link renders as its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("*", "")  # emphasis markers
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file, a repeated slug numbered as GitHub does (`name`, `name-1`, ...)."""
    seen: dict[str, int] = {}
    result = set()
    for line in prose_lines(path.read_text(encoding="utf-8")):
        match = ATX_HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def relative_links(path: Path) -> list[str]:
    """The link targets of a markdown file that point into the repository (no URL scheme such as http: or mailto:)."""
    targets = []
    for line in prose_lines(path.read_text(encoding="utf-8")):
        line = CODE_SPAN.sub("code", line)  # a code span is literal text, never a link
        targets += [target for target in LINK.findall(line) if not SCHEME.match(target)]
    return targets


def broken_links(path: Path) -> list[str]:
    """One message per relative link of `path` whose file, or heading for `#anchor`, does not exist."""
    problems = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not file_part and not anchor:
            problems.append(f"{path.name}: empty link target")
        elif not linked.exists():
            problems.append(f"{path.name}: {target!r} -> no file {linked}")
        elif anchor and (linked.is_dir() or linked.suffix != ".md"):
            problems.append(f"{path.name}: {target!r} -> an anchor into {linked.name}, which is not a markdown file")
        elif anchor and anchor not in anchors(linked):
            problems.append(f"{path.name}: {target!r} -> no heading with anchor #{anchor} in {linked.name}")
    return problems


def test_docs_pages_exist():
    names = {page.name for page in PAGES}
    assert {
        "generation.md",
        "serving.md",
        "fine-tuning.md",
        "quantization.md",
        "scaling-out.md",
        "evaluation.md",
        "benchmarks.md",
        "reliability.md",
    } <= names, names


@pytest.mark.parametrize("path", [README, *PAGES], ids=lambda path: str(path.relative_to(ROOT)))
def test_relative_links_resolve(path):
    if path == README:
        assert relative_links(path), "the README links to no docs page"
    assert broken_links(path) == []


def test_link_checker_finds_broken_links(tmp_path):
    (tmp_path / "other.md").write_text(
        "# Other page\n\n## Serving throughput (`benchmarks/serve.py`)\n\n## Notes\n\n## Notes\n"
    )
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n"
        "[fine](other.md) [fine](other.md#serving-throughput-benchmarksservepy) [fine](other.md#notes-1) "
        "[fine](#page) [web](https://example.com/missing.md) `[code](missing.md)`\n\n"
        "```\n[in a code block](missing.md)\n```\n\n"
        "[missing file](missing.md) [missing anchor](other.md#nowhere) [third notes](other.md#notes-2) "
        "![missing picture](picture.png)\n"
    )
    assert relative_links(page) == [
        "other.md",
        "other.md#serving-throughput-benchmarksservepy",
        "other.md#notes-1",
        "#page",
        "missing.md",
        "other.md#nowhere",
        "other.md#notes-2",
        "picture.png",
    ]
    problems = broken_links(page)
    assert [problem.split(" -> ")[0] for problem in problems] == [
        "page.md: 'missing.md'",
        "page.md: 'other.md#nowhere'",
        "page.md: 'other.md#notes-2'",
        "page.md: 'picture.png'",
    ]


def test_github_slugs():
    assert github_slug("Decoding-loop overhead (`benchmarks/decode_overhead.py`)") == (
        "decoding-loop-overhead-benchmarksdecode_overheadpy"
    )
    assert github_slug("Decoding strategies: speed and quality") == "decoding-strategies-speed-and-quality"
    assert github_slug("LoRA on the **experts**") == "lora-on-the-experts"
    assert github_slug("See [serving](serving.md) — fast") == "see-serving--fast"


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; keep it to {MAX_README_LINES}"


def test_readme_starts_with_the_two_commands():
    """The first two code blocks, before any section, are the main job and the test command `.ci/run` runs."""
    ci_command = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    install, _, checks = ci_command.partition(" && .venv/bin/ruff check .")
    assert checks, f"the last line of .ci/run is not the install-ruff-pytest command: {ci_command!r}"
    main_job = install.replace('".[dev]"', '".[train]"') + " && .venv/bin/python examples/quickstart.py"
    assert (ROOT / "examples" / "quickstart.py").is_file()

    blocks, block, preamble = [], None, True
    for line in README.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            if block is None:
                block = []
            else:
                blocks.append("\n".join(block).strip())
                block = None
                if len(blocks) == 2:
                    break
        elif block is not None:
            block.append(line)
        elif line.startswith("## "):
            preamble = False
            break
    assert preamble and len(blocks) == 2, "the README must open with its two commands, before any section"
    assert blocks == [main_job, ci_command]
