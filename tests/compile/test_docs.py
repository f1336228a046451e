"""The README's options table and test command are the ones the code and CI use."""

import re
from pathlib import Path

from dyllm_compile.config import option_names

ROOT = Path(__file__).resolve().parents[2]


def test_readme_documents_every_option():
    readme = (ROOT / "README.md").read_text()
    table = set(re.findall(r"^\| `(\w+)` \|", readme, flags=re.M))
    assert table == set(option_names())


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"# set up and run the tests\n(.+)\n", readme).group(1).strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert command in ci.splitlines()
