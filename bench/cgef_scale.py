"""Time and peak memory of `segrefine cgef`: the streaming exact writer against gefpy's, on a synthetic chip.

The chip: N x N DNB, labels a grid of 10 x 10 px cells that all touch their
neighbours (ids row-major from 1), N*N/4 transcripts at seeded random DNBs with
1-3 UMIs each over 20,000 genes, written as a GEM.gz. Both writers run as the
workflow runs them (`segrefine cgef` in the gef env, 1 thread); wall time and
peak resident memory come from /usr/bin/time. The fraction of in-cell UMIs each
writer assigns as the exact aggregation does is printed beside them. The exact
writer streams (records in chunks, labels in bands; `--chunk`, `--band-records`,
`--band-rows` are passed through), so its peak follows those sizes and the number
of cells, not the number of records.

    $(python3 workflow_scripts/segrefine/envs.py python gef) bench/cgef_scale.py --size 2048
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow_scripts"))

from segrefine.envs import env_python  # noqa: E402


def run_cgef(writer, gem, labels, out, extra=()):
    cmd = [
        "/usr/bin/time",
        "-f",
        "TIME %e %M",
        str(env_python("gef")),
        "-m",
        "segrefine",
        "cgef",
        "--gem",
        str(gem),
        "--labels",
        str(labels),
        "--cgef",
        str(out / f"{writer}.cgef"),
        "--cellmap",
        str(out / f"{writer}.csv"),
        "--writer",
        writer,
        "--origin",
        "0,0",
        "--threads",
        "1",
        *extra,
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO / "workflow_scripts"))
    )
    if proc.returncode:
        sys.exit(f"{writer} failed:\n{proc.stderr[-3000:]}")
    m = re.search(r"TIME ([\d.]+) (\d+)", proc.stderr)
    return float(m.group(1)), int(m.group(2)) / 2**20


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--out", default="/tmp/segrefine-bench-cgef-scale")
    for opt in ("--chunk", "--band-records", "--band-rows"):
        ap.add_argument(opt, type=int, help=f"passed to the exact writer's `segrefine cgef {opt}`")
    a = ap.parse_args()
    import pandas as pd
    import tifffile

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    n = a.size
    lab = (np.arange(n)[:, None] // 10 * (n // 10 + 1) + np.arange(n)[None, :] // 10 + 1).astype(np.uint32)
    tifffile.imwrite(out / "labels.tif", lab, compression="zlib", tile=(512, 512))
    rng = np.random.default_rng(0)
    k = n * n // 4
    gene, x, y, c = rng.integers(0, 20000, k), rng.integers(0, n, k), rng.integers(0, n, k), rng.integers(1, 4, k)
    gem = out / "chip.gem.gz"
    with gzip.open(gem, "wt", compresslevel=1) as fh:
        fh.write("geneID\tx\ty\tMIDCount\n")
        for s in range(0, k, 1 << 18):
            sl = slice(s, s + (1 << 18))
            fh.write("".join(f"G{g:05d}\t{a_}\t{b}\t{d}\n" for g, a_, b, d in zip(gene[sl], x[sl], y[sl], c[sl])))
    exact_umis = int(c.sum())  # the grid covers every DNB: every UMI lies in a cell
    print(f"chip {n} x {n} DNB, {int(lab.max())} touching cells, {k} transcripts, {exact_umis} UMIs")
    print(f"{'writer':8} {'wall s':>8} {'peak RSS GiB':>13} {'UMIs in cells':>14} {'same as exact':>14}")
    for writer in ("exact", "gefpy"):
        extra = (
            [
                str(v)
                for opt in ("chunk", "band_records", "band_rows")
                if getattr(a, opt)
                for v in ("--" + opt.replace("_", "-"), getattr(a, opt))
            ]
            if writer == "exact"
            else []
        )
        secs, gib = run_cgef(writer, gem, out / "labels.tif", out, extra)
        cells = pd.read_csv(out / f"{writer}.csv")
        lab_at = lab[cells["y"].to_numpy(), cells["x"].to_numpy()]
        truth = np.bincount(lab[y, x], weights=c, minlength=int(lab.max()) + 1)
        same = np.minimum(truth[lab_at], cells["total_counts"].to_numpy()).sum()  # per-cell UMI agreement
        print(f"{writer:8} {secs:8.1f} {gib:13.2f} {int(cells['total_counts'].sum()):14d} {same / exact_umis:14.4%}")


if __name__ == "__main__":
    main()
