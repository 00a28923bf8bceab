"""Style: ruff, with the rules of the clone's pyproject.toml, finds nothing in the library, the benches and the
tests (`make lint` runs the same check, then `snakemake --lint`)."""
import subprocess
import sys

from conftest import REPO


def ruff(*args, cwd=REPO):
    # the core env (the one pytest runs in) holds ruff, pinned in envs/core.yaml
    cmd = [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def test_ruff_finds_nothing_in_the_tree():
    proc = ruff("workflow_scripts", "bench", "tests")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


def test_the_configured_rules_apply(tmp_path):
    """The check above is not vacuous: pyproject.toml's rules report an unused import, a line over 120 characters
    and a closure over a loop variable, and leave a 120-character line alone."""
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n"
                   "x = '" + "a" * 130 + "'\n"
                   "y = '" + "a" * 114 + "'\n"
                   "fs = []\n"
                   "for i in range(3):\n"
                   "    def f():\n"
                   "        return i\n"
                   "    fs.append(f)\n")
    proc = ruff("--config", REPO / "pyproject.toml", bad.name, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    found = {line.split()[1] for line in proc.stdout.splitlines() if line.startswith("bad.py:")}
    assert found == {"F401", "E501", "B023"}, proc.stdout
    assert "bad.py:2:121: E501" in proc.stdout and "bad.py:3:" not in proc.stdout
