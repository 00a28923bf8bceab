"""The integration workflow, slimmed for the cluster and restart tests and bench/cluster.py.

`make_workdir` writes the tiny demo (`segrefine demo-data`, as tests/test_workflow.py does) and a
config derived from config/test/config.yaml: the classical model (CPU jobs) and one Cellpose model
from scratch with 2 epochs (GPU jobs: its fine-tuning and evaluations), whole-slide segmentation
with the classical model in 2 shards (CPU jobs that may run side by side), no expression/candidates.
`slurm_profile` copies profiles/slurm with the overrides a user of this one-node test cluster
makes (status by squeue, threads capped to the node's CPUs); nothing else of the profile changes.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "workflow_scripts"
TARGETS = ("results/evaluation/summary.csv", "results/segmentation/TINY01/labels.tif")
GPU_RULES = ("train_base", "finetune", "evaluate", "segment_shard")  # rules that may declare gpu=1


def core_python():
    import sys

    sys.path.insert(0, str(SCRIPTS))
    from segrefine.envs import env_python

    return str(env_python("core"))


def slim_config(tiling: dict | None = None):
    cfg = yaml.safe_load((REPO / "config" / "test" / "config.yaml").read_text())
    cfg.pop("base_models", None)
    cfg["models"] = {
        "tiny": {
            "framework": "cellpose",
            "pretrained": "none",
            "seed": 0,
            "hyperparameters": {"n_epochs": 2, "bsize": 96},
        },
        "baseline": {"framework": "classical", "pretrained": "none"},
    }
    seg = cfg.setdefault("segmentation", {})
    seg.update({"model": "baseline", "stage": "finetuned"})
    if isinstance(seg.get("tiling"), dict):
        seg["tiling"]["shards"] = 2
        seg["tiling"].update(tiling or {})
    cfg["patches"]["candidates"]["activate"] = False
    cfg["expression"]["activate"] = False
    if isinstance(cfg.get("evaluation"), dict) and "modes" in cfg["evaluation"]:
        cfg["evaluation"]["modes"] = ["standard"]
    return cfg


def make_workdir(d: Path, size: int = 384, tiling: dict | None = None) -> Path:
    """The slim workflow on a `size` px demo slide; `tiling` overrides segmentation.tiling (e.g. tile_size)."""
    d.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "config" / "test" / "samples.tsv", d / "samples.tsv")
    (d / "config.yaml").write_text(yaml.safe_dump(slim_config(tiling), sort_keys=False))
    subprocess.run(
        [
            core_python(),
            "-m",
            "segrefine",
            "demo-data",
            "--out",
            str(d / "demo"),
            "--sn",
            "TINY01",
            "--size",
            str(size),
            "--patches",
            "4",
            "--patch-size",
            "96",
        ],
        env=dict(os.environ, PYTHONPATH=str(SCRIPTS)),
        check=True,
        capture_output=True,
    )
    return d


def slurm_profile(dest: Path, cpus: int, extra_set_resources: dict | None = None) -> Path:
    """profiles/slurm for the one-node test cluster: `slurm-status-command: squeue` (no accounting),
    short first status check, logs kept for the timeline, threads capped to the node's CPUs."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in (REPO / "profiles" / "slurm").iterdir():
        shutil.copy(f, dest / f.name)
    prof = yaml.safe_load((dest / "config.yaml").read_text())
    prof["slurm-status-command"] = "squeue"
    prof["slurm-init-seconds-before-status-checks"] = 1
    prof["seconds-between-status-checks"] = 1
    prof["slurm-keep-successful-logs"] = True
    prof["set-threads"] = {rule: min(int(n), cpus) for rule, n in prof.get("set-threads", {}).items()}
    for rule, res in (extra_set_resources or {}).items():
        prof.setdefault("set-resources", {}).setdefault(rule, {}).update(res)
    (dest / "config.yaml").write_text(yaml.safe_dump(prof, sort_keys=False))
    return dest


def snakemake(workdir: Path, *args, timeout=900, config="config.yaml", **popen):
    cmd = [core_python(), "-m", "snakemake", *map(str, args), "-s", str(REPO / "Snakefile"), "--configfile", config]
    env = dict(os.environ, PYTHONPATH=str(SCRIPTS))
    if popen:  # a background driver; stdout= a file keeps a long run from filling the pipe
        popen.setdefault("stdout", subprocess.PIPE)
        return subprocess.Popen(cmd, cwd=workdir, env=env, stderr=subprocess.STDOUT, text=True, **popen)
    return subprocess.run(
        cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
    )


