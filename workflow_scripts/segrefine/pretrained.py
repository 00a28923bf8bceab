"""Official pretrained weights and the local model cache.

Compute steps only read local files. Official names (``cyto3``, ``nuclei``, ...)
resolve to ``{model_cache}/{framework}/{file}``; the workflow's local
``fetch_pretrained`` rule fills that file where a network is there (an HPC
login node). Offline (or with SEGREFINE_OFFLINE set), the error says which file to put where.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from segrefine import SegRefineError
from segrefine.models import adapter_class


def official_path(framework: str, name: str, cache_dir) -> Path:
    cls = adapter_class(framework)
    if name not in cls.official_weights:
        raise SegRefineError(
            f"unknown pretrained {framework} model {name!r}; official names: "
            f"{sorted(cls.official_weights)} (or give a path to a weights file)"
        )
    return Path(cache_dir) / framework / cls.official_weights[name]


def fetch_official(framework: str, name: str, out) -> Path:
    """Download official weights into ``out`` (atomically); needs network access."""
    from segrefine.io import atomic_path

    out = Path(out)
    cls = adapter_class(framework)
    if name not in cls.official_weights:
        raise SegRefineError(f"unknown pretrained {framework} model {name!r}; official: {sorted(cls.official_weights)}")
    if os.environ.get("SEGREFINE_OFFLINE"):
        raise SegRefineError(
            f"SEGREFINE_OFFLINE is set, so the official {framework} weights {name!r} are not "
            f"downloaded: put the file at {out} (copy it from a machine that has it)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        try:
            got = cls.download_official(name, Path(tmp))
        except Exception as exc:
            raise SegRefineError(
                f"could not download the official {framework} weights {name!r} ({type(exc).__name__}: {exc}). "
                f"Without network, put the file at {out} by hand (copy it from a machine that has it)"
            ) from exc
        # a model may be several files (StarDist: config.json, thresholds.json beside the weights)
        for extra in got.parent.iterdir():
            if extra != got and extra.is_file():
                with atomic_path(out.parent / extra.name) as part:
                    shutil.copyfile(extra, part)
        with atomic_path(out) as part:
            shutil.copyfile(got, part)
    return out
