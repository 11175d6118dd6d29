"""The README and the docs stay true: their commands parse, their settings exist, their
links resolve, the configuration table is the settings object's, the policy example is a
policy that decides as the page says, and no page tells the project's history."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from worker.cli import build_parser, settings_table
from worker.config import settings_reference

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = {"README.md": README, **{f"docs/{p.name}": p.read_text() for p in DOCS}}
WRITTEN_FOR_NEWCOMERS = ("README.md", "docs/contract.md", "docs/configuration.md", "docs/policy.md")


def test_readme_gives_the_two_commands_and_ci_runs_the_test_one():
    assert "\nmake demo\n" in README and "\nmake test\n" in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


def test_readme_reads_in_ten_minutes():
    assert len(README.splitlines()) <= 300


def modworker_commands(text: str) -> list[str]:
    """Every ``modworker ...`` command of a page: lines of its code blocks and inline code."""
    commands = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("modworker "):
                commands.append(line)
    prose = re.sub(r"```.*?```", "", text, flags=re.S).replace("\n", " ")
    commands += [span for span in re.findall(r"`([^`]+)`", prose) if span.startswith("modworker ")]
    return commands


@pytest.mark.parametrize("page", WRITTEN_FOR_NEWCOMERS)
def test_every_modworker_command_on_the_page_is_one_the_cli_accepts(page):
    commands = modworker_commands(PAGES[page])
    if page == "README.md":
        assert len(commands) >= 10
        for needed in ("modworker produce events.jsonl --topic ugc.content", "modworker run",
                       "modworker tail moderation.verdicts", "modworker config check"):  # fmt: skip
            assert needed in commands, needed
    for command in commands:
        argv = shlex.split(re.sub(r"\s+", " ", command))[1:]
        argv = [arg for arg in argv if arg not in ("...",)]
        if argv == ["--version"]:
            continue
        try:
            build_parser(argv).parse_args(argv)
        except SystemExit as exit_:
            pytest.fail(f"{page}: `{command}` is not a valid command line (exit {exit_.code})")


def test_the_readme_s_example_consumer_exists_with_the_flags_it_shows():
    example = ROOT / "examples" / "verdict_consumer.py"
    shown = re.search(r"python examples/verdict_consumer\.py (.*)", README).group(1).split()
    source = example.read_text()
    for flag in (arg for arg in shown if arg.startswith("-")):
        assert f'"{flag}"' in source, flag
    assert (ROOT / "examples" / "node-consumer" / "verdict-consumer.mjs").is_file()
    assert (ROOT / "contracts" / "pyproject.toml").is_file()


MISSPELLED = "MODWORKER_BATCH__MAXSIZE"
"""The misspelling the configuration page shows as an example of a warning."""

SETTING_NAMES = {env.split(" (or ")[-1].rstrip(")") for env, _, _ in settings_reference()}


@pytest.mark.parametrize("page", WRITTEN_FOR_NEWCOMERS)
def test_every_setting_a_page_names_exists(page):
    named = set(re.findall(r"MODWORKER_[A-Z0-9_]*[A-Z0-9]", PAGES[page])) - {MISSPELLED}
    assert named
    unknown = sorted(name for name in named if not any(real.startswith(name) for real in SETTING_NAMES))
    assert unknown == [], f"{page} names settings that do not exist"


def slug(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@pytest.mark.parametrize("page", ["README.md", *[f"docs/{p.name}" for p in DOCS]])
def test_every_relative_link_resolves(page):
    base = (ROOT / page).parent
    for target in re.findall(r"\]\(([^)\s]+)\)", PAGES[page]):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (base / path) if path else ROOT / page
        assert resolved.exists(), f"{page}: link to {target} resolves to nothing"
        if anchor and resolved.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", resolved.read_text(), re.M)
            assert anchor in {slug(h) for h in headings}, f"{page}: no heading #{anchor} in {path or page}"


HISTORY = re.compile(r"\bissues? #?\d+|\bthe (fault )?issue\b|\bissue's\b|before these changes|\bused to\b", re.I)


@pytest.mark.parametrize("page", list(PAGES))
def test_no_page_tells_the_project_s_history_or_names_issues(page):
    found = [match.group(0) for match in HISTORY.finditer(PAGES[page])]
    assert found == [], f"{page}: product docs describe the product as it is ({found[:3]})"


# -- generated and example content ----------------------------------------------------------


def test_the_configuration_page_s_table_is_the_settings_object_s():
    page = PAGES["docs/configuration.md"]
    assert page.endswith(settings_table() + "\n"), (
        "docs/configuration.md is stale: run `modworker config reference --write docs/configuration.md`"
    )


def test_the_policy_page_s_complete_example_decides_as_the_page_says(tmp_path):
    from worker.pipeline.policy import Policy

    block = re.search(r"```yaml\n(.*?)```", PAGES["docs/policy.md"], re.S).group(1)
    path = tmp_path / "policy.yaml"
    path.write_text(block)
    policy = Policy.load(path)
    for scores, tenant, source, action in [
        ({"sexual": 0.3}, None, None, "allow"),
        ({"sexual": 0.3}, "kids-app", None, "block"),
        ({"pii": 0.4}, None, None, "allow"),
        ({"pii": 0.4}, "kids-app", "chat", "block"),
        ({"health": 0.8}, None, "health-forum", "allow"),
        ({"dangerous": 0.6}, None, None, "block"),
        ({"weapons": 0.6}, None, None, "flag"),
        ({"weapons": 0.6}, "kids-app", None, "review"),
        ({"jailbreaking": 0.95}, None, None, "allow"),
    ]:
        assert policy.decide(scores, tenant=tenant, source=source).action == action, (scores, tenant, source)
    top_keys = set(re.findall(r"^([a-z_]+):", block, re.M))
    assert top_keys == {"categories", "aliases", "default", "overrides", "cascade"}  # every key of the format


def test_the_readme_s_dsa_example_is_a_complete_dsa_section_of_the_built_in_policy():
    from worker.pipeline.policy import Policy
    from worker.pipeline.statements import dsa_problem

    block = next(b for b in re.findall(r"```yaml\n(.*?)```", README, re.S) if b.startswith("dsa:"))
    document = Policy.load(None).document()
    document["dsa"] = yaml.safe_load(block)["dsa"]
    policy = Policy.from_mapping(document)
    assert dsa_problem(policy) is None
    assert policy.dsa is not None and len(policy.dsa.territorial_scope.of(None)) == 27
