"""GPU allocation (segrefine.devices): one device per concurrent job."""

import os

import pytest

from segrefine import SegRefineError
from segrefine.devices import gpu_device


def test_each_concurrent_gpu_job_gets_its_own_device(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGREFINE_GPU_LOCK_DIR", str(tmp_path))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with gpu_device(1) as a:
        assert os.environ["CUDA_VISIBLE_DEVICES"] == a
        os.environ["CUDA_VISIBLE_DEVICES"] = "3,5"  # a second job starts with the same environment
        with gpu_device(1) as b:
            assert {a, b} == {"3", "5"}
            os.environ["CUDA_VISIBLE_DEVICES"] = "3,5"
            with pytest.raises(SegRefineError, match="no free GPU among \\['3', '5'\\]"):
                with gpu_device(1, timeout_s=0.2, poll_s=0.05):
                    pass
    with gpu_device(1) as c:  # released when the jobs ended
        assert c == "3"
    with gpu_device(0) as none:
        assert none is None
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    with gpu_device(1) as s:
        assert s == "1"  # under SLURM the allocation's device is kept
