"""The project stays readable: a short README, history only in the changelog and git, small
modules and functions (DESIGN.md: "Docs for readers" and "Typed, small, documented").

Static and fast: it reads files, runs nothing.
"""
from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = [REPO / "runtime" / "cxr_infer", REPO / "hospital" / "cxr_hospital", REPO / "train" / "cxr_train",
            REPO / "export" / "cxr_export", REPO / "benchmarks" / "cxr_bench"]
README_MAX_LINES = 250
MODULE_MAX_LINES = 600
FUNCTION_MAX_LINES = 100

#: History told in prose: a date, an issue number, or a work session ("the seventh session").
HISTORY = [
    (re.compile(r"\b20\d\d-\d\d-\d\d\b"), "a date"),
    (re.compile(r"\bissues?\s+#?\d+|(?<![\w&])#\d{1,3}\b", re.IGNORECASE), "an issue number"),
    (re.compile(r"\b(this|that|next|last|earlier|previous|later|first|second|third|fourth|fifth|sixth|seventh|"
                r"eighth|ninth|tenth|several|six|seven)\s+sessions?\b", re.IGNORECASE), "a work session"),
]


def _modules() -> List[Path]:
    return sorted(p for pkg in PACKAGES for p in pkg.rglob("*.py"))


def _prose(markdown: str) -> Iterator[Tuple[int, str]]:
    """The lines of a Markdown text outside fenced code blocks (examples may show tool output)."""
    fenced = False
    for number, line in enumerate(markdown.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            yield number, line


def _history(lines: Iterator[Tuple[int, str]], where: str) -> List[str]:
    return [f"{where}:{n}: {what}: {line.strip()[:100]}" for n, line in lines for rx, what in HISTORY
            if rx.search(line)]


def test_readme_is_a_front_page():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"
    text = "\n".join(lines)
    assert "pip install . && cxr-infer runtime/cxr_infer/samples/" in text  # the main job, one command
    for page in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (REPO / page).is_file(), f"README.md links {page}, which does not exist"


@pytest.mark.parametrize("page", ["README.md", "CONTRIBUTING.md", "models/README.md"]
                         + sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").rglob("*.md")
                                  if p.name != "changelog.md"))
def test_history_lives_in_the_changelog_not_in_the_docs(page):
    found = _history(_prose((REPO / page).read_text()), page)
    assert not found, "\n".join(found)


def _comments_and_docstrings(path: Path) -> Iterator[Tuple[int, str]]:
    """The comment lines and docstring lines of a Python file (test data may hold dates)."""
    source = path.read_text()
    lines = source.splitlines()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            yield token.start[0], token.string
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
            yield from ((n, lines[n - 1]) for n in range(body[0].lineno, body[0].end_lineno + 1))


def test_history_lives_in_git_not_in_the_code():
    found = []
    for path in _modules():
        found += _history(enumerate(path.read_text().splitlines(), 1), str(path.relative_to(REPO)))
    for path in sorted((REPO / "tests").glob("*.py")) + sorted((REPO / "train").glob("*.py")):
        if path.name != Path(__file__).name:
            found += _history(_comments_and_docstrings(path), str(path.relative_to(REPO)))
    assert not found, "\n".join(found)


def test_modules_are_small_enough_to_read_in_one_sitting():
    big = [f"{p.relative_to(REPO)}: {n} lines" for p in _modules()
           if (n := len(p.read_text().splitlines())) > MODULE_MAX_LINES]
    assert not big, f"modules over {MODULE_MAX_LINES} lines:\n" + "\n".join(big)


def _is_argument_declaration(node: ast.AST) -> bool:
    """A function that is mostly argparse declarations (``add_argument``/``add_parser`` calls)."""
    calls = [n for n in ast.walk(node) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and n.func.attr in ("add_argument", "add_parser", "add_argument_group", "add_mutually_exclusive_group")]
    statements = [n for n in ast.walk(node) if isinstance(n, ast.stmt)]
    return len(calls) >= 0.4 * len(statements)


def test_functions_are_short():
    long = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > FUNCTION_MAX_LINES and not _is_argument_declaration(node):
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {length} lines")
    assert not long, f"functions over {FUNCTION_MAX_LINES} lines:\n" + "\n".join(long)


def test_the_site_lists_every_page():
    """mkdocs.yml's nav names every page of docs/ (mkdocs build --strict, run by CI, checks links)."""
    nav = (REPO / "mkdocs.yml").read_text()
    pages = sorted(str(p.relative_to(REPO / "docs")) for p in (REPO / "docs").rglob("*.md"))
    missing = [p for p in pages if f": {p}" not in nav]
    assert not missing, f"pages not in mkdocs.yml's nav: {missing}"
