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


def slim_config():
    cfg = yaml.safe_load((REPO / "config" / "test" / "config.yaml").read_text())
    cfg.pop("base_models", None)
    cfg["models"] = {
        "tiny": {"framework": "cellpose", "pretrained": "none", "seed": 0,
                 "hyperparameters": {"n_epochs": 2, "bsize": 96}},
        "baseline": {"framework": "classical", "pretrained": "none"},
    }
    seg = cfg.setdefault("segmentation", {})
    seg.update({"model": "baseline", "stage": "finetuned"})
    if isinstance(seg.get("tiling"), dict):
        seg["tiling"]["shards"] = 2
    cfg["patches"]["candidates"]["activate"] = False
    cfg["expression"]["activate"] = False
    if isinstance(cfg.get("evaluation"), dict) and "modes" in cfg["evaluation"]:
        cfg["evaluation"]["modes"] = ["standard"]
    return cfg


def make_workdir(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "config" / "test" / "samples.tsv", d / "samples.tsv")
    (d / "config.yaml").write_text(yaml.safe_dump(slim_config(), sort_keys=False))
    subprocess.run([core_python(), "-m", "segrefine", "demo-data", "--out", str(d / "demo"), "--sn", "TINY01",
                    "--size", "384", "--patches", "4", "--patch-size", "96"],
                   env=dict(os.environ, PYTHONPATH=str(SCRIPTS)), check=True, capture_output=True)
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
    cmd = [core_python(), "-m", "snakemake", *map(str, args), "-s", str(REPO / "Snakefile"),
           "--configfile", config]
    env = dict(os.environ, PYTHONPATH=str(SCRIPTS))
    if popen:
        return subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, **popen)
    return subprocess.run(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)


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
        for b in intervals[i + 1:]:
            if max(a[1], b[1]) < min(a[2], b[2]):
                out.append((a[0], b[0]))
    return out
