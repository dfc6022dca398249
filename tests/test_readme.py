"""The README opens with the two commands, and CI runs the second one."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    assert text.index("```bash") < text.index("\n\n", text.index("# fxlora") + 1) + 3, "the commands come first"
    return [line for line in block.splitlines() if line.strip()]


def test_readme_opens_with_two_commands():
    first, second = readme_commands()
    assert first.startswith("pip install -e .") and "examples/custom_mlp.py" in first
    assert second.startswith('pip install -e ".[test]"') and "pytest" in second


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert readme_commands()[1] in ci
