"""Time and peak memory of the slide intensity reference (exact histogram, 2048 px blocks) on a tiled slide.

    PYTHONPATH=workflow_scripts .envs/core/bin/python bench/intensity_reference.py SIZE CHANNELS DTYPE

Writes a random tiled BigTIFF of SIZE x SIZE (once), then measures `intensity_reference` on it in a fresh
process (the alternative, np.percentile on the whole image, needs the whole slide in memory).
"""

import os
import resource
import sys
import time

import numpy as np
import tifffile
from pathlib import Path
from segrefine.intensity import intensity_reference
from segrefine.io import Slide

size, ch, dt = int(sys.argv[1]), int(sys.argv[2]), np.dtype(sys.argv[3])
path = Path(f"/tmp/segrefine-bench-ref_{size}_{ch}_{dt}.tif")
if not path.exists():
    rng = np.random.default_rng(0)

    def tiles():
        for _ in range((size // 512) ** 2):
            yield rng.integers(0, np.iinfo(dt).max, (512, 512, ch) if ch > 1 else (512, 512)).astype(dt)

    tifffile.imwrite(
        path,
        tiles(),
        shape=(size, size, ch) if ch > 1 else (size, size),
        dtype=dt,
        tile=(512, 512),
        bigtiff=True,
        photometric="rgb" if ch == 3 else "minisblack",
    )
    print("written", flush=True)
    os.execv(sys.executable, [sys.executable] + sys.argv)  # measure in a fresh process
t = time.monotonic()
with Slide(path) as s:
    ref = intensity_reference(s)
dt_s = time.monotonic() - t
print(
    f"{size}x{size}x{ch} {dt}: streamed exact histogram {dt_s:.1f} s, {size * size / dt_s / 1e6:.1f} Mpx/s, peak RSS "
    f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB; {ref['method']}",
    flush=True,
)
# the alternative: the whole slide in memory, np.percentile per channel (same values)
t = time.monotonic()
with Slide(path) as s:
    img = s.read_all()
whole = [np.percentile(img[..., c] if img.ndim == 3 else img, [1.0, 99.0]) for c in range(ch)]
dt_w = time.monotonic() - t
assert all(
    np.allclose(w, [ref["percentiles"]["1.0"][c], ref["percentiles"]["99.0"][c]], atol=1e-9)
    for c, w in enumerate(whole)
)
print(
    f"{size}x{size}x{ch} {dt}: whole image + np.percentile {dt_w:.1f} s, peak RSS "
    f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (same 1st/99th percentiles)"
)
