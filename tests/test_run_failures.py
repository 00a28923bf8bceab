"""Run-level failures end in one clear line, and empty results are results. Table-driven: one row per case and the
message it must produce.

Full disks and read-only folders are real: each step runs in a private mount namespace (`unshare -rm`, no root
needed where user namespaces are allowed) on a small tmpfs, or on a read-only one, mounted over its output folder.
"""

import os
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, SCRIPTS, run_step
from segrefine.envs import env_python


def _can_mount():
    try:
        return (
            subprocess.run(
                ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=4k none /mnt"], capture_output=True
            ).returncode
            == 0
        )
    except OSError:
        return False


needs_mount = pytest.mark.skipif(not _can_mount(), reason="unshare -rm / tmpfs mounts not allowed here")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A small demo chip, its cgef and cell table (gef env) and a 0-cell cgef (labels that cover no transcript)."""
    d = tmp_path_factory.mktemp("failures")
    run_step("core", "demo-data", "--out", d / "demo", "--sn", "P1", "--size", 512, "--patches", 2, "--patch-size", 128)
    run_step(
        "gef",
        "cgef",
        "--gem",
        d / "demo" / "P1.gem.gz",
        "--labels",
        d / "demo" / "P1-truth.tif",
        "--cgef",
        d / "ok" / "c.cgef",
        "--cellmap",
        d / "ok" / "cellmap.csv",
    )
    from segrefine.io import write_tiff

    write_tiff(d / "zero.tif", np.zeros((512, 512), np.uint32))
    run_step(
        "gef",
        "cgef",
        "--gem",
        d / "demo" / "P1.gem.gz",
        "--labels",
        d / "zero.tif",
        "--cgef",
        d / "zero" / "c.cgef",
        "--cellmap",
        d / "zero" / "cellmap.csv",
    )
    return d


def run_on_fs(env, args, mount, fs, cwd):
    """`segrefine <args>` in env with `mount` (a folder) replaced by a tmpfs of `fs` KiB, or a read-only one."""
    opts = "ro,size=4k" if fs == "ro" else f"size={fs}k"
    mount.mkdir(parents=True, exist_ok=True)
    cmd = " ".join(map(_q, [env_python(env), "-m", "segrefine", *args]))
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o {opts} none {_q(mount)} && {cmd}"],
        cwd=cwd,
        env=dict(os.environ, PYTHONPATH=str(SCRIPTS)),
        capture_output=True,
        text=True,
    )


def _q(x):
    import shlex

    return shlex.quote(str(x))


# id, env, filesystem (KiB of tmpfs, or "ro"), step arguments ({d}: the demo folder; output under "out/"),
# the one line it must end with
CASES = [
    (
        "patches-full-disk",
        "core",
        48,
        ["patches", "--slide", "{d}/demo/P1.tif", "--grid", "128", "128", "--sn", "P1", "--out-dir", "out/p"],
        r"segrefine patches: error: out/p/P1-x\d+_y\d+_w128_h128-img\.tif: cannot write: no space left on the device "
        r"\(0\.0 MiB free on the device of .*/out/p\); no partial file is left under a final name: "
        r"free space and rerun",
    ),
    (
        "patches-read-only",
        "core",
        "ro",
        ["patches", "--slide", "{d}/demo/P1.tif", "--grid", "128", "128", "--sn", "P1", "--out-dir", "out/p"],
        r"segrefine patches: error: out/p: cannot write: read-only file system; choose an output folder on a "
        r"writable file system and rerun",
    ),
    (
        "cgef-full-disk",
        "gef",
        16,
        [
            "cgef",
            "--gem",
            "{d}/demo/P1.gem.gz",
            "--labels",
            "{d}/demo/P1-truth.tif",
            "--cgef",
            "out/c.cgef",
            "--cellmap",
            "out/cellmap.csv",
        ],
        r"segrefine cgef: error: out/c\.cgef(, out/cellmap\.csv)?: cannot write: no space left on the device .*"
        r"free space and rerun",
    ),
    (
        "cgef-read-only",
        "gef",
        "ro",
        [
            "cgef",
            "--gem",
            "{d}/demo/P1.gem.gz",
            "--labels",
            "{d}/demo/P1-truth.tif",
            "--cgef",
            "out/x/c.cgef",
            "--cellmap",
            "out/x/cellmap.csv",
        ],
        r"segrefine cgef: error: out/x: cannot write: read-only file system; .*",
    ),
    (
        "h5ad-full-disk (HDF5 error, direct)",
        "stereopy",
        16,
        ["h5ad", "--cgef", "{d}/ok/c.cgef", "--cellmap", "{d}/ok/cellmap.csv", "--out", "out/cells.h5ad"],
        r"segrefine h5ad: error: out/cells\.h5ad: cannot write: no space left on the device .*free space and rerun",
    ),
    (
        "h5ad-full-disk (HDF5 error, stereopy)",
        "stereopy",
        16,
        [
            "h5ad",
            "--cgef",
            "{d}/ok/c.cgef",
            "--cellmap",
            "{d}/ok/cellmap.csv",
            "--out",
            "out/cells.h5ad",
            "--writer",
            "stereopy",
        ],
        r"segrefine h5ad: error: out/cells\.h5ad( \(temporary file out/tmp\w+/stereopy\.h5ad\))?: cannot write: "
        r"no space left on the device .*free space and rerun",
    ),
    (
        "h5ad-read-only",
        "stereopy",
        "ro",
        ["h5ad", "--cgef", "{d}/ok/c.cgef", "--cellmap", "{d}/ok/cellmap.csv", "--out", "out/cells.h5ad"],
        r"segrefine h5ad: error: out/\S*: cannot write: read-only file system; .*",
    ),
]


@needs_mount
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_os_failures_end_in_one_line_naming_the_file(case, demo, tmp_path):
    _, env, fs, args, expected = case
    proc = run_on_fs(env, [a.replace("{d}", str(demo)) for a in args], tmp_path / "out", fs, tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert re.fullmatch(expected, lines[-1]), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert [ln for ln in lines if ln.startswith("segrefine ")] == [lines[-1]]


@pytest.mark.integration
@pytest.mark.parametrize("writer", ["direct", "stereopy"])
def test_h5ad_of_a_slide_without_cells_is_a_valid_empty_anndata(demo, tmp_path, writer):
    """0 cells is a result: stereopy crashes (segmentation fault) on a cgef without cells, so its writer writes the
    0-cell AnnData itself, with the columns of a normal one; the direct writer writes one as it writes any; the
    anndata env (current anndata) opens them."""
    assert len(pd.read_csv(demo / "zero" / "cellmap.csv")) == 0
    proc = run_step(
        "stereopy",
        "h5ad",
        "--cgef",
        demo / "zero" / "c.cgef",
        "--cellmap",
        demo / "zero" / "cellmap.csv",
        "--out",
        tmp_path / "zero.h5ad",
        "--writer",
        writer,
    )
    assert "holds no cell: wrote an AnnData of 0 cells x 20 genes" in proc.stderr
    run_step(
        "stereopy",
        "h5ad",
        "--cgef",
        demo / "ok" / "c.cgef",
        "--cellmap",
        demo / "ok" / "cellmap.csv",
        "--out",
        tmp_path / "ok.h5ad",
        "--writer",
        writer,
    )
    check = (
        "import anndata, sys; a = anndata.read_h5ad(sys.argv[1]); b = anndata.read_h5ad(sys.argv[2]); "
        "assert a.n_obs == 0 and b.n_obs > 0; assert list(a.obs.columns) == list(b.obs.columns); "
        "assert list(a.obs.dtypes.astype(str)) == list(b.obs.dtypes.astype(str)); "
        "assert list(a.var_names) == list(b.var_names) and a.X.shape == (0, b.n_vars); "
        "assert sorted(a.obsm) == sorted(b.obsm) and set(a.uns) <= set(b.uns); print('ok')"
    )
    for env in ("stereopy", "anndata"):
        out = subprocess.run(
            [str(env_python(env)), "-c", check, str(tmp_path / "zero.h5ad"), str(tmp_path / "ok.h5ad")],
            capture_output=True,
            text=True,
        )
        assert out.stdout.strip() == "ok", out.stderr[-2000:]


def test_a_rerun_removes_the_temporary_files_of_killed_runs(demo, small, tmp_path):
    """atomic_path's temporary files (.{name}.<random>.part...) beside an output and stitch's work folders
    (.stitch-*) of killed runs are removed when the step writes that output again; other hidden files stay. A blank
    slide also shows stitch's 0-cell case: empty outputs, said so."""
    from segrefine.io import write_tiff

    write_tiff(tmp_path / "blank.tif", np.zeros((512, 512), np.uint8))
    seg = tmp_path / "seg"
    (seg / ".stitch-k1ll3d_x").mkdir(parents=True)
    (seg / ".stitch-k1ll3d_x" / "level0.raw").write_bytes(b"\0" * 4096)
    leftovers = [seg / ".cells.csv.ab12cd_3.part.csv", seg / ".labels.tif.zz9yx8w7.part.tif"]
    kept = [seg / ".cells.csv.gz.ab12cd_3.part.csv.gz", seg / ".notes"]  # another output's, and not ours
    for f in leftovers + kept:
        f.write_text("x")
    proc = run_step(
        "core",
        "segment",
        "--card",
        small / "card" / "card.json",
        "--slide",
        tmp_path / "blank.tif",
        "--out-dir",
        seg,
        "--no-tissue",
        "--tile-size",
        256,
    )
    assert not (seg / ".stitch-k1ll3d_x").exists() and not any(f.exists() for f in leftovers)
    assert all(f.exists() for f in kept)
    assert not [p.name for p in seg.iterdir() if p.name.startswith(".stitch-")]
    assert "no cell found in" in proc.stderr and "written empty" in proc.stderr
    assert len(pd.read_csv(seg / "cells.csv")) == 0


