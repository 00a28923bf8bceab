"""Benchmark: fine-tuning time and peak GPU memory of the torch families, beside the paper's Table 2.

Families: Cellpose 3.1 cyto family (the cellpose env) and Cellpose-SAM (cpsam,
cellpose 4, the cpsam env), each fine-tuned through its SegRefine adapter (the
same code the workflow's finetune step runs) in a child process of its env.
Data: the real CellBinDB fluorescence crops in ../shared/realdata/cellbindb-demo
(ssDNA, DAPI, mIF, 10x DAPI: 256x256, manual binary masks split into instances
by connected components); ``--images N`` takes N patches cut from them with
``--crop`` (the paper fine-tuned on ~20 patches: the default 20 are the four crops
in five orientations each, identity / rot90 / rot180 / rot270 / transpose).

On an NVIDIA GPU it reports the fine-tuning wall time and the peak GPU memory
torch allocated (torch.cuda.max_memory_allocated; reserved beside it). Without
one it says "no GPU" and reports CPU time and the worker's peak RSS, so the
script itself is checked on any machine (use tiny settings there: a cpsam step
takes ~40 s and 7-11 GB on a 2-core CPU).

    python bench/gpu_finetune_timing.py                       # GPU node: the paper's setting
    python bench/gpu_finetune_timing.py --images 1 --crop 128 \\
        --cellpose-epochs 2 --cpsam-epochs 2                  # CPU check
    python bench/gpu_finetune_timing.py --model-cache resources/models   # start from official weights

Starting weights: the official ones (cyto, cpsam) when ``--model-cache`` holds
them ({cache}/{framework}/{file}, as the workflow's fetch_pretrained rule puts
them), else a seeded from-scratch network; the time and memory of a fine-tuning
step do not depend on the starting values.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow_scripts"))

STAINS = ["ssDNA", "DAPI", "mIF", "10xDAPI"]
FAMILIES = {  # family -> (env, official start weights, paper's row name, paper's fine-tuning s, paper's GPU GB)
    "cellpose": ("cellpose", "cyto", "Cellpose-cyto", 32.0, 2.87),
    "cpsam": ("cpsam", "cpsam", "Cellpose-SAM", 3.54 * 60, 4.35),
}


# -- worker: runs inside the family's env -----------------------------------------------------------------------------
def real_pairs(realdata: Path, n_images: int, crop: int):
    """``n_images`` (image, instance mask) patches of side ``crop`` from the real crops."""
    import numpy as np
    import tifffile

    from segrefine.annotations import mask_to_instances

    views = [lambda a: a, lambda a: np.rot90(a, 1), lambda a: np.rot90(a, 2), lambda a: np.rot90(a, 3), lambda a: a.T]
    crops = [
        (
            tifffile.imread(realdata / "cellbindb-demo" / f"{s}_img.tif"),
            tifffile.imread(realdata / "cellbindb-demo" / f"{s}_mask.tif"),
        )
        for s in STAINS
    ]
    pairs = []
    for view in views:
        for img, mask in crops:
            for y in range(0, img.shape[0] - crop + 1, crop):
                for x in range(0, img.shape[1] - crop + 1, crop):
                    if len(pairs) == n_images:
                        return pairs
                    im = np.ascontiguousarray(view(img[y : y + crop, x : x + crop]))
                    m = mask_to_instances(np.ascontiguousarray(view(mask[y : y + crop, x : x + crop])))
                    pairs.append((im, m))
    if len(pairs) < n_images:
        sys.exit(f"only {len(pairs)} patches of {crop} px can be cut from {realdata}/cellbindb-demo")
    return pairs


def worker(a) -> None:
    import resource

    import torch

    from segrefine.models import adapter_class
    from segrefine.pretrained import official_path

    official = FAMILIES[a.worker][1]
    pairs = real_pairs(Path(a.realdata), a.images, a.crop)
    params = {"n_epochs": a.epochs, "seed": 0}
    if a.worker == "cellpose":
        params["bsize"] = min(224, a.crop)
    start, weights = "from scratch (seeded)", None
    if a.model_cache:
        cand = official_path(a.worker, official, a.model_cache)
        if cand.is_file():
            start, weights = f"official {official}", cand
    cuda = torch.cuda.is_available()
    t0 = time.perf_counter()
    adapter = adapter_class(a.worker).from_pretrained(weights, params)
    load_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(prefix="segrefine-gpu-bench-") as tmp:
        t0 = time.perf_counter()
        losses = adapter.fine_tune(pairs, [], params, 0, Path(tmp))
        if cuda:
            torch.cuda.synchronize()
        train_s = time.perf_counter() - t0
    out = {
        "family": a.worker,
        "device": adapter.device,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "start": start,
        "images": len(pairs),
        "crop": a.crop,
        "epochs": a.epochs,
        "hyperparameters": adapter.card_fields()["hyperparameters"],
        "load_s": round(load_s, 1),
        "finetune_s": round(train_s, 1),
        "final_train_loss": losses["train_loss"][-1],
        "peak_gpu_allocated_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "peak_gpu_reserved_gb": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    print("RESULT " + json.dumps(out), flush=True)


# -- driver: any Python ---------------------------------------------------------------------------------------------
def run_family(family: str, a) -> dict:
    from segrefine.envs import EnvError, env_python

    env = FAMILIES[family][0]
    try:
        py = env_python(env)
    except EnvError as exc:
        return {"family": family, "error": str(exc)}
    epochs = a.cellpose_epochs if family == "cellpose" else a.cpsam_epochs
    cmd = [
        str(py),
        str(Path(__file__).resolve()),
        "--worker",
        family,
        "--epochs",
        str(epochs),
        "--images",
        str(a.images),
        "--crop",
        str(a.crop),
        "--realdata",
        a.realdata,
    ]
    if a.model_cache:
        cmd += ["--model-cache", a.model_cache]
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO / "workflow_scripts"))
    )
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"family": family, "error": f"worker failed ({proc.returncode}): {proc.stderr[-2000:]}"}
    return dict(json.loads(lines[-1][len("RESULT ") :]), process_s=round(wall, 1))


def fmt_time(s) -> str:
    return "-" if s is None else (f"{s:.0f} s" if s < 120 else f"{s / 60:.2f} min")


def report(results) -> str:
    head = [
        "family",
        "device",
        "start",
        "images x epochs",
        "fine-tune time",
        "peak memory",
        "paper GPU time",
        "paper GPU memory",
    ]
    rows = []
    for r in results:
        _, _, paper_name, paper_s, paper_gb = FAMILIES[r["family"]]
        if "error" in r:
            rows.append(
                [
                    paper_name,
                    "not run",
                    r["error"].splitlines()[0][:70],
                    "-",
                    "-",
                    "-",
                    fmt_time(paper_s),
                    f"{paper_gb:.2f} GB",
                ]
            )
            continue
        if r["peak_gpu_allocated_gb"] is not None:
            device = f"{r['device']} ({r['gpu']})"
            mem = f"{r['peak_gpu_allocated_gb']:.2f} GB GPU (reserved {r['peak_gpu_reserved_gb']:.2f})"
        else:
            device = f"no GPU: cpu, {r['threads']} threads"
            mem = f"{r['peak_rss_gb']:.2f} GB RSS (CPU)"
        rows.append(
            [
                paper_name,
                device,
                r["start"],
                f"{r['images']} x {r['epochs']} ({r['crop']} px)",
                fmt_time(r["finetune_s"]),
                mem,
                fmt_time(paper_s),
                f"{paper_gb:.2f} GB",
            ]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--images", type=int, default=20, help="training patches (paper: ~20)")
    ap.add_argument("--crop", type=int, default=256, help="patch side in px (the real crops are 256)")
    ap.add_argument("--cellpose-epochs", type=int, default=100)
    ap.add_argument("--cpsam-epochs", type=int, default=100)
    ap.add_argument("--model-cache", help="folder holding official weights as {cache}/{framework}/{file}")
    ap.add_argument("--realdata", default=str(REPO.parent / "shared" / "realdata"))
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--worker", choices=list(FAMILIES), help=argparse.SUPPRESS)
    ap.add_argument("--epochs", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(a)
        return 0
    if not (Path(a.realdata) / "cellbindb-demo").is_dir():
        sys.exit(f"real data not found at {a.realdata}/cellbindb-demo")
    results = []
    for family in a.families:  # one after the other: never two torch trainings at once
        print(f"[gpu_finetune_timing] {family} ...", file=sys.stderr, flush=True)
        results.append(run_family(family, a))
    print(report(results))
    print(
        "\npaper: CSRefiner Table 2 (GPU fine-tuning on ~20 patches). Time = the adapter's fine_tune call "
        "(model loading excluded); GPU memory = torch.cuda.max_memory_allocated during it."
    )
    if any(r.get("peak_gpu_allocated_gb") is None for r in results if "error" not in r):
        print(
            "no GPU: the CPU rows check the script and give CPU time / peak RSS; they are not comparable "
            "with the paper's GPU columns."
        )
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
