import os
import subprocess
import textwrap

import pytest
import yaml

from conftest import REPO
from segrefine import envs

ENVS = REPO / "envs"


@pytest.mark.parametrize("path", sorted((REPO / "envs").glob("*.yaml")), ids=lambda p: p.stem)
def test_env_files_read_the_same_as_conda_would(path):
    """Our stdlib reader agrees with a real YAML parser on every env file."""
    spec = envs.parse_env_file(path)
    doc = yaml.safe_load(path.read_text())
    deps = doc["dependencies"]
    pip = next(d["pip"] for d in deps if isinstance(d, dict))
    python = next(d for d in deps if isinstance(d, str) and d.startswith("python"))
    assert spec.pip == pip
    assert python == f"python={spec.python}"
    assert all("==" in p for p in pip), "env files pin every package exactly"
    assert "conda-forge" in doc["channels"]


def test_constraints_keep_exact_pins_only():
    assert envs.constraints_of(["torch==2.13.0", "numpy>=2", "stereopy[all]==1.6.0"]) == [
        "torch==2.13.0",
        "stereopy==1.6.0",
    ]


def _write(tmp_path, text):
    p = tmp_path / "x.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def test_conda_only_package_is_refused_with_file_and_line(tmp_path):
    p = _write(
        tmp_path,
        """\
        name: x
        dependencies:
          - python=3.11
          - cudatoolkit=11.8
          - pip:
              - numpy==2.0.0
        """,
    )
    with pytest.raises(envs.EnvError, match=r"x.yaml:4: 'cudatoolkit=11.8' is a conda package"):
        envs.parse_env_file(p)


def test_missing_python_pin_is_refused(tmp_path):
    p = _write(
        tmp_path,
        """\
        name: x
        dependencies:
          - pip:
              - numpy==2.0.0
        """,
    )
    with pytest.raises(envs.EnvError, match="no 'python=3.X' line"):
        envs.parse_env_file(p)


def test_env_dir_is_keyed_by_content(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGREFINE_ENV_CACHE", str(tmp_path / "cache"))
    p = _write(tmp_path, "name: x\ndependencies:\n  - python=3.11\n  - pip:\n      - a==1\n")
    first = envs.env_dir(p)
    p.write_text(p.read_text().replace("a==1", "a==2"))
    assert envs.env_dir(p) != first
    assert first.parent == tmp_path / "cache"


def test_unbuilt_env_error_says_how_to_build(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGREFINE_ENV_CACHE", str(tmp_path / "empty"))
    with pytest.raises(envs.EnvError, match="make setup"):
        envs.env_python("core")


def test_built_envs_are_the_ones_of_the_current_files():
    """make test builds every env first: each env file's interpreter exists and runs."""
    for path in sorted((REPO / "envs").glob("*.yaml")):
        py = envs.env_python(path.stem)
        assert py.is_file(), py


def test_editable_install_check_names_the_exact_clone():
    """A clone at /check/work/main installed into the shared env cache must not count as this clone at
    /work/main (a substring of it): the `segrefine` command would import the other clone's package."""
    from segrefine.envs import editable_points_to

    finder = "MAPPING: dict[str, str] = {'segrefine': '/check/work/main/workflow_scripts/segrefine'}"
    assert not editable_points_to(finder, "/work/main/workflow_scripts")
    assert editable_points_to(finder, "/check/work/main/workflow_scripts")
    assert editable_points_to("/work/main/workflow_scripts\n", "/work/main/workflow_scripts")
    assert not editable_points_to("/check/work/main/workflow_scripts\n", "/work/main/workflow_scripts")


@pytest.mark.parametrize("name", sorted(p.stem for p in ENVS.glob("*.yaml")))
def test_by_hand_commands_work_in_every_env(name, tmp_path):
    """README 'Running steps by hand': `.envs/<env>/bin/python -m segrefine <step> --help` from any folder, with no
    PYTHONPATH, runs this clone's package (the core env by its editable install, the others by a .pth file)."""
    from segrefine.envs import COMPLETE_MARKER, PTH_NAME, env_dir, site_packages

    target = env_dir(ENVS / f"{name}.yaml")
    if not (target / COMPLETE_MARKER).is_file():
        pytest.skip(f"env {name} not built here")
    if name != "core":
        assert (site_packages(target) / PTH_NAME).read_text().strip() == str(REPO / "workflow_scripts")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [str(target / "bin" / "python"), "-c", "import segrefine, segrefine.cli; print(segrefine.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str(REPO / "workflow_scripts" / "segrefine" / "__init__.py")