@pytest.fixture(scope="module")
def small(demo):
    """The classical model's pretrained card, a training set of four 128 px patches of the demo chip (one test
    patch), a predictions file of its patches (their truth) and a long metrics table, for the steps below."""
    import tifffile

    from segrefine.io import write_tiff

    d = demo / "small"
    run_step(
        "core",
        "pretrained-card",
        "--framework",
        "classical",
        "--name",
        "b",
        "--source",
        "none",
        "--out-dir",
        d / "card",
    )
    slide, truth = tifffile.imread(demo / "demo" / "P1.tif"), tifffile.imread(demo / "demo" / "P1-truth.tif")
    names = [f"P1-x{x}_y{y}_w128_h128" for y in (128, 256) for x in (128, 256)]
    for name, (y, x) in zip(names, [(128, 128), (128, 256), (256, 128), (256, 256)]):
        write_tiff(d / f"{name}-img.tif", slide[y : y + 128, x : x + 128])
        write_tiff(d / f"{name}-mask.tif", truth[y : y + 128, x : x + 128])
    run_step(
        "core",
        "trainset",
        "--images",
        *[d / f"{n}-img.tif" for n in names],
        "--masks",
        *[d / f"{n}-mask.tif" for n in names],
        "--out",
        d / "trainset.tsv",
        "--val-fraction",
        0.25,
        "--test-fraction",
        0.25,
    )
    np.savez(d / "pred.npz", **{n: tifffile.imread(d / f"{n}-mask.tif") for n in names[:1]})
    pd.DataFrame(
        [
            {"model": "b", "stage": stage, "mode": "standard", "metric": "f1", "image": n, "value": v + k / 10}
            for k, n in enumerate(names)
            for stage, v in (("pretrained", 0.5), ("finetuned", 0.55))
        ]
    ).to_csv(d / "long.csv", index=False)
    return d


