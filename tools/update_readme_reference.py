"""Rewrite the README's config reference table from the pydantic models (`make readme-reference`)."""

import re
from pathlib import Path

from instructkit.config_reference import reference_markdown

README = Path(__file__).parents[1] / "README.md"
PATTERN = re.compile(r"(<!-- config-reference:start -->\n).*?(<!-- config-reference:end -->)", re.S)

text = README.read_text()
if not PATTERN.search(text):
    raise SystemExit("README.md has no <!-- config-reference:start/end --> markers")
README.write_text(PATTERN.sub(lambda m: m.group(1) + reference_markdown() + "\n" + m.group(2), text))
print("README.md config reference updated")
