"""Restart and faults, locally, at job granularity: the driver killed (SIGKILL to its whole process
group, as a lost node or session would) in the middle of a long job; `--unlock` and a rerun finish
without redoing completed jobs, and nothing half-written is left under a final name. The same in the
middle of tiled inference (tile_plan -> segment_shard x 2 -> stitch): killed when one shard has
finished and the other has written part of its tiles, the rerun redoes only the interrupted shard,
predicts only its missing tiles, touches no finished file and gives the labels and cell table of an
uninterrupted run (the same under SLURM: tests/test_slurm.py). A sample whose
image is broken fails; with keep-going the other samples finish, and results/run_summary.tsv (and
the printed summary) says which job failed, where its log is and why."""

import json
import os
import signal
import time

import numpy as np
import pandas as pd
import pytest
import tifffile

import cluster_workflow as cw
from segrefine.runsummary import parse_errors, summarize_run

KILLED = "results/models/tiny/finetuned/card.json"  # the long job (Cellpose fine-tuning) the kill hits


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return cw.make_workdir(tmp_path_factory.mktemp("restart"))


def _outputs(d):
    """{path: mtime} of every file under results/."""
    return {str(p.relative_to(d)): p.stat().st_mtime_ns for p in (d / "results").rglob("*") if p.is_file()}


_readable = cw.readable


@pytest.mark.slow
def test_killed_driver_rerun_finishes_without_redoing_completed_jobs(workdir):
    proc = cw.snakemake(workdir, *cw.TARGETS, "--cores", 2, "--resources", "gpu=1", start_new_session=True)
    log = workdir / "logs" / "finetune" / "tiny.log"
    deadline = time.monotonic() + 600
    while not log.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert proc.poll() is None, "the run ended before the fine-tuning started:\n" + proc.stdout.read()[-3000:]
    time.sleep(1)  # the fine-tuning is running
    assert not (workdir / KILLED).exists()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()

    before = _outputs(workdir)
    assert KILLED not in before
    assert any(k.startswith("results/trainset/") for k in before)  # work finished before the kill
    for rel in before:
        if ".part" not in rel:  # temporary files of atomic writes may stay; final names must be whole
            _readable(workdir / rel)

    # a killed driver leaves its lock: unlock, then the plan holds only what did not finish
    assert cw.snakemake(workdir, "--unlock").returncode == 0
    plan = cw.snakemake(workdir, *cw.TARGETS, "-n", "--rerun-incomplete", "--cores", 2)
    assert plan.returncode == 0, plan.stdout[-3000:]
    planned = {
        line.split()[0]
        for line in plan.stdout.split("Job stats:")[1].split("Reasons:")[0].splitlines()[3:]
        if line.strip() and not line.startswith("total")
    }
    assert "finetune" in planned
    assert not planned & {"annotated_patch", "convert_annotation", "trainset", "pretrained_card"}, planned

    rerun = cw.snakemake(workdir, *cw.TARGETS, "--rerun-incomplete", "--cores", 2, "--resources", "gpu=1")
    assert rerun.returncode == 0, rerun.stdout[-5000:]
    after = _outputs(workdir)
    unchanged = {k: v for k, v in before.items() if ".part" not in k and k in after and "run_summary" not in k}
    assert unchanged and all(after[k] == v for k, v in unchanged.items()), "a completed job was redone"
    assert (workdir / KILLED).exists()
    assert "Nothing to be done" in cw.snakemake(workdir, *cw.TARGETS, "-n", "--cores", 2).stdout


@pytest.mark.slow
def test_driver_killed_mid_shard_rerun_predicts_only_the_missing_tiles(tmp_path_factory):
    reference = cw.tiled_reference(tmp_path_factory)  # the same inference, uninterrupted
    d = cw.tiled_copy(tmp_path_factory, "tiled_kill")  # trainset, model and tile plan done
    per_shard = cw.shard_tiles(d)
    t0 = time.monotonic()
    proc = cw.start_driver(d, "--cores", 2, "--resources", "gpu=1")  # threads 2: one shard after the other
    done, cut, n_cut, _ = cw.kill_mid_shard(proc, d)
    time.sleep(2)
    before = cw.file_state(d)  # the killed driver took its jobs with it: nothing changes any more
    assert before == cw.file_state(d)
    seg = "results/segmentation/TINY01"
    written = cw.tiles_written(d)
    assert per_shard[done] <= written  # the finished shard's tiles, all of them
    assert 0 < len(written & per_shard[cut]) < len(per_shard[cut]), (len(written & per_shard[cut]), n_cut)
    assert f"{seg}/shards/{done}.json" in before and f"{seg}/shards/{cut}.json" not in before
    assert f"{seg}/labels.tif" not in before
    for rel in before:
        if not cw.is_temporary(rel):  # temporary names of atomic writes may stay; final names are whole
            cw.readable(d / rel)

    assert cw.snakemake(d, "--unlock").returncode == 0
    plan = cw.snakemake(d, cw.TILED_TARGET, "-n", "--rerun-incomplete", "--cores", 2)
    assert plan.returncode == 0, plan.stdout[-3000:]
    assert cw.dry_run_plan(plan.stdout) == ({"segment_shard": 1, "stitch": 1}, [cut]), plan.stdout[-3000:]

    rerun = cw.snakemake(d, cw.TILED_TARGET, "--rerun-incomplete", "--cores", 2, "--resources", "gpu=1")
    assert rerun.returncode == 0, rerun.stdout[-5000:]
    after = cw.file_state(d)
    kept = {k: v for k, v in before.items() if not cw.is_temporary(k) and "run_summary" not in k}
    changed = sorted(k for k, v in kept.items() if after.get(k) != v)
    assert not changed, f"finished files redone or replaced: {changed[:10]}"
    n_before = len(written & per_shard[cut])
    assert cw.shard_log_line(d, cut) == (
        f"shard {cut}: {len(per_shard[cut])} tiles, {n_before} already done, "
        f"{len(per_shard[cut]) - n_before} to predict"
    )
    stats = json.loads((d / seg / "shards" / f"{cut}.json").read_text())
    assert (stats["tiles_resumed"], stats["tiles_computed"]) == (n_before, len(per_shard[cut]) - n_before)
    assert not any(cw.is_temporary(k) for k in after if k not in before)  # the rerun left no temporary file
    ref = reference / seg
    np.testing.assert_array_equal(tifffile.imread(d / seg / "labels.tif"), tifffile.imread(ref / "labels.tif"))
    pd.testing.assert_frame_equal(pd.read_csv(d / seg / "cells.csv"), pd.read_csv(ref / "cells.csv"))
    assert "Nothing to be done" in cw.snakemake(d, cw.TILED_TARGET, "-n", "--cores", 2).stdout
    print(
        f"killed with shard {done} finished and shard {cut} at {n_before}/{len(per_shard[cut])} tiles; "
        f"kill + rerun {time.monotonic() - t0:.0f} s, uninterrupted run {cw._TILED['reference_s']:.0f} s"
    )


