"""Style: ruff, with the rules of the clone's pyproject.toml, finds nothing in the library, the benches and the
tests, ruff format would change nothing there, and snakefmt, with its settings there, would change nothing in the
Snakefile and rules/*.smk (`make lint` runs the same checks, then `snakemake --lint`, which tests/test_workflow.py
runs on the test config)."""

import subprocess
import sys

from conftest import REPO
from segrefine.envs import env_python


def ruff(*args, cwd=REPO):
    # the core env (the one pytest runs in) holds ruff, pinned in envs/core.yaml
    cmd = [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def ruff_format(*args, cwd=REPO):
    cmd = [sys.executable, "-m", "ruff", "format", "--no-cache", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def test_ruff_finds_nothing_in_the_tree():
    proc = ruff("workflow_scripts", "bench", "tests")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


def test_ruff_format_would_change_nothing():
    proc = ruff_format("--check", "workflow_scripts", "bench", "tests")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("files already formatted"), proc.stdout


def test_ruff_format_reads_the_clone_settings(tmp_path):
    """The check above is not vacuous: with pyproject.toml's settings a 120-character call is left alone, a
    136-character one is split, and single quotes become double quotes."""
    (tmp_path / "fits.py").write_text("f(" + ", ".join(['"aaaaaaaa"'] * 9) + ', "aaaaaaa")\n')
    (tmp_path / "long.py").write_text("f(" + ", ".join(['"aaaaaaaa"'] * 10) + ', "aaaaaaaaaaa")\n')
    (tmp_path / "quotes.py").write_text("x = 'a'\n")
    assert [len(p.read_text()) - 1 for p in sorted(tmp_path.glob("*.py"))] == [120, 136, 7]
    config = ("--config", REPO / "pyproject.toml")
    assert ruff_format(*config, "--check", "fits.py", cwd=tmp_path).returncode == 0
    proc = ruff_format(*config, "--diff", "long.py", "quotes.py", cwd=tmp_path)
    assert '+    "aaaaaaaa",' in proc.stdout and '+x = "a"' in proc.stdout, proc.stdout + proc.stderr


def test_the_configured_rules_apply(tmp_path):
    """The check above is not vacuous: pyproject.toml's rules report an unused import, a line over 120 characters
    and a closure over a loop variable, and leave a 120-character line alone."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import os\n"
        "x = '" + "a" * 130 + "'\n"
        "y = '" + "a" * 114 + "'\n"
        "fs = []\n"
        "for i in range(3):\n"
        "    def f():\n"
        "        return i\n"
        "    fs.append(f)\n"
    )
    proc = ruff("--config", REPO / "pyproject.toml", bad.name, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    found = {line.split()[1] for line in proc.stdout.splitlines() if line.startswith("bad.py:")}
    assert found == {"F401", "E501", "B023"}, proc.stdout
    assert "bad.py:2:121: E501" in proc.stdout and "bad.py:3:" not in proc.stdout


def snakefmt(*args, cwd=REPO):
    # snakefmt lives in its own env (envs/lint.yaml), built by make setup
    cmd = [str(env_python("lint")), "-m", "snakefmt", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def test_snakefmt_would_change_nothing():
    proc = snakefmt("--check", "Snakefile", "rules")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    n_files = 1 + len(list((REPO / "rules").glob("*.smk")))
    assert f"All {n_files} file(s) would be left unchanged" in proc.stderr, proc.stderr


def test_snakefmt_reads_the_clone_settings(tmp_path):
    """The check above is not vacuous: with pyproject.toml's line length (120, as ruff's), a 112-character line is
    left alone and a 124-character one is wrapped; with snakefmt's own default (88) the 112-character line is not."""
    items = ", ".join(['"aaaaaaaa"'] * 9)
    (tmp_path / "fits.smk").write_text(f"x = [{items}]\n")
    (tmp_path / "long.smk").write_text(f'x = [{items}, "aaaaaaaa"]\n')
    assert [len(p.read_text()) - 1 for p in sorted(tmp_path.glob("*.smk"))] == [112, 124]
    config = ("--config", REPO / "pyproject.toml")
    assert snakefmt(*config, "--check", "fits.smk", cwd=tmp_path).returncode == 0
    proc = snakefmt(*config, "--diff", "long.smk", cwd=tmp_path)
    assert '+     "aaaaaaaa",' in proc.stdout, proc.stdout + proc.stderr
    assert snakefmt("--check", "fits.smk", cwd=tmp_path).returncode == 1  # no pyproject.toml in tmp_path: 88
