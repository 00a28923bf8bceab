"""Environments without conda: one virtualenv per ``envs/*.yaml``, built from that file.

The conda env files are the single source of truth. On HPC, Snakemake creates
them with conda (``--sdm conda``). Where conda is absent (a laptop, CI), this
module reads the same file -- its ``python=X.Y`` line and its ``pip:`` list --
and builds a virtualenv cached outside the clone, keyed by the file's content,
so editing an env file makes a new env and an unchanged file is reused in
seconds.

Only the standard library is used here: this runs before any env exists.
"""

from __future__ import annotations

import argparse
import fcntl
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

COMPLETE_MARKER = ".segrefine-env-complete"
REPO_ROOT = Path(__file__).resolve().parents[2]
ENVS_DIR = REPO_ROOT / "envs"


class EnvError(RuntimeError):
    """An env file that cannot be turned into a virtualenv, or an env not built yet."""


@dataclass
class EnvSpec:
    name: str
    path: Path
    python: str  # "3.11"
    pip: List[str] = field(default_factory=list)


def cache_root() -> Path:
    root = os.environ.get("SEGREFINE_ENV_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "segrefine" / "venvs"


def _strip_comment(line: str) -> str:
    # env files hold no '#' inside values, so everything after ' #' is a comment
    if line.lstrip().startswith("#"):
        return ""
    return re.sub(r"\s+#.*$", "", line).rstrip()


def parse_env_file(path: Path) -> EnvSpec:
    """Read the subset of conda's env-file YAML that our env files use.

    ``dependencies:`` may hold ``python=X.Y``, ``pip`` and one ``pip:`` list;
    anything else is a conda-only package that a virtualenv cannot provide, so
    it is refused with the file and line named.
    """
    path = Path(path)
    if not path.is_file():
        raise EnvError(f"{path}: env file not found")
    python = None
    pip: List[str] = []
    section = None
    in_pip = False
    pip_indent = -1
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = _strip_comment(raw)
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        text = line.strip()
        if indent == 0:
            section = text.split(":", 1)[0]
            in_pip = False
            continue
        if section != "dependencies":
            continue
        if in_pip and indent > pip_indent and text.startswith("- "):
            pip.append(text[2:].strip().strip("'\""))
            continue
        in_pip = False
        if not text.startswith("- "):
            raise EnvError(f"{path}:{lineno}: cannot read dependency line {raw!r}")
        item = text[2:].strip()
        if item == "pip:":
            in_pip, pip_indent = True, indent
        elif item == "pip":
            pass
        elif item.startswith("python"):
            m = re.fullmatch(r"python\s*=\s*(3\.\d+)(\.\*)?", item)
            if not m:
                raise EnvError(f"{path}:{lineno}: python must be pinned as 'python=3.X', got {item!r}")
            python = m.group(1)
        else:
            raise EnvError(
                f"{path}:{lineno}: {item!r} is a conda package; without conda only 'python', "
                "'pip' and the 'pip:' list can be installed -- move it to the pip list"
            )
    if python is None:
        raise EnvError(f"{path}: no 'python=3.X' line under dependencies")
    if not pip:
        raise EnvError(f"{path}: empty pip list")
    return EnvSpec(name=path.stem, path=path, python=python, pip=pip)


def env_key(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def env_dir(path: Path) -> Path:
    path = Path(path)
    return cache_root() / f"{path.stem}-{env_key(path)}"


def find_python(version: str) -> str:
    """An interpreter of exactly this minor version: on PATH, then in pyenv."""
    exe = shutil.which(f"python{version}")
    candidates = [exe] if exe else []
    pyenv_root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates += sorted(
        glob.glob(os.path.join(pyenv_root, "versions", f"{version}.*", "bin", f"python{version}")), reverse=True
    )
    for cand in candidates:
        try:
            out = subprocess.run(
                [cand, "-c", "import sys, venv; print('%d.%d' % sys.version_info[:2])"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            continue
        if out == version:
            return cand
    raise EnvError(
        f"no Python {version} interpreter found (looked on PATH and in {pyenv_root}/versions); "
        f"install Python {version} or use conda (snakemake --sdm conda)"
    )


def constraints_of(pip: List[str]) -> List[str]:
    """Exact pins become constraints so no transitive request can replace them
    (e.g. a package asking for 'torch' must not pull another torch build)."""
    out = []
    for req in pip:
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*==\s*([^\s;]+)", req)
        if m:
            out.append(f"{m.group(1)}=={m.group(3)}")
    return out


def env_python(name: str, envs_dir: Path = ENVS_DIR) -> Path:
    """Interpreter of the built env for ``envs/<name>.yaml``; a clear error if not built."""
    path = Path(envs_dir) / f"{name}.yaml"
    if not path.is_file():
        raise EnvError(f"{path}: env file not found")
    d = env_dir(path)
    if not (d / COMPLETE_MARKER).is_file():
        raise EnvError(
            f"the '{name}' env ({path}) is not built at {d}: run `make setup` "
            f"(or `python {Path(__file__).relative_to(REPO_ROOT)} build {name}`)"
        )
    return d / "bin" / "python"


def _run(cmd: List[str], log) -> None:
    log.write("$ " + " ".join(cmd) + "\n")
    log.flush()
    proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise EnvError(f"command failed ({proc.returncode}): {' '.join(cmd)}; see {log.name}")


def build(path: Path, quiet: bool = False) -> Path:
    """Build (or reuse) the virtualenv of one env file; returns its directory."""
    spec = parse_env_file(path)
    target = env_dir(spec.path)
    if (target / COMPLETE_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(str(target) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent build of the same env waits, then reuses
        if (target / COMPLETE_MARKER).is_file():
            return target
        if target.exists():  # an earlier build was killed midway
            shutil.rmtree(target)
        interpreter = find_python(spec.python)
        log_path = Path(str(target) + ".log")
        if not quiet:
            print(
                f"[segrefine-env] building '{spec.name}' (Python {spec.python}) at {target}; log: {log_path}",
                flush=True,
            )
        with open(log_path, "w") as log:
            _run([interpreter, "-m", "venv", str(target)], log)
            py = str(target / "bin" / "python")
            with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as cons:
                cons.write("\n".join(constraints_of(spec.pip)) + "\n")
            try:
                _run([py, "-m", "pip", "install", "--no-input", "-c", cons.name, *spec.pip], log)
            finally:
                os.unlink(cons.name)
        (target / COMPLETE_MARKER).write_text(f"{spec.path.name} {env_key(spec.path)}\n")
    return target


def editable_points_to(text: str, here: str) -> bool:
    """Whether an editable-install file (a .pth path line, or the finder's quoted package path) names exactly the
    folder ``here``: a clone at /check/work/main must not pass for one at /work/main (a substring)."""
    quoted = re.compile(r"""['"]""" + re.escape(here) + r"""(?:/segrefine)?/?['"]""")
    return bool(quoted.search(text)) or any(line.strip() == here for line in text.splitlines())


def install_project(name: str = "core") -> None:
    """Make the `segrefine` command of env ``name`` run this clone's package (editable install).

    The rules never rely on it (they put workflow_scripts on PYTHONPATH); it is
    for people running steps by hand. Re-done only when it points elsewhere.
    """
    target = env_dir(ENVS_DIR / f"{name}.yaml")
    here = str(REPO_ROOT / "workflow_scripts")
    marks = list(target.glob("lib/python*/site-packages/__editable__*segrefine*"))
    if any(editable_points_to(m.read_text(errors="ignore"), here) for m in marks if m.is_file()):
        return
    with open(str(target) + ".log", "a") as log:
        _run([str(target / "bin" / "python"), "-m", "pip", "install", "--no-deps", "-e", here], log)


PTH_NAME = "segrefine-workflow-scripts.pth"


def site_packages(target: Path) -> Path:
    found = sorted(Path(target).glob("lib/python3.*/site-packages"))
    if not found:
        raise EnvError(f"{target}: no lib/python3.*/site-packages (not a virtualenv?)")
    return found[0]


def link_package(name: str) -> Path:
    """Make ``python -m segrefine`` work in env ``name`` by hand: a .pth file in its site-packages naming this
    clone's workflow_scripts (the rules put workflow_scripts on PYTHONPATH, which comes first, so they never depend
    on it). Re-written only when it names another folder; no package is installed, so no env is rebuilt."""
    target = env_dir(ENVS_DIR / f"{name}.yaml")
    pth = site_packages(target) / PTH_NAME
    here = str(REPO_ROOT / "workflow_scripts")
    if not (pth.is_file() and pth.read_text().strip() == here):
        tmp = pth.with_name(f".{pth.name}.tmp")
        tmp.write_text(here + "\n")
        os.replace(tmp, pth)
    return pth


def link_envs(names: List[str], link_dir: Path) -> None:
    """Convenience links (``.envs/<name>``) from the clone to the cached envs."""
    link_dir.mkdir(exist_ok=True)
    for name in names:
        link = link_dir / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(env_dir(ENVS_DIR / f"{name}.yaml"))


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="segrefine-env", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the virtualenvs of the named env files (default: all)")
    b.add_argument("names", nargs="*", help="env names (envs/<name>.yaml)")
    b.add_argument("--link-dir", default=str(REPO_ROOT / ".envs"), help="where to put links to the envs")
    p = sub.add_parser("python", help="print the interpreter of a built env")
    p.add_argument("name")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "python":
            print(env_python(args.name))
            return 0
        names = args.names or sorted(p.stem for p in ENVS_DIR.glob("*.yaml"))
        for name in names:
            build(ENVS_DIR / f"{name}.yaml")
        if "core" in names:
            install_project("core")  # also the `segrefine` command
        for name in names:
            if name != "core":
                link_package(name)
        link_envs(names, Path(args.link_dir))
        print(f"[segrefine-env] ready: {', '.join(names)}", flush=True)
    except EnvError as exc:
        print(f"segrefine-env: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