# the hidden work folders and files each step makes, as a killed run leaves them, and look-alikes that are not its
# own: id, env, step arguments ({d}: the demo folder, {s}: the small inputs; outputs under "out/"), the folder they
# lie in, the leftovers (names with ".part": atomic_path's files, others: folders with a file), the look-alikes
LEFTOVER_CASES = [
    (
        "finetune",
        "core",
        [
            "finetune",
            "--pretrained-card",
            "{s}/card/card.json",
            "--trainset",
            "{s}/trainset.tsv",
            "--name",
            "m",
            "--out-dir",
            "out/m/finetuned",
        ],
        "out/m",
        [".finetuned.k1ll3d_x", ".finetuned.ab12cd_3"],
        [".pretrained.k1ll3d_x", ".finetuned.k1ll3d_xy", ".finetuned.old", "finetuned.k1ll3d_x"],
    ),
    (
        "purity",
        "gef",
        [
            "purity",
            "--stages",
            "s",
            "--cgefs",
            "{d}/ok/c.cgef",
            "--labels",
            "{d}/demo/P1-truth.tif",
            "--out-dir",
            "out/purity",
            "--expression",
            "{d}/demo/P1.gem.gz",
            "--truth",
            "{d}/demo/P1-truth.tif",
        ],
        "out/purity",
        [".purity.k1ll3d_x", ".cells.csv.ab12cd_3.part.csv"],
        [".purity.k1ll3d", ".cgef.k1ll3d_x", ".purity-k1ll3d_x"],
    ),
    (
        "preannotate",
        "core",
        [
            "preannotate",
            "--card",
            "{s}/card/card.json",
            "--slide",
            "{d}/demo/P1.tif",
            "--sn",
            "P1",
            "--patches",
            "P1-x64_y128_w128_h128",
            "--out-dir",
            "out/an/preannotations",
            "--archive",
            "out/archive",
        ],
        "out/an",
        [".preannotations.k1ll3d_x"],
        [".preannotations.k1ll3d_x.bak", ".overlays.k1ll3d_x"],
    ),
    (
        "overlays",
        "core",
        [
            "overlays",
            "--predictions",
            "{s}/pred.npz",
            "--trainset",
            "{s}/trainset.tsv",
            "--title",
            "b",
            "--out-dir",
            "out/ev/overlays",
        ],
        "out/ev",
        [".overlays.k1ll3d_x"],
        [".overlays_2.k1ll3d_x", ".preannotations.k1ll3d_x"],
    ),
    (
        "plot-evaluation",
        "core",
        ["plot-evaluation", "--long", "{s}/long.csv", "--out", "out/ev/boxplots.png", "--stats", "out/ev/wilcoxon.csv"],
        "out/ev",
        [".boxplots.png.k1ll3d_x.part.png", ".wilcoxon.csv.ab12cd_3.part"],
        [".boxplots.png.k1ll3d_x", ".wilcoxon.csv.gz.ab12cd_3.part.gz"],
    ),
]