def run_local(workdir: Path, *args, cores=2, gpus=1):
    t = time.monotonic()
    proc = snakemake(workdir, *TARGETS, *args, "--cores", cores, "--resources", f"gpu={gpus}")
    return proc, time.monotonic() - t


def run_slurm(workdir: Path, profile: Path, *args):
    t = time.monotonic()
    proc = snakemake(workdir, *TARGETS, *args, "--profile", profile)
    return proc, time.monotonic() - t


def run_id(output: str) -> str:
    m = re.search(r"SLURM run ID: (\S+)", output)
    return m.group(1) if m else ""


def job_rule(comment: str) -> tuple[str, str]:
    """(rule, wildcards) from the plugin's job comment `rule_<rule>[_wildcards_<values>]`."""
    m = re.match(r"rule_(\w+?)(?:_wildcards_(.*))?$", comment)
    return (m.group(1), m.group(2) or "") if m else (comment, "")


def benchmark_timeline(workdir: Path):
    """(label, start, end) of the local jobs that write a benchmark (start = file mtime - wall time)."""
    import csv

    rows = []
    for f in sorted((workdir / "benchmarks").rglob("*.tsv")):
        with open(f) as fh:
            rec = next(csv.DictReader(fh, delimiter="\t"))
        end = f.stat().st_mtime
        rows.append((str(f.relative_to(workdir / "benchmarks").with_suffix("")), end - float(rec["s"]), end))
    return rows


def overlapping(intervals):
    """Pairs of (label, start, end) intervals that overlap in time."""
    out = []
    for i, a in enumerate(intervals):
        for b in intervals[i + 1 :]:
            if max(a[1], b[1]) < min(a[2], b[2]):
                out.append((a[0], b[0]))
    return out


# --- whole-slide segmentation killed midway (tests/test_restart.py, tests/test_slurm.py) -----------------------------
# A 1536 px demo slide in 64 px tiles (32 px halo): 576 tiles, 450 in tissue, 225 per shard. A shard with
# the classical model predicts ~25 tiles/s on a quiet 2-core machine (~10 s per shard), long enough for
# a poll every 50 ms to land a kill in the middle of a shard even when the machine is 4x slower.
TILED_SLIDE = 1536
TILED_TILING = {"tile_size": 64}
TILED_SAMPLE = "TINY01"
TILED_TARGET = f"results/segmentation/{TILED_SAMPLE}/labels.tif"
TILED_PLAN = f"results/segmentation/{TILED_SAMPLE}/tiles.tsv"
TILED_CARD = "results/models/baseline/finetuned/card.json"  # the segmentation model (slim_config)
_TILED: dict = {}


def tiled_base(tmp_path_factory) -> Path:
    """A work dir with everything before the shards done (trainset, classical model's card, tile plan), made
    once per test session; tests copy it (metadata included) and run the tiled inference from there."""
    if "base" not in _TILED:
        d = make_workdir(tmp_path_factory.mktemp("tiled_base"), size=TILED_SLIDE, tiling=TILED_TILING)
        proc = snakemake(d, TILED_PLAN, TILED_CARD, "--cores", 2, "--resources", "gpu=1")
        assert proc.returncode == 0, proc.stdout[-4000:]
        _TILED["base"] = d
    return _TILED["base"]


def tiled_copy(tmp_path_factory, name: str) -> Path:
    d = tmp_path_factory.mktemp(name) / "work"
    shutil.copytree(tiled_base(tmp_path_factory), d, symlinks=True)
    return d


def tiled_reference(tmp_path_factory) -> Path:
    """The same tiled inference run once without interruption (local, --cores 2), once per session."""
    if "reference" not in _TILED:
        d = tiled_copy(tmp_path_factory, "tiled_reference")
        t = time.monotonic()
        proc = snakemake(d, TILED_TARGET, "--cores", 2, "--resources", "gpu=1")
        assert proc.returncode == 0, proc.stdout[-4000:]
        _TILED["reference"] = d
        _TILED["reference_s"] = time.monotonic() - t
    return _TILED["reference"]


def seg_dir(workdir: Path) -> Path:
    return workdir / "results" / "segmentation" / TILED_SAMPLE


