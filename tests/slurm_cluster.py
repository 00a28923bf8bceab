"""A private one-node SLURM (Debian slurm-wlm + munge) for the cluster tests and bench/cluster.py.

The node has a fake GPU (gres.conf `Name=gpu File=/dev/null`): SLURM schedules it like a real one,
so two jobs that ask for a GPU never run at once. Accounting is off (like many small clusters),
so `sacct` fails and the Snakemake SLURM plugin must use `squeue` (MinJobAge keeps finished jobs
visible to squeue). Two partitions, `cpu` and `gpu`, on the one node, the names profiles/slurm uses.

slurm.conf must sit at /etc/slurm/slurm.conf: job steps (`srun` inside a job, which the plugin's
jobstep executor uses) do not see SLURM_CONF. The cluster writes that file only when none exists
or when the one there is its own (marked), and removes it on stop. munged, slurmctld and slurmd
are started in the foreground as children and stopped by their PIDs.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

SLURM_CONF = Path("/etc/slurm/slurm.conf")
GRES_CONF = Path("/etc/slurm/gres.conf")
MARK = "# segrefine test cluster: written by tests/slurm_cluster.py, removed when it stops"
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "sinfo", "scontrol", "srun")


class SlurmUnavailable(RuntimeError):
    """This machine cannot run the private cluster (the message says why)."""


def missing_programs():
    found = {
        p: shutil.which(p) or (f"/usr/sbin/{p}" if Path(f"/usr/sbin/{p}").exists() else None) for p in DAEMONS + CLIENTS
    }
    return sorted(p for p, path in found.items() if path is None)


def _sbin(name):
    return shutil.which(name) or f"/usr/sbin/{name}"


def _port_free(port):
    with socket.socket() as s:
        # SO_REUSEADDR: connections of a cluster stopped a minute ago (TIME_WAIT) do not count; on
        # Linux a port with a listening socket still fails to bind
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class OneNodeSlurm:
    """Start with `start()`, stop with `stop()` (or use it as a context manager)."""

    def __init__(self, cpus: int | None = None, memory_mb: int = 16000, min_job_age: int = 600):
        self.host = socket.gethostname().split(".")[0]
        self.cpus = cpus or os.cpu_count() or 1
        self.memory_mb = memory_mb
        self.min_job_age = min_job_age
        self.dir = Path(tempfile.mkdtemp(prefix="segrefine-slurm-"))
        self.procs: dict[str, subprocess.Popen] = {}

    # --- configuration ---
    def slurm_conf(self):
        d = self.dir
        return f"""{MARK}