@pytest.mark.parametrize("case", LEFTOVER_CASES, ids=[c[0] for c in LEFTOVER_CASES])
def test_a_rerun_of_each_step_removes_its_own_leftovers_only(case, demo, small, tmp_path):
    """A step removes the work folders and temporary files that its own killed runs left (the exact names it
    makes), and keeps every look-alike: another output's, another step's, or a user's."""
    _, env, args, where, leftovers, kept = case
    folder = tmp_path / where
    folder.mkdir(parents=True)
    for name in leftovers + kept:
        if ".part" in name:
            (folder / name).write_text("x")
        else:
            (folder / name).mkdir()
            (folder / name / "weights.json").write_text("{}")
    run_step(env, *[a.replace("{d}", str(demo)).replace("{s}", str(small)) for a in args], cwd=tmp_path)
    assert [n for n in leftovers if (folder / n).exists()] == []
    assert [n for n in kept if not (folder / n).exists()] == []
    hidden = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob(".*"))
    assert hidden == sorted(f"{where}/{n}" for n in kept if n.startswith(".")), hidden  # the run left nothing


def _tiny_workdir(tmp_path):
    for f in (REPO / "config" / "test").iterdir():
        shutil.copy(f, tmp_path / f.name)
    run_step(
        "core",
        "demo-data",
        "--out",
        tmp_path / "demo",
        "--sn",
        "TINY01",
        "--size",
        384,
        "--patches",
        6,
        "--patch-size",
        96,
    )
    patch = sorted((tmp_path / "demo" / "annotations").glob("*.geojson"))[0].stem
    return f"results/patches/TINY01/{patch}-img.tif"


# id, the folder mounted read-only, where the summary must be, the reason it must give
SUMMARY_CASES = [
    (
        "patch-folder-read-only",
        "results/patches/TINY01",
        "results/run_summary.tsv",
        r"OSError: \[Errno 30\] Read-only file system: 'results/patches/TINY01/TINY01-\w+-img\.tif'",
    ),
    (
        "results-read-only",
        "results",
        ".snakemake/run_summary.tsv",
        r"OSError: \[Errno 30\] Read-only file system: 'results/patches'",
    ),
]


