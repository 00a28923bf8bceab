"""The integration workflow through the SLURM executor on a real (private, one-node) SLURM with a fake
GPU: every GPU job asks SLURM for a GPU and CPU jobs for none, SLURM never runs two GPU jobs at once,
CPU jobs run side by side, a job killed for its memory is resubmitted with more, and the outputs
equal those of a local run. SLURM's own record of each job (`scontrol show job`: partition, GPU
request, memory, start and end) is the evidence.

Needs slurm-wlm + munge (`make setup-slurm`) and root (the cluster writes /etc/slurm/slurm.conf).
Where they are missing the test is skipped with the reason; under CI (CI=true) it fails.
"""

import json
import os
import shutil
import subprocess
import time

import numpy as np
import pandas as pd
import pytest
import tifffile

import cluster_workflow as cw
from slurm_cluster import OneNodeSlurm, SlurmUnavailable

pytestmark = pytest.mark.slow  # a private SLURM cluster and whole workflow runs

CPUS = 2  # CPUs per job (the profile's threads, capped to this machine's 2 cores)
# The node declares 4 CPUs (slurmd's config_overrides): two GPU jobs' CPU requests fit at once, so
# only the one GPU keeps them apart.
NODE_CPUS = 4
# evaluation_summary is given 20 MB on its first attempt: SLURM kills it for its memory (enforced by
# JobAcctGatherParams=OverMemoryKill on the test node); the retry (`attempt` 2) gets 100x more.
OOM_RULE = "evaluation_summary"
OOM_MEM = "20 * 100 ** (attempt - 1)"


@pytest.fixture(scope="module")
def cluster():
    try:
        c = OneNodeSlurm(cpus=NODE_CPUS, memory_mb=512000).start()
    except SlurmUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"SLURM test cluster unavailable under CI: {exc}")
        pytest.skip(f"SLURM test cluster unavailable: {exc}")
    yield c
    c.stop()


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory):
    """The same workflow run on SLURM and locally (separate work dirs, same seeded demo)."""
    root = tmp_path_factory.mktemp("cluster")
    slurm_dir = cw.make_workdir(root / "slurm")
    local_dir = root / "local"
    shutil.copytree(slurm_dir, local_dir)
    profile = cw.slurm_profile(root / "profile", CPUS, {OOM_RULE: {"mem_mb": OOM_MEM}})
    slurm, slurm_s = cw.run_slurm(slurm_dir, profile)
    assert slurm.returncode == 0, slurm.stdout[-4000:] + "\n--- SLURM daemons ---\n" + cluster.logs()[-1500:]
    run = cw.run_id(slurm.stdout)
    jobs = [j for j in cluster.jobs() if j["name"] == run]
    local, local_s = cw.run_local(local_dir)
    assert local.returncode == 0, local.stdout[-6000:]
    return {"slurm_dir": slurm_dir, "local_dir": local_dir, "slurm": slurm, "jobs": jobs, "times": (slurm_s, local_s)}


def _expects_gpu(rule, wildcards):
    # finetune/evaluate of the Cellpose model ask for a GPU; of the classical model, none;
    # whole-slide segmentation uses the classical model here (CPU shards)
    return rule in ("finetune", "evaluate") and wildcards.startswith("tiny")


def test_every_job_went_through_slurm(runs):
    rules = {cw.job_rule(j["comment"])[0] for j in runs["jobs"]}
    assert {
        "annotated_patch",
        "convert_annotation",
        "trainset",
        "finetune",
        "evaluate",
        "segment_shard",
        "stitch",
        "evaluation_summary",
    } <= rules
    failed = [j for j in runs["jobs"] if j["state"] != "COMPLETED"]
    assert [cw.job_rule(j["comment"])[0] for j in failed] == [OOM_RULE], failed  # only the memory kill below


def test_gpu_jobs_ask_for_a_gpu_and_cpu_jobs_for_none(runs):
    gpu_jobs = 0
    for j in runs["jobs"]:
        rule, wc = cw.job_rule(j["comment"])
        if _expects_gpu(rule, wc):
            gpu_jobs += 1
            assert j["gres"] == "gres:gpu:1" and j["partition"] == "gpu", j
            assert j["cpus"] == CPUS, j  # cpus_per_gpu = the rule's threads
        else:
            assert j["gres"] == "" and j["partition"] == "cpu", j
    assert gpu_jobs == 3  # finetune tiny, evaluate tiny pretrained + finetuned


