"""The integration workflow (the slim variant of tests/cluster_workflow.py) run locally and through
the SLURM executor on the private one-node SLURM (tests/slurm_cluster.py, fake GPU): prints both wall
times and each run's job timeline (SLURM's start/end of every job; locally, the benchmark files'),
with the GPU jobs marked and the jobs that overlapped listed.

    .envs/core/bin/python bench/cluster.py [--cpus 2] [--keep DIR]

Needs slurm-wlm + munge (`make setup-slurm`) and root (it writes /etc/slurm/slurm.conf).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import cluster_workflow as cw  # noqa: E402
from slurm_cluster import OneNodeSlurm  # noqa: E402


def _timeline(rows, t0):
    for label, start, end, tag in sorted(rows, key=lambda r: (r[1], r[0])):
        bar = " " * int((start - t0) / 4) + "#" * max(1, int(round((end - start) / 4)))
        print(f"  {start - t0:6.0f} {end - t0:6.0f}  {tag:4} {label[:58]:58} {bar}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the SLURM node and local --cores")
    ap.add_argument("--keep", type=Path, help="keep the work dirs here")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="segrefine-bench-cluster-")) if args.keep is None else args.keep
    slurm_dir = cw.make_workdir(root / "slurm")
    local_dir = root / "local"
    shutil.copytree(slurm_dir, local_dir)

    local, local_s = cw.run_local(local_dir, cores=args.cpus)
    if local.returncode != 0:
        sys.exit(local.stdout[-4000:])
    with OneNodeSlurm(cpus=args.cpus, memory_mb=512000) as cluster:
        profile = cw.slurm_profile(root / "profile", args.cpus)
        slurm, slurm_s = cw.run_slurm(slurm_dir, profile)
        if slurm.returncode != 0:
            sys.exit(slurm.stdout[-4000:])
        run = cw.run_id(slurm.stdout)
        jobs = [j for j in cluster.jobs() if j["name"] == run]

    print(f"integration workflow (slim): {len(jobs)} jobs, {args.cpus} CPUs, 1 (fake) GPU")
    print(f"  local  (--cores {args.cpus} --resources gpu=1): {local_s:6.1f} s wall")
    print(f"  SLURM  (--profile profiles/slurm, one node):    {slurm_s:6.1f} s wall")

    rows = []
    for j in jobs:
        rule, wc = cw.job_rule(j["comment"])
        rows.append((f"{rule} {wc}".strip(), j["start"], j["end"], "GPU" if j["gres"] else "cpu"))
    t0 = min(r[1] for r in rows)
    print("\nSLURM timeline (s from first start; SLURM's StartTime/EndTime; GPU = asked for gres gpu:1):")
    _timeline(rows, t0)
    gpu = [r[:3] for r in rows if r[3] == "GPU"]
    cpu = [r[:3] for r in rows if r[3] == "cpu"]
    print(f"  GPU jobs overlapping each other: {cw.overlapping(gpu) or 'none'}")
    pairs = cw.overlapping(cpu)
    print(f"  CPU job pairs that overlapped: {len(pairs)}, e.g. {pairs[:3]}")

    bench = cw.benchmark_timeline(local_dir)
    if bench:
        t0 = min(r[1] for r in bench)
        print("\nlocal timeline of the jobs with a benchmark file (s from first start):")
        _timeline([(*r, "") for r in bench], t0)
    print(f"\nwork dirs: {root}")


if __name__ == "__main__":
    main()
