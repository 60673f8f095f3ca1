"""The README's two commands are the contract; CI must run exactly the test one."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text)


def test_readme_opens_with_two_commands_and_ci_runs_the_test_one() -> None:
    commands = _commands()
    assert len(commands) >= 2
    main_job, tests = commands[0], commands[1]
    assert "pip install torch==2.13.0" in main_job and "pip install torch==2.13.0" in tests
    assert "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci, "the CI script must run the README's test command verbatim"
