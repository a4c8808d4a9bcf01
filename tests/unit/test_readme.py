"""The README documents what the code does: the config reference and every CLI command."""

import re
from pathlib import Path

from instructkit.cli import build_parser
from instructkit.config_reference import reference_markdown

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


def test_python_api_names_are_the_functions_and_modules_stay_modules():
    import importlib
    import types

    from instructkit.api import build_report, evaluate, generate, load_config, load_for_inference, train

    assert all(isinstance(f, types.FunctionType) for f in (build_report, evaluate, generate, load_config,
                                                            load_for_inference, train))
    for name in ("train", "generate", "evaluate"):
        module = importlib.import_module(f"instructkit.{name}")
        import instructkit

        assert getattr(instructkit, name) is module  # `import instructkit.train as tr` is the module