def test_slurm_never_ran_two_gpu_jobs_at_once_but_ran_cpu_jobs_side_by_side(runs):
    gpu, cpu, gpu_queued = [], [], []
    for j in runs["jobs"]:
        rule, wc = cw.job_rule(j["comment"])
        (gpu if _expects_gpu(rule, wc) else cpu).append((j["comment"], j["start"], j["end"]))
        if _expects_gpu(rule, wc):
            gpu_queued.append((j["comment"], j["submit"], j["end"]))
    assert cw.overlapping(gpu) == []
    assert cw.overlapping(gpu_queued), "no two GPU jobs were ever in SLURM's queue together"
    assert cw.overlapping(cpu), "no two CPU jobs ran at the same time"


def test_out_of_memory_job_is_reported_and_resubmitted_with_more_memory(runs):
    attempts = sorted((j for j in runs["jobs"] if cw.job_rule(j["comment"])[0] == OOM_RULE), key=lambda j: j["start"])
    # without accounting (squeue) SLURM reports a memory kill as FAILED; slurmstepd says why in the job's log
    assert [j["state"] for j in attempts] == ["FAILED", "COMPLETED"]
    assert [j["mem"] for j in attempts] == ["20M", "2000M"]
    first = attempts[0]["id"]
    slurm_log = runs["slurm_dir"] / ".snakemake" / "slurm_logs" / f"rule_{OOM_RULE}" / f"{first}.log"
    assert "exceeded memory limit" in slurm_log.read_text()
    out = runs["slurm"].stdout
    assert f"SLURM-job '{first}' failed" in out and str(slurm_log) in out  # reported with its log path
    summary = pd.read_csv(runs["slurm_dir"] / "results" / "run_summary.tsv", sep="\t", dtype=str)
    row = summary[summary["rule"] == OOM_RULE].iloc[0]
    assert row["status"] == "succeeded on retry" and row["failed_attempts"] == "1"
    # slurmstepd's first line is `Exceeded job memory limit` or `StepId=N.batch exceeded memory limit (…)`,
    # whichever its memory monitor writes first
    assert str(slurm_log) in row["log"] and "exceeded" in row["reason"].lower() and "memory limit" in row["reason"]


def test_outputs_equal_a_local_run(runs):
    s, loc = runs["slurm_dir"] / "results", runs["local_dir"] / "results"
    pd.testing.assert_frame_equal(
        pd.read_csv(s / "evaluation" / "summary.csv"), pd.read_csv(loc / "evaluation" / "summary.csv")
    )
    a = tifffile.imread(s / "segmentation" / "TINY01" / "labels.tif")
    b = tifffile.imread(loc / "segmentation" / "TINY01" / "labels.tif")
    assert a.shape == (384, 384) and a.max() > 0
    np.testing.assert_array_equal(a, b)
    assert (s / "trainset" / "trainset.tsv").read_text() == (loc / "trainset" / "trainset.tsv").read_text()


# --- the driver killed in the middle of tiled inference -------------------------------------------------------------
# The classical model's shards are CPU jobs; here they ask for the one (fake) GPU, as the shards of every
# GPU model do, so SLURM runs them one after the other (like K shards on fewer GPUs): the kill then
# finds one shard finished and the other midway, as in tests/test_restart.py.
SHARD_AS_GPU_JOB = {"segment_shard": {"gpu": 1}}
LIVE = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING")


def _wait(check, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout} s")


