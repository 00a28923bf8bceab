"""SAW v8 outputs as inputs: a sample given as a SAW ``outs`` folder, and SAW's own cell-bin GEFs for the QC.

SAW v8 (``saw count`` / ``saw realign``) writes no GEM by default. Its ``outs/``
folder holds, among others (SAW user manual v8, "count outputs"):

- ``image/<SN>_<stain>_regist.tif``: the stain image registered to the
  expression matrix (the frame of ``raw.gef``): the slide to segment;
- ``feature_expression/<SN>.tissue.gef`` (bin1 ... bin200 under the tissue) and
  ``<SN>.raw.gef`` (bin1 over the whole chip): bin GEFs (bgef);
- ``feature_expression/<SN>.cellbin.gef``: SAW's own nuclei (cellbin2 on the
  registered image), and ``<SN>.adjusted.cellbin.gef``: those nuclei grown into
  cells (``image/<SN>_<stain>_mask_edm_dis_<d>.tif``).

``resolve_outs`` finds these files for one sample; ``cellbin_cellmap`` turns a
SAW cell-bin GEF into the per-cell table our own cgef step writes
(``cellmap.csv``), so the expression QC puts SAW's cells beside ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from segrefine import SegRefineError

# our stain names -> the stain names SAW writes into its image file names
SAW_STAINS: Dict[str, List[str]] = {"ssDNA": ["ssDNA"], "DAPI": ["DAPI"], "HE": ["HE"], "mIF": ["IF", "mIF"]}
# SAW's cell-bin GEFs, as stages of the expression QC
SAW_CELLBINS = (("saw_nuclei", "cellbin.gef"), ("saw_cells", "adjusted.cellbin.gef"))


@dataclass
class SawOuts:
    image: str
    expression: str
    cellbins: Dict[str, str]  # QC stage name (saw_nuclei, saw_cells) -> cell-bin GEF


def _one(candidates: List[Path], what: str, where: Path) -> Optional[Path]:
    if len(candidates) > 1:
        raise SegRefineError(
            f"{where}: {len(candidates)} files could be the {what} "
            f"({', '.join(p.name for p in candidates)}); name it in the sample sheet"
        )
    return candidates[0] if candidates else None


def resolve_outs(outs, sn: str, stain: str) -> SawOuts:
    """The registered image, the bin GEF and SAW's cell-bin GEFs of chip ``sn`` in a SAW v8 ``outs`` folder.

    The image is ``image/<sn>_<stain>_regist.tif`` (SAW's name of the stain); the
    expression is ``<sn>.tissue.gef``, or ``<sn>.raw.gef`` when there is no tissue
    GEF. Every miss names the folder and what was looked for.
    """
    outs = Path(outs)
    if not outs.is_dir():
        raise SegRefineError(f"{outs}: SAW outs folder not found")
    image_dir, expr_dir = outs / "image", outs / "feature_expression"
    for d in (image_dir, expr_dir):
        if not d.is_dir():
            raise SegRefineError(f"{outs}: no {d.name}/ folder (not a SAW v8 outs folder?)")
    names = SAW_STAINS.get(stain, [stain])
    image = _one(
        [p for n in names for p in sorted(image_dir.glob(f"{sn}_{n}_regist.tif"))],
        f"registered {stain} image",
        image_dir,
    )
    if image is None:
        image = _one(sorted(image_dir.glob(f"{sn}_*_regist.tif")), "registered image", image_dir)
    if image is None:
        raise SegRefineError(
            f"{image_dir}: no registered image {sn}_{'|'.join(names)}_regist.tif "
            f"(found: {', '.join(p.name for p in sorted(image_dir.iterdir())) or 'nothing'})"
        )
    expression = next(
        (expr_dir / f"{sn}.{kind}.gef" for kind in ("tissue", "raw") if (expr_dir / f"{sn}.{kind}.gef").is_file()), None
    )
    if expression is None:
        raise SegRefineError(f"{expr_dir}: no {sn}.tissue.gef or {sn}.raw.gef (SAW's bin GEFs)")
    cellbins = {
        stage: str(expr_dir / f"{sn}.{suffix}")
        for stage, suffix in SAW_CELLBINS
        if (expr_dir / f"{sn}.{suffix}").is_file()
    }
    return SawOuts(image=str(image), expression=str(expression), cellbins=cellbins)


def cellbin_cellmap(cgef, out_csv) -> int:
    """SAW's (or gefpy's) cell-bin GEF -> the per-cell table of ``segrefine cgef`` (``cellmap.csv``).

    ``label_id`` is the GEF's own cell id (these cells are not in our label
    image). Only the needed fields of the cell table are read. Returns the
    number of cells.
    """
    import h5py

    from segrefine.expression import write_cellmap

    cgef = Path(cgef)
    if not cgef.is_file():
        raise SegRefineError(f"{cgef}: cell-bin GEF not found")
    try:
        with h5py.File(cgef, "r") as f:
            if "cellBin/cell" not in f:
                kind = "a bin GEF (bgef)" if "geneExp" in f else "not a GEF"
                raise SegRefineError(f"{cgef}: no cellBin/cell table ({kind}); expected SAW's cellbin.gef")
            cells = f["cellBin/cell"]
            fields = cells.dtype.names or ()
            need = ("x", "y", "area", "expCount", "geneCount")
            missing = [c for c in need if c not in fields]
            if missing:
                raise SegRefineError(f"{cgef}: cellBin/cell lacks field(s) {missing} (has {list(fields)})")
            col = {c: cells.fields(c)[:] for c in need + (("id",) if "id" in fields else ())}
    except OSError as exc:
        raise SegRefineError(f"{cgef}: cannot read as HDF5 ({exc}); truncated?") from exc
    n = len(col["x"])
    write_cellmap(
        out_csv,
        np.arange(n),
        col.get("id", np.arange(n)),
        col["x"],
        col["y"],
        col["area"],
        col["expCount"],
        col["geneCount"],
    )
    return int(n)
