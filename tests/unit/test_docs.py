"""The documentation cannot point at nothing: every link in README.md and docs/ leads to a file that exists and, with
an ``#anchor``, to a heading of that file; every ``README.md#...`` / ``docs/*.md#...`` named in the code, configs and
tests does too; and the README's list of logged metrics is the one the code logs (both ways).

Anchors are GitHub's: the heading lowercased, everything but letters, digits, spaces, ``-`` and ``_`` removed,
spaces turned into ``-``, a repeated heading suffixed ``-1``, ``-2``, ...
"""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target), ![alt](target)
NAMED_PAGE = re.compile(r"(?<![\w/.-])((?:\.\./)?(?:README\.md|docs/[\w-]+\.md))(#[\w-]+)?")  # in code and configs
BARE_README = re.compile(r"\bREADME\b(?!\.md)")  # "see README, Security": say which file#anchor instead
OTHER_PROJECT = re.compile(r"[\w-]+/[\w-]+ $")  # "kenjyoung/MinAtar README": another project's README


def without_code(text: str) -> str:
    """Markdown with fenced code blocks and inline code taken out (links there are examples, not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line in re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S).splitlines():
        heading = re.match(r"#{1,6} (.+)", line)
        if not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def broken(source: Path, target: str) -> str | None:
    """Why the link ``target`` written in ``source`` leads nowhere, or None."""
    if re.match(r"[a-z]+:", target):  # https:, mailto:
        return None
    file_part, _, anchor = target.partition("#")
    destination = (source.parent / file_part).resolve() if file_part else source
    if not destination.exists():
        return f"{target}: no file {destination.relative_to(REPO) if destination.is_relative_to(REPO) else destination}"
    if anchor and destination.suffix == ".md" and anchor not in anchors(destination):
        return f"{target}: no heading #{anchor} in {destination.relative_to(REPO)}"
    return None


@pytest.mark.parametrize("page", DOCS, ids=[str(p.relative_to(REPO)) for p in DOCS])
def test_every_link_of_the_docs_leads_somewhere(page):
    problems = [problem for target in LINK.findall(without_code(page.read_text()))
                if (problem := broken(page, target))]
    assert not problems, f"{page.relative_to(REPO)}: " + "; ".join(problems)


def tracked_text_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "*.py", "*.yaml", "*.md", "*.toml", "*.ipynb"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split()
    return [REPO / name for name in listed if (REPO / name).exists()]


def test_every_page_and_section_named_in_the_code_and_configs_exists():
    problems = []
    for path in tracked_text_files():
        if path.name == Path(__file__).name:  # its examples of broken links are meant to be broken
            continue
        text = path.read_text()
        for page, anchor in NAMED_PAGE.findall(text):
            if path.suffix == ".md":  # markdown files: their links are checked above; here the plain mentions
                continue
            if (problem := broken(REPO / "README.md", page.removeprefix("../") + anchor)) is not None:
                problems.append(f"{path.relative_to(REPO)}: {problem}")
        if path.suffix == ".md":
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if any(not OTHER_PROJECT.search(line[:m.start()]) for m in BARE_README.finditer(line)):
                problems.append(f"{path.relative_to(REPO)}:{number}: {line.strip()!r}: name the page and anchor "
                                "(README.md#security, docs/results.md#minatar), so that this test can check it")
    assert not problems, "\n".join(problems)


def test_the_anchor_rule_is_githubs():
    page = REPO / "README.md"
    assert "long-runs-stop-resume-extend-requeue" in anchors(page)  # "Long runs: stop, resume, extend, requeue"
    assert broken(page, "#no-such-section") == "#no-such-section: no heading #no-such-section in README.md"
    assert broken(page, "docs/nothing.md").startswith("docs/nothing.md: no file")


# --- the logged metrics ---------------------------------------------------------------------------------------

METRICS_SECTION = "## Seeing what the agent does"


def documented_metrics() -> set[str]:
    """Every backticked name in the first column of the README's metrics table."""
    text = (REPO / "README.md").read_text()
    section = text.split(METRICS_SECTION, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return {name for row in rows for name in re.findall(r"`([^`]+)`", row.split("|")[1])}


def string_constants(directory: Path) -> set[str]:
    found = set()
    for path in directory.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                found.add(node.value)
    return found


def test_every_documented_metric_is_a_name_the_code_logs():
    """The other way, every name logged being documented, is checked on a real run's W&B history:
    tests/integration/test_observability.py."""
    documented = documented_metrics()
    assert len(documented) >= 30 and "rho/ess" in documented and "episode/return" in documented
    in_code = string_constants(REPO / "lit_impala")

    def logged_somewhere(name: str) -> bool:  # "eval/return_mean", or f"{prefix}/return_mean" with prefix "eval"
        prefix, _, rest = name.rpartition("/")
        return name in in_code or (f"/{rest}" in in_code and prefix in in_code)

    missing = sorted(name for name in documented if not logged_somewhere(name))
    assert not missing, f"documented in the README but in no string of lit_impala/: {missing}"


# --- the configuration reference ------------------------------------------------------------------------------


def reference_rows(section: str) -> set[str]:
    """Every backticked name in the first column of the table under ``section`` in docs/configuration.md."""
    text = (REPO / "docs" / "configuration.md").read_text()
    table = text.split(section, 1)[1].split("\n\n`", 1)[0].split("\n\n", 2)[1]
    return {name for line in table.splitlines() if line.startswith("| `")
            for name in re.findall(r"`([^`]+)`", line.split("|")[1])}


@pytest.mark.parametrize(("section", "target"), [
    ("`model:`", "lit_impala.learner.ImpalaModule"),
    ("`data:`", "lit_impala.data.ImpalaDataModule"),
    ("`episode_stats:`", "lit_impala.callbacks.EpisodeStats"),
    ("`trainer.callbacks:` `lit_impala.callbacks.EvaluationCallback`", "lit_impala.callbacks.EvaluationCallback"),
])
def test_the_configuration_reference_lists_every_argument_and_no_other(section, target):
    import importlib
    import inspect

    module_name, _, class_name = target.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    arguments = set(inspect.signature(cls.__init__).parameters) - {"self"}
    if class_name == "ImpalaModule":
        arguments -= {"observation_shape", "action_space", "observation_parts"}  # linked from the env by the CLI
    documented = reference_rows(section)
    assert arguments == documented, (f"docs/configuration.md {section}: missing {sorted(arguments - documented)}, "
                                     f"not an argument {sorted(documented - arguments)}")


# A file the docs name in backticks: `lit_impala/cli.py`, `core/losses.py` (in lit_impala), `tests/unit/test_docs.py`.
NAMED_FILE = re.compile(r"`((?:lit_impala|tests|benchmarks|configs|core|actors|callbacks|envs)/[\w/.-]+\.(?:py|yaml))`")


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_every_file_the_docs_name_exists(page):
    missing = []
    for name in sorted(set(NAMED_FILE.findall(page.read_text()))):
        top = name.split("/", 1)[0]
        path = REPO / "lit_impala" / name if top in ("core", "actors", "callbacks", "envs") else REPO / name
        if not path.is_file():
            missing.append(name)
    assert not missing, f"{page.name} names files that do not exist: {missing}"