@needs_mount
@pytest.mark.parametrize("case", SUMMARY_CASES, ids=[c[0] for c in SUMMARY_CASES])
def test_run_summary_is_written_whatever_happened(case, tmp_path):
    """Snakemake itself stops (it cannot remove or create an output in a read-only folder) and calls neither
    onsuccess nor onerror: the summary is still written, naming the failure (beside .snakemake/ when results/ is
    the read-only folder), and printed last."""
    _, ro, where, reason = case
    target = _tiny_workdir(tmp_path)
    (tmp_path / ro).mkdir(parents=True)
    snake = " ".join(
        map(
            _q,
            [
                env_python("core"),
                "-m",
                "snakemake",
                "-s",
                REPO / "Snakefile",
                "--configfile",
                "config.yaml",
                "--cores",
                "1",
                target,
            ],
        )
    )
    proc = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o ro,size=4k none {ro} && {snake}"],
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(SCRIPTS)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.returncode != 0
    summary = pd.read_csv(tmp_path / where, sep="\t", dtype=str).fillna("")
    assert summary["status"].iloc[0] == "failed" and summary["rule"].iloc[0] == "(snakemake)"
    assert re.fullmatch(reason, summary["reason"].iloc[0]), summary
    assert f"(written to {where})" in proc.stdout.strip().splitlines()[-1]
    assert "SegRefine run summary: 0 job(s) failed; Snakemake itself stopped" in proc.stdout


# errors as the libraries raise them (ones this root-run machine cannot provoke, e.g. EACCES, which root bypasses),
# and the line they must become; {out}: the step's --out
MESSAGE_CASES = [
    (
        "permission denied",
        lambda: OSError(13, "Permission denied", "res/a/x.tif"),
        r"res/a/x\.tif: permission denied; make it readable \(an input\) or its folder writable \(an output\) for this "
        r"user and rerun",
    ),
    (
        "quota",
        lambda: OSError(122, "Disk quota exceeded"),
        r"{out}: cannot write: disk quota exceeded \(.* MiB free on the device of .*\); .*",
    ),
    (
        "atomic_path's temporary file named as its output",
        lambda: OSError(28, "No space", "res/.c.csv.ab_12cd3.part.csv"),
        r"res/c\.csv: cannot write: no space left on the device .*",
    ),
    (
        "h5py write error (RuntimeError, errno in the text)",
        lambda: RuntimeError(
            "Can't write data (file write failed: time = x, filename = 'res/m.h5', file descriptor = 3, "
            "errno = 28, error message = 'No space left on device', buf = 0x1)"
        ),
        r"res/m\.h5: cannot write: no space left on the device .*",
    ),
    (
        "numpy short write",
        lambda: OSError("36383 requested and 1012 written"),
        r"{out}: cannot write: no space left on the device .*",
    ),
    (
        "wrapped in another error",
        lambda: _wrapped(OSError(30, "Read-only file system", "res/b")),
        r"res/b: cannot write: read-only file system; .*",
    ),
]


def _wrapped(cause):
    try:
        raise cause
    except OSError as exc:
        try:
            raise ValueError("while writing") from exc
        except ValueError as outer:
            return outer


@pytest.mark.parametrize("case", MESSAGE_CASES, ids=[c[0] for c in MESSAGE_CASES])
def test_os_error_messages(case, tmp_path):
    from segrefine.cli import build_parser, os_error_message

    args = build_parser().parse_args(["h5ad", "--cgef", "c", "--cellmap", "m", "--out", str(tmp_path / "o.h5ad")])
    msg = os_error_message(case[1](), args)
    assert msg is not None and re.fullmatch(case[2].replace("{out}", re.escape(str(tmp_path / "o.h5ad"))), msg), msg


def test_other_errors_are_not_dressed_up_as_os_errors():
    """A bug (no OS error anywhere in the chain) keeps its traceback: os_error_message declines it."""
    from segrefine.cli import build_parser, os_error_message

    args = build_parser().parse_args(["h5ad", "--cgef", "c", "--cellmap", "m", "--out", "o.h5ad"])
    assert os_error_message(KeyError("x"), args) is None
    assert os_error_message(OSError("Unable to open file (file signature not found)"), args) is None
