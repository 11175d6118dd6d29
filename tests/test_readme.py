"""The README stays true: its configuration table is the settings object's, and it
names the two commands that CI and newcomers run."""

from pathlib import Path

from worker.cli import settings_table

README = (Path(__file__).parents[1] / "README.md").read_text()


def test_configuration_table_matches_the_settings_object():
    assert settings_table() in README, "README's configuration table is stale: paste `modworker config` output"


def test_readme_gives_the_two_commands_and_ci_runs_the_test_one():
    assert "\nmake demo\n" in README and "\nmake test\n" in README
    ci = (Path(__file__).parents[1] / ".ci" / "run").read_text()
    assert "make test" in ci