ClusterName=segrefine
SlurmctldHost={self.host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# memory is enforced without cgroups: a step over its --mem is killed (state OUT_OF_MEMORY)
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=1
JobAcctGatherParams=OverMemoryKill
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
MinJobAge={self.min_job_age}
ReturnToService=2
SlurmdParameters=config_overrides
MpiDefault=none
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} Gres=gpu:1 State=UNKNOWN
PartitionName=cpu Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes={self.host} MaxTime=INFINITE State=UP
"""

    def _check_writable(self):
        for path in (SLURM_CONF, GRES_CONF):
            if path.exists() and MARK not in path.read_text(errors="replace"):
                raise SlurmUnavailable(f"{path} exists and is not this test cluster's: refusing to overwrite it")
        if not os.access(SLURM_CONF.parent if SLURM_CONF.parent.exists() else "/etc", os.W_OK):
            raise SlurmUnavailable(f"cannot write {SLURM_CONF} (the cluster needs root)")

    # --- life cycle ---
    def start(self, timeout: float = 60):
        missing = missing_programs()
        if missing:
            raise SlurmUnavailable(
                f"SLURM/munge programs not installed: {', '.join(missing)} "
                "(`make setup-slurm` installs slurm-wlm and munge with apt-get)"
            )
        for port in (6817, 6818):
            if not _port_free(port):
                raise SlurmUnavailable(f"port {port} is in use (another slurmctld/slurmd is running)")
        self._check_writable()
        for sub in ("state", "spool", "munge"):
            (self.dir / sub).mkdir()
        SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
        SLURM_CONF.write_text(self.slurm_conf())
        GRES_CONF.write_text(f"{MARK}\nNodeName={self.host} Name=gpu File=/dev/null\n")
        log = open(self.dir / "daemons.out", "ab")
        try:
            if not self._munge_ok():
                Path("/run/munge").mkdir(parents=True, exist_ok=True)
                self.procs["munged"] = subprocess.Popen(
                    [_sbin("munged"), "--foreground", "--force"], stdout=log, stderr=log
                )
                self._wait(self._munge_ok, 15, "munged")
            self.procs["slurmctld"] = subprocess.Popen([_sbin("slurmctld"), "-D", "-i"], stdout=log, stderr=log)
            self._wait(lambda: self._run("scontrol", "ping").returncode == 0, timeout, "slurmctld")
            self.procs["slurmd"] = subprocess.Popen([_sbin("slurmd"), "-D"], stdout=log, stderr=log)
            self._wait(self._node_idle, timeout, "slurmd (node idle)")
        except Exception:
            self.stop()
            raise
        return self

    def stop(self):
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)
        for path in (SLURM_CONF, GRES_CONF):
            if path.exists() and MARK in path.read_text(errors="replace"):
                path.unlink()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # --- helpers ---
    def _run(self, *cmd):
        return subprocess.run(list(cmd), capture_output=True, text=True)

    def _munge_ok(self):
        if not shutil.which("munge") or not shutil.which("unmunge"):
            return False
        enc = subprocess.run(["munge", "-n"], capture_output=True)
        return (
            enc.returncode == 0 and subprocess.run(["unmunge"], input=enc.stdout, capture_output=True).returncode == 0
        )

    def _node_idle(self):
        out = self._run("sinfo", "-h", "-N", "-o", "%t").stdout.split()
        return bool(out) and all(s.startswith("idle") or s == "mix" for s in out)

    def _wait(self, check, timeout, what):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise SlurmUnavailable(f"{name} exited with code {proc.returncode}: {self.logs()[-2000:]}")
            if check():
                return
            time.sleep(0.3)
        raise SlurmUnavailable(f"{what} not ready after {timeout} s: {self.logs()[-2000:]}")

    def logs(self):
        files = sorted(self.dir.glob("*.log")) + [self.dir / "daemons.out"]
        return "\n".join(p.read_text(errors="replace") for p in files if p.exists())

    def jobs(self):
        """Every job the controller still knows (MinJobAge keeps finished ones): a list of dicts with
        id, name (the Snakemake run id), comment (`rule_<rule>_wildcards_<...>`), state, partition,
        submit/start/end (epoch seconds), cpus, mem, gres (the GPU request as SLURM recorded it)."""
        out = self._run("scontrol", "show", "job", "-o").stdout
        jobs = []
        for line in out.splitlines():
            if not line.strip() or line.startswith("No jobs"):
                continue
            fields = dict(tok.split("=", 1) for tok in line.split() if "=" in tok)
            jobs.append(
                {
                    "id": fields.get("JobId"),
                    "name": fields.get("JobName"),
                    "comment": fields.get("Comment", ""),
                    "state": fields.get("JobState"),
                    "partition": fields.get("Partition"),
                    "submit": _epoch(fields.get("SubmitTime")),
                    "start": _epoch(fields.get("StartTime")),
                    "end": _epoch(fields.get("EndTime")),
                    "cpus": int(fields.get("NumCPUs", "0")),
                    "mem": fields.get("MinMemoryNode", ""),
                    "gres": ",".join(v for k, v in fields.items() if k in ("TresPerJob", "TresPerNode") and v),
                    "exit": fields.get("ExitCode"),
                }
            )
        return jobs


def _epoch(stamp):
    if not stamp or stamp in ("Unknown", "None"):
        return None
    return time.mktime(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S"))
