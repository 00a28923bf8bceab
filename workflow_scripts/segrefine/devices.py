"""One GPU per concurrent model job: a small lock-file device allocator.

Snakemake only counts the `gpu` resource; it does not say which device a job
gets. Each job that declares `gpu=1` calls ``gpu_device(1)``: it takes an
exclusive ``flock`` on one lock file per visible device and sets
``CUDA_VISIBLE_DEVICES`` to the device it holds, so two concurrent jobs never
share a device. The kernel drops the lock when the process ends, even when it
is killed, so a crashed job never leaves a device "taken". Under SLURM the
allocation's ``CUDA_VISIBLE_DEVICES`` is kept as it is (SLURM already gave
this job its own device).

Standard library only: it runs in every framework's env before the framework
is imported.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator, List, Optional

from segrefine import SegRefineError

log = logging.getLogger("segrefine.devices")


def visible_gpus() -> List[str]:
    """Device ids this process may use: CUDA_VISIBLE_DEVICES if set, else what nvidia-smi lists, else none."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(line for line in out.splitlines() if line.startswith("GPU "))]


def lock_dir() -> Path:
    d = os.environ.get("SEGREFINE_GPU_LOCK_DIR") or str(
        Path(tempfile.gettempdir()) / f"segrefine-gpu-locks-{os.getuid()}"
    )
    Path(d).mkdir(parents=True, exist_ok=True)
    return Path(d)


@contextlib.contextmanager
def gpu_device(count: int, timeout_s: Optional[float] = None, poll_s: float = 1.0) -> Iterator[Optional[str]]:
    """Hold one GPU for the duration of the block (``count`` is the job's `gpu` resource: 0 or 1).

    Yields the device id (also set as CUDA_VISIBLE_DEVICES), or None where no
    GPU is requested or visible (the model then runs on the CPU)."""
    import fcntl

    if count <= 0:
        yield None
        return
    if os.environ.get("SLURM_JOB_ID") and os.environ.get("CUDA_VISIBLE_DEVICES"):
        log.info(
            "SLURM job %s: using the allocation's device(s) CUDA_VISIBLE_DEVICES=%s",
            os.environ["SLURM_JOB_ID"],
            os.environ["CUDA_VISIBLE_DEVICES"],
        )
        yield os.environ["CUDA_VISIBLE_DEVICES"]
        return
    devices = visible_gpus()
    if not devices:
        log.info("no GPU visible: the model runs on the CPU")
        yield None
        return
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    start, last_note = time.monotonic(), 0.0
    while True:
        for dev in devices:
            fh = open(lock_dir() / f"gpu-{dev}.lock", "a+")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.close()
                continue
            try:
                fh.seek(0)
                fh.truncate()
                fh.write(f"{os.getpid()}\n")
                fh.flush()
                os.environ["CUDA_VISIBLE_DEVICES"] = dev
                log.info("holding GPU %s (lock %s)", dev, fh.name)
                yield dev
            finally:
                if before is None:
                    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
                else:
                    os.environ["CUDA_VISIBLE_DEVICES"] = before
                fcntl.flock(fh, fcntl.LOCK_UN)
                fh.close()
            return
        waited = time.monotonic() - start
        if timeout_s is not None and waited > timeout_s:
            raise SegRefineError(
                f"no free GPU among {devices} after {waited:.0f} s (locks in {lock_dir()}): "
                "more concurrent GPU jobs than devices; lower the `gpu` resource"
            )
        if waited - last_note >= 30:
            log.info("all GPUs %s are held by other jobs; waiting", devices)
            last_note = waited
        time.sleep(poll_s)
