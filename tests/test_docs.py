"""README.md and docs/*.md stay honest: every relative link (and anchor) resolves, every command
named exists, every option written beside a command is in that command's `--help`, every
repository path and module in backticks exists; docs/layout.md lists every module,
docs/store.md every table, docs/manifests.md every manifest field.

The checks work on the text of a page and return what is wrong, so the last tests can plant a
broken link, an unknown command or option and a missing path, and see each one caught.
"""

from __future__ import annotations

import importlib
import re
from functools import cache
from pathlib import Path

import pytest
from typer.testing import CliRunner

from selm_data.manifest import Manifest
from selm_data.store.schema import TABLES

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PAGES = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]
TOP = {"selm_data", "selm_train", "manifests", "bench", "tests", "docs", ".ci"}  # tracked dirs
PROGRAMS = {"selm-data": "selm_data.cli", "selm_data.cli": "selm_data.cli",
            "selm-train": "selm_train.cli", "selm_train.cli": "selm_train.cli"}

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
SPAN = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*$", re.M)
MENTION = re.compile(r"(?<![\w.-])(selm-data|selm-train|selm_data\.cli|selm_train\.cli)"
                     r"((?:\s+[a-z][a-z_-]*)*)(.*)")
FLAG = re.compile(r"(?<![\w-])--[a-z][\w-]*")
MODULE = re.compile(r"(?:selm_data|selm_train)(?:\.[A-Za-z_]\w*)+")


def prose(text: str) -> str:
    """The page without its fenced code blocks (a link or heading there is not one)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation out, spaces to -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    found: set[str] = set()
    for heading in HEADING.findall(prose(text)):
        base, n = slug(heading), 0
        while (name := base if n == 0 else f"{base}-{n}") in found:
            n += 1
        found.add(name)
    return found


def link_problems(page: Path, text: str) -> list[str]:
    """Relative links whose file (or #anchor in a .md file) does not exist."""
    bad = []
    for target in LINK.findall(SPAN.sub("", prose(text))):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists() or not file.is_relative_to(REPO):
            bad.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text("utf-8")):
            bad.append(f"{target}: no heading #{anchor} in {file.relative_to(REPO)}")
    return bad


@cache
def help_text(module: str, words: tuple[str, ...]) -> tuple[int, str]:
    app = importlib.import_module(module).app
    result = CliRunner().invoke(app, [*words, "--help"], env={"COLUMNS": "200"})
    return result.exit_code, result.output


def resolve(module: str, words: list[str]) -> tuple[str, ...] | None:
    """The command path `words` starts with (`build`, `sources check`), or None if none exists."""
    path: tuple[str, ...] = ()
    for word in words:
        code, out = help_text(module, (*path, word))
        if code != 0:
            return None
        path = (*path, word)
        if "Commands" not in out:  # a command, not a group: the rest are its arguments
            return path
    return path or None


def commands(text: str) -> list[tuple[str, list[str], list[str]]]:
    """(program, words after it, options written beside it) for each command a page names.

    Beside it: after it in the same code span or code-block line, or, in a table row whose first
    cell names the command, in a span of the row that is only options (`--shard i/k`).
    """
    found = []

    def mentions(chunk: str) -> list[tuple[str, list[str], list[str]]]:
        out = []
        for m in MENTION.finditer(chunk):
            out.append((m.group(1), m.group(2).split(), FLAG.findall(m.group(3))))
        return out

    for lang, block in FENCE.findall(text):
        if lang not in ("python", "yaml", "json"):
            for line in block.splitlines():
                found += mentions(line.split(" #")[0])
    for line in prose(text).splitlines():
        spans = SPAN.findall(line)
        if line.startswith("|"):
            first = re.split(r"(?<!\\)\|", line)[1]
            row = [m for s in SPAN.findall(first) for m in mentions(s)]
            for span in spans:
                if row and span.startswith("--") and "selm" not in span:
                    found.append((row[0][0], row[0][1], FLAG.findall(span)))
        for span in spans:
            found += mentions(span)
    return found