def _kill_driver_mid_shard(cluster, d, profile, min_fraction=0.25):
    """SIGKILL the driver when one shard job has finished and the other has written at least
    `min_fraction` of its tiles; the shard job, a SLURM job, is not the driver's child and keeps
    running. Returns (finished shard, interrupted shard, tiles it had written, the run id, its job)."""
    proc = cw.start_driver(d, "--profile", profile)
    done, cut, n_kill, _ = cw.kill_mid_shard(proc, d, min_fraction)
    run = cw.run_id((d / "driver.log").read_text())
    live = [j for j in cluster.jobs() if j["name"] == run and j["state"] in LIVE]
    cut_job = [j for j in live if cw.job_rule(j["comment"]) == ("segment_shard", f"{cw.TILED_SAMPLE}_{cut}")]
    # the interrupted shard's job lives on (the finished shard's job may still be ending its job step)
    assert len(cut_job) == 1 and {cw.job_rule(j["comment"])[0] for j in live} == {"segment_shard"}, live
    # Snakemake touches a job's outputs once its step ends (dag.check_and_touch_output, in the SLURM
    # job): the finished shard's record has its final mtime only when its job has ended
    done_job = ("segment_shard", f"{cw.TILED_SAMPLE}_{done}")
    _wait(
        lambda: (
            not [
                j
                for j in cluster.jobs()
                if j["name"] == run and j["state"] in LIVE and cw.job_rule(j["comment"]) == done_job
            ]
        ),
        120,
        "the finished shard's job did not end",
    )
    return done, cut, n_kill, run, cut_job[0]


def _check_rerun(d, reference, done, before, log_line=None, cut=None):
    """The rerun touched no file recorded before (the finished shard's record and tiles), the shard's
    log says `log_line`, and the labels and cell table equal the uninterrupted reference run's."""
    seg = f"results/segmentation/{cw.TILED_SAMPLE}"
    after = cw.file_state(d)
    kept = {k: v for k, v in before.items() if not cw.is_temporary(k) and "run_summary" not in k}
    assert f"{seg}/shards/{done}.json" in kept
    changed = sorted(k for k, v in kept.items() if after.get(k) != v)
    assert not changed, f"finished files redone or replaced: {changed[:10]}"
    if log_line:
        assert cw.shard_log_line(d, cut) == log_line
    ref = reference / seg
    np.testing.assert_array_equal(tifffile.imread(d / seg / "labels.tif"), tifffile.imread(ref / "labels.tif"))
    pd.testing.assert_frame_equal(pd.read_csv(d / seg / "cells.csv"), pd.read_csv(ref / "cells.csv"))


def test_killed_driver_mid_shard_cancel_unlock_rerun(cluster, tmp_path_factory):
    """What docs/cluster.md tells a user: cancel the dead run's jobs, unlock, run again. The resubmitted
    shard job predicts only the tiles the cancelled job had not finished."""
    reference = cw.tiled_reference(tmp_path_factory)  # local, uninterrupted
    d = cw.tiled_copy(tmp_path_factory, "tiled_slurm_cancel")
    profile = cw.slurm_profile(d.parent / "profile", CPUS, SHARD_AS_GPU_JOB)
    per_shard = cw.shard_tiles(d)
    t0 = time.monotonic()
    done, cut, n_kill, run, orphan = _kill_driver_mid_shard(cluster, d, profile)
    # the orphan keeps predicting after its driver died
    _wait(lambda: len(cw.tiles_written(d) & per_shard[cut]) > n_kill, 300, "the orphan shard job wrote no tile")

    assert subprocess.run(["scancel", "--name", run], capture_output=True).returncode == 0
    _wait(
        lambda: not [j for j in cluster.jobs() if j["name"] == run and j["state"] in LIVE],
        120,
        "the cancelled job is still alive",
    )
    (state,) = [j["state"] for j in cluster.jobs() if j["id"] == orphan["id"]]
    assert state == "CANCELLED"
    time.sleep(2)
    before = cw.file_state(d)
    assert before == cw.file_state(d)  # nothing writes any more
    n_before = len(cw.tiles_written(d) & per_shard[cut])
    assert n_kill < n_before < len(per_shard[cut])
    seg = f"results/segmentation/{cw.TILED_SAMPLE}"
    assert f"{seg}/shards/{cut}.json" not in before and f"{seg}/labels.tif" not in before
    for rel in before:
        if not cw.is_temporary(rel):
            cw.readable(d / rel)

    assert cw.snakemake(d, "--unlock").returncode == 0
    plan = cw.snakemake(d, cw.TILED_TARGET, "-n", "--profile", profile)  # the profile has rerun-incomplete
    assert plan.returncode == 0, plan.stdout[-3000:]
    assert cw.dry_run_plan(plan.stdout) == ({"segment_shard": 1, "stitch": 1}, [cut]), plan.stdout[-3000:]
    rerun = cw.snakemake(d, cw.TILED_TARGET, "--profile", profile)
    assert rerun.returncode == 0, rerun.stdout[-4000:] + "\n--- SLURM daemons ---\n" + cluster.logs()[-1500:]
    rerun_jobs = {cw.job_rule(j["comment"]) for j in cluster.jobs() if j["name"] == cw.run_id(rerun.stdout)}
    assert rerun_jobs == {("segment_shard", f"{cw.TILED_SAMPLE}_{cut}"), ("stitch", cw.TILED_SAMPLE)}, rerun_jobs
    n = len(per_shard[cut])
    _check_rerun(
        d, reference, done, before, f"shard {cut}: {n} tiles, {n_before} already done, {n - n_before} to predict", cut
    )
    stats = json.loads((d / seg / "shards" / f"{cut}.json").read_text())
    assert (stats["tiles_resumed"], stats["tiles_computed"]) == (n_before, n - n_before)
    print(
        f"SLURM, cancel: shard {cut} killed at {n_kill}, cancelled at {n_before}/{n} tiles; kill, cancel and "
        f"rerun {time.monotonic() - t0:.0f} s"
    )