def shard_tiles(workdir: Path) -> dict:
    """{shard: set of its tile file names} from the tile plan."""
    import pandas as pd

    plan = pd.read_csv(workdir / TILED_PLAN, sep="\t")
    plan = plan[plan["shard"] >= 0]
    return {int(k): {f"tile{int(t):06d}.npz" for t in g["tile_id"]} for k, g in plan.groupby("shard")}


def tiles_written(workdir: Path) -> set:
    tiles = seg_dir(workdir) / "tiles"
    return {n for n in os.listdir(tiles) if n.startswith("tile") and n.endswith(".npz")} if tiles.is_dir() else set()


def start_driver(workdir: Path, *args) -> subprocess.Popen:
    """Snakemake for TILED_TARGET in the background, in its own session (so its process group can be
    killed as a lost login session would), its output in <workdir>/driver.log."""
    with open(workdir / "driver.log", "w") as out:
        return snakemake(workdir, TILED_TARGET, *args, start_new_session=True, stdout=out)


def kill_mid_shard(proc, workdir: Path, min_fraction: float = 0.25, timeout: float = 900):
    """Wait until one shard has finished (shards/<k>.json) and another has written at least
    `min_fraction` but not all of its tiles; then SIGKILL the driver's whole process group (the driver
    must run with start_new_session=True). Returns (finished shard, interrupted shard, its tiles
    written at the kill, seconds waited). Fails with the driver's output if the moment never comes."""
    import signal

    per_shard = shard_tiles(workdir)
    shards = seg_dir(workdir) / "shards"
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout and proc.poll() is None:
        names = tiles_written(workdir)
        done = [k for k in per_shard if (shards / f"{k}.json").exists()]
        for k in per_shard:
            n = len(names & per_shard[k])
            if done and k not in done and min_fraction * len(per_shard[k]) <= n < len(per_shard[k]):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return done[0], k, n, time.monotonic() - t0
        time.sleep(0.05)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(
        f"no moment with one shard finished and another midway within {timeout} s "
        f"(driver exit {proc.wait()}):\n{(workdir / 'driver.log').read_text()[-4000:]}"
    )


def file_state(workdir: Path) -> dict:
    """{path relative to workdir: (st_mtime_ns, st_ino)} of every file under results/."""
    out = {}
    for p in (workdir / "results").rglob("*"):
        try:
            st = p.stat()
        except FileNotFoundError:  # a temporary file renamed meanwhile (a job still writing)
            continue
        if stat.S_ISREG(st.st_mode):
            out[str(p.relative_to(workdir))] = (st.st_mtime_ns, st.st_ino)
    return out


def is_temporary(rel: str) -> bool:
    """Temporary names of atomic writes (segrefine.io.atomic_path: `.<name>.<random>.part<suffix>`)."""
    return ".part" in Path(rel).name


def readable(path: Path) -> None:
    """Raise if a file under a final name is not whole (the formats the workflow writes)."""
    import json

    import pandas as pd
    import tifffile

    if path.suffix in (".tif", ".tiff"):
        tifffile.imread(path)
    elif path.suffix == ".json":
        json.loads(path.read_text())
    elif path.suffix in (".csv", ".tsv"):
        pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",")
    elif path.suffix == ".npz" and path.parent.name == "tiles":  # a tile result: the labels decompress to their shape
        import sys

        sys.path.insert(0, str(SCRIPTS))
        from segrefine.tiling import read_tile

        read_tile(path)
    elif path.suffix == ".npz":  # any other archive: every array loads
        import numpy as np

        with np.load(path, allow_pickle=False) as d:
            for k in d.files:
                d[k]


def dry_run_plan(stdout: str) -> tuple[dict, list]:
    """({rule: job count}, [shard wildcard of every planned segment_shard job]) of a dry run's output."""
    stats = stdout.split("Job stats:")[-1].split("Reasons:")[0] if "Job stats:" in stdout else ""  # the last table
    counts = {}
    for line in stats.splitlines()[3:]:
        parts = line.split()
        if len(parts) == 2 and parts[0] != "total" and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    shards = sorted(int(m) for m in re.findall(r"wildcards: sample=\w+, shard=(\d+)", stdout))
    return counts, shards


def shard_log_line(workdir: Path, shard: int) -> str:
    """The shard's `shard K: N tiles, M already done, R to predict` line from its step log."""
    text = (workdir / "logs" / "segment" / f"{TILED_SAMPLE}.shard{shard}.log").read_text()
    m = re.search(rf"shard {shard}: \d+ tiles, \d+ already done, \d+ to predict", text)
    return m.group(0) if m else text[-2000:]