def command_problems(text: str) -> list[str]:
    bad = []
    for program, words, flags in commands(text):
        module = PROGRAMS[program]
        path = resolve(module, words) if words else ()
        if path is None:
            bad.append(f"{program} {' '.join(words)}: no such command")
            continue
        out = help_text(module, path)[1]
        bad += [f"{program} {' '.join(path)} {flag}: not in its --help" for flag in flags
                if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", out)]
    return bad


def path_problems(text: str) -> list[str]:
    """Repository paths (`selm_data/store/schema.py`) and modules (`selm_train.cli`) in
    backticks or code blocks that do not exist."""
    chunks = SPAN.findall(prose(text))
    chunks += [b for lang, b in FENCE.findall(text) if lang not in ("python", "yaml", "json")]
    bad = []
    for token in (t.lstrip("(['\"").rstrip(".,;:)]'\"") for c in chunks for t in c.split()):
        if "/" in token and token.split("/")[0] in TOP and not re.search(r"\.\.\.|[<>*{}]", token):
            if not (REPO / token).exists():
                bad.append(f"{token}: no such file")
        elif MODULE.fullmatch(token) and not importable(token):
            bad.append(f"{token}: no such module or name")
    return bad


def importable(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_links_resolve(page):
    assert link_problems(page, page.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_commands_and_options_exist(page):
    assert command_problems(page.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_paths_and_modules_exist(page):
    assert path_problems(page.read_text(encoding="utf-8")) == []


def test_the_pages_name_commands():
    """The command checks see the tables and code blocks (they are not vacuous)."""
    named = {(p, tuple(w[:1])) for page in PAGES for p, w, _ in commands(page.read_text("utf-8"))}
    for word in ("build", "export", "lineage", "inspect", "diff", "push", "sources", "eval",
                 "compare", "winrates", "init", "status", "log", "verify"):
        assert ("selm-data", (word,)) in named
    for word in ("plan", "train", "loop"):
        assert ("selm-train", (word,)) in named


def test_layout_lists_every_module_and_room():
    text = (DOCS / "layout.md").read_text(encoding="utf-8")
    listed = set(SPAN.findall(text))
    for package in ("selm_data", "selm_train"):
        for path in sorted((REPO / package).rglob("*.py")):
            rel = path.relative_to(REPO)
            name = f"{rel.parent}/" if path.name == "__init__.py" else str(rel)
            if rel == Path("selm_data/__init__.py"):
                name = str(rel)  # the facade has its own line
            assert name in listed, f"docs/layout.md does not list {name}"


def test_benchmarks_page_lists_every_script():
    text = (DOCS / "benchmarks.md").read_text(encoding="utf-8")
    for script in sorted((REPO / "bench").glob("*.py")):
        assert f"`bench/{script.name}`" in text


def test_index_lists_every_page_and_the_readme_links_the_index():
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    for page in DOCS.glob("*.md"):
        assert page.name == "index.md" or f"]({page.name})" in index
    assert "](docs/index.md)" in (REPO / "README.md").read_text(encoding="utf-8")


def test_readme_is_a_front_door():
    assert len((REPO / "README.md").read_text(encoding="utf-8").splitlines()) <= 120


@pytest.mark.parametrize("text, problem", [
    ("See [the store](store.md#no-such-heading).", "no heading #no-such-heading"),
    ("See [the store](nowhere.md).", "nowhere.md: no such file"),
    ("Run `selm-data build --iter 1 --no-such-flag`.", "build --no-such-flag: not in its --help"),
    ("| `selm-data export --iter N` | `--shuffle` shuffles |", "export --shuffle: not in its"),
    ("```bash\nselm-train fly --iter 1\n```", "selm-train fly: no such command"),
    ("```bash\nselm-data sources check x --splits\n```", "sources check --splits: not in"),
    ("The schema: `selm_data/schema.py`.", "selm_data/schema.py: no such file"),
    ("Call `selm_data.store.store.no_such_name`.", "no_such_name: no such module or name"),
])
def test_the_checks_catch_what_they_guard(text, problem):
    found = (link_problems(DOCS / "index.md", text) + command_problems(text)
             + path_problems(text))
    assert any(problem in p for p in found), found


def test_good_text_passes_the_checks():
    text = ("See [the store](store.md#idempotency) and `selm_data/store/schema.py`.\n"
            "| `selm-data build --iter N` | `--shard i/k` builds a shard |\n"
            "```bash\nselm-data sources check x --split train  # a comment --not-a-flag\n```\n")
    text = text.replace("#idempotency", "")
    assert link_problems(DOCS / "index.md", text) == []
    assert command_problems(text) == []
    assert path_problems(text) == []


def first_column(page: str, header: str) -> list[str]:
    """The backticked names in the first column of the table whose header row starts `header`."""
    lines = (DOCS / page).read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows += SPAN.findall(re.split(r"(?<!\\)\|", line)[1])
    return rows


def test_store_page_lists_every_table():
    assert first_column("store.md", "| table |") == list(TABLES)


def test_manifests_page_lists_every_field():
    assert sorted(first_column("manifests.md", "| field |")) == sorted(Manifest.model_fields)