def test_killed_driver_mid_shard_rerun_while_the_orphan_job_runs(cluster, tmp_path_factory):
    """The user does not cancel: unlock and rerun at once while the dead run's shard job still runs.
    Either the orphan is still running when the rerun plans (the shard's output is marked incomplete):
    the resubmitted job waits for the GPU the orphan holds, then finds every tile done; or the orphan
    finished first (its job step recorded the shard complete): the rerun only stitches. Either way no
    finished file is touched and the outputs equal the uninterrupted run's."""
    reference = cw.tiled_reference(tmp_path_factory)
    d = cw.tiled_copy(tmp_path_factory, "tiled_slurm_orphan")
    profile = cw.slurm_profile(d.parent / "profile", CPUS, SHARD_AS_GPU_JOB)
    per_shard = cw.shard_tiles(d)
    t0 = time.monotonic()
    # killed as soon as the first shard finished, so that the orphan (running or still queued for the
    # GPU) has its whole shard left when the rerun starts
    done, cut, n_kill, run, orphan = _kill_driver_mid_shard(cluster, d, profile, min_fraction=0)
    before = cw.file_state(d)  # the orphan still adds tiles; none of these may change

    assert cw.snakemake(d, "--unlock").returncode == 0
    rerun = cw.snakemake(d, cw.TILED_TARGET, "--profile", profile)
    assert rerun.returncode == 0, rerun.stdout[-4000:] + "\n--- SLURM daemons ---\n" + cluster.logs()[-1500:]
    jobs = {j["id"]: j for j in cluster.jobs()}
    orphan = jobs[orphan["id"]]
    assert orphan["state"] == "COMPLETED"  # the dead run's job finished its shard
    new = [j for j in jobs.values() if j["name"] == cw.run_id(rerun.stdout)]
    new_shard = [j for j in new if cw.job_rule(j["comment"])[0] == "segment_shard"]
    n = len(per_shard[cut])
    assert len(cw.tiles_written(d) & per_shard[cut]) == n
    if new_shard:  # resubmitted while the orphan ran: it waited for the GPU, then predicted nothing
        assert len(new_shard) == 1 and new_shard[0]["start"] >= orphan["end"], (new_shard, orphan)
        _check_rerun(d, reference, done, before, f"shard {cut}: {n} tiles, {n} already done, 0 to predict", cut)
        what = f"resubmitted shard job {new_shard[0]['id']} waited for the orphan {orphan['id']}, 0 tiles predicted"
    else:  # the orphan finished before the rerun planned: only the stitch ran
        assert [cw.job_rule(j["comment"])[0] for j in new] == ["stitch"], new
        _check_rerun(d, reference, done, before)
        what = f"the orphan {orphan['id']} finished first; the rerun only stitched"
    print(
        f"SLURM, orphan left running (killed at {n_kill}/{n} tiles): {what}; kill and rerun "
        f"{time.monotonic() - t0:.0f} s"
    )
