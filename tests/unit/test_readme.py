"""The README documents what the code does: the config reference and every CLI command."""

import re
from pathlib import Path

from instructkit.cli import build_parser
from instructkit.config import reference_markdown

README = (Path(__file__).parents[2] / "README.md").read_text()


def test_config_reference_matches_the_models():
    section = re.search(r"<!-- config-reference:start -->\n(.*?)\n<!-- config-reference:end -->", README, re.S)
    assert section, "README lost its config-reference markers"
    assert section.group(1) == reference_markdown(), "run `make readme-reference` to regenerate the README table"


def test_every_command_is_documented():
    commands = build_parser()._subparsers._group_actions[0].choices
    for name in commands:
        assert f"### `instructkit {name}" in README, name


def test_readme_opens_with_the_two_setup_commands():
    setup = README.split("## Set up", 1)[1].split("##", 1)[0]
    assert re.findall(r"^make (\w+)", setup, re.M) == ["demo", "test"]


def test_python_api_names_are_the_functions():
    import instructkit
    import instructkit.generate  # noqa: F401 - importing the submodule must not shadow the function

    from instructkit import evaluate, generate, load_config, train

    assert all(callable(f) and not hasattr(f, "__path__") and type(f).__name__ == "function"
               for f in (generate, train, evaluate, load_config))
    assert instructkit.generate is generate