@pytest.mark.slow
def test_failing_sample_does_not_stop_the_others_and_the_summary_says_why(workdir):
    demo = workdir / "demo"
    (demo / "TINY02.tif").write_bytes((demo / "TINY01.tif").read_bytes())  # a second, good chip
    (demo / "BAD01.tif").write_bytes(b"II*\x00 this is not a whole TIFF")  # a broken chip
    for s in ("TINY02", "BAD01"):
        (demo / f"{s}_annotations").mkdir()
    sheet = pd.read_csv(workdir / "samples.tsv", sep="\t", dtype=str)
    extra = pd.DataFrame(
        [
            {
                **sheet.iloc[0].to_dict(),
                "sample": s,
                "image": f"demo/{s}.tif",
                "expression": "",
                "annotations": f"demo/{s}_annotations",
            }
            for s in ("TINY02", "BAD01")
        ]
    )
    pd.concat([sheet, extra]).to_csv(workdir / "three.tsv", sep="\t", index=False)
    (workdir / "three.yaml").write_text(
        (workdir / "config.yaml").read_text().replace("samples: samples.tsv", "samples: three.tsv")
    )
    targets = ["results/segmentation/BAD01/labels.tif", "results/segmentation/TINY02/labels.tif"]
    proc = cw.snakemake(workdir, *targets, "--keep-going", "--cores", 2, "--resources", "gpu=1", config="three.yaml")
    assert proc.returncode != 0
    # the good chip finished, with the same labels as the identical first chip; the broken one did not
    res = workdir / "results" / "segmentation"
    np.testing.assert_array_equal(
        tifffile.imread(res / "TINY02" / "labels.tif"), tifffile.imread(res / "TINY01" / "labels.tif")
    )
    assert not (res / "BAD01" / "labels.tif").exists()
    summary = pd.read_csv(workdir / "results" / "run_summary.tsv", sep="\t", dtype=str).fillna("")
    assert len(summary) == 1, summary
    row = summary.iloc[0]
    assert row["status"] == "failed" and "BAD01" in row["outputs"]
    log = workdir / row["log"].split(",")[0]
    assert log.is_file() and "BAD01" in row["log"]
    assert row["reason"] in log.read_text() and "BAD01.tif" in row["reason"]  # the step's error names the file
    assert "SegRefine run summary: 1 job(s) failed" in proc.stdout and row["log"].split(",")[0] in proc.stdout


def test_summary_ignores_the_job_logs_snakemake_shows(tmp_path):
    """Under SLURM the shown job log holds the job's own `Error in rule` block; only the driver's counts."""
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "h5ad.log").write_text("reading cells.cgef\nSegRefineError: cells.cgef: no cells\n")
    text = "\n".join(
        [
            "Error in rule h5ad:",
            "    message: SLURM-job '7' failed, SLURM status is: 'OUT_OF_MEMORY'. For further error details see x",
            "    jobid: 12",
            "    output: results/expression/S1/cells.h5ad",
            "    log: logs/h5ad.log, .snakemake/slurm_logs/rule_h5ad/S1/7.log (check log file(s) for error details)",
            "    external_jobid: 7",
            "Logfile .snakemake/slurm_logs/rule_h5ad/S1/7.log:",
            "=" * 20,
            "Error in rule h5ad:",
            "    message: None",
            "    jobid: 0",
            "    output: results/expression/S1/cells.h5ad",
            "=" * 20,
            "Trying to restart job 12.",
        ]
    )
    assert len(parse_errors(text)) == 1
    (tmp_path / "run.log").write_text(text)
    (row,) = summarize_run(str(tmp_path / "run.log"), workdir=str(tmp_path))
    assert row["status"] == "failed" and row["external_jobid"] == "7" and row["failed_attempts"] == "1"
    assert row["reason"] == (
        "SLURM-job '7' failed, SLURM status is: 'OUT_OF_MEMORY'. | SegRefineError: cells.cgef: no cells"
    )
