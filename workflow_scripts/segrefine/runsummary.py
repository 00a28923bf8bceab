"""The end-of-run summary: which jobs failed, where their logs are, and why.

Snakemake's run log (.snakemake/log/<date>.snakemake.log) holds one `Error in rule <rule>:` block per
failed attempt, with the job's outputs, its `log:` files and, under SLURM, the external job id and
the SLURM log. `summarize_run` reads those blocks, keeps the last attempt of each job, decides from
the outputs on disk whether the job finally failed or succeeded on a retry, and takes the reason
from the last line of the job's own log (where `segrefine` prints its one-line error) or from the
executor's message (e.g. a SLURM state such as OUT_OF_MEMORY). Standard library only.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import Dict, List, Union

from .io import atomic_path

COLUMNS = ["status", "rule", "jobid", "outputs", "log", "external_jobid", "failed_attempts", "reason"]
_FIELD = re.compile(r"^ {4}(\w[\w ]*?): ?(.*)$")
_LOG_HINT = " (check log file(s) for error details)"


def _strip_shown_logs(lines: List[str]) -> List[str]:
    """Drop the job logs Snakemake prints after an error (`show-failed-logs`: a `Logfile <path>:` header,
    then the content between two `=====` rules): under SLURM they hold the job's own error blocks."""
    out, i = [], 0
    while i < len(lines):
        if (
            lines[i].startswith("Logfile ")
            and lines[i].endswith(":")
            and i + 1 < len(lines)
            and lines[i + 1]
            and set(lines[i + 1]) == {"="}
        ):
            fence, i = lines[i + 1], i + 2
            while i < len(lines) and lines[i] != fence:
                i += 1
            i += 1
            continue
        out.append(lines[i])
        i += 1
    return out


def parse_errors(log_text: str) -> List[Dict[str, str]]:
    """The `Error in rule` blocks of a Snakemake log, in order, as dicts of their fields."""
    blocks, current = [], None
    for line in _strip_shown_logs(log_text.splitlines()):
        m = re.match(r"^Error in rule (\w+):\s*$", line)
        if m:
            current = {"rule": m.group(1)}
            blocks.append(current)
            continue
        if current is None:
            continue
        f = _FIELD.match(line)
        if f and not line.startswith("     "):
            key, value = f.group(1), f.group(2).strip()
            if key == "log":
                value = value.replace(_LOG_HINT, "")
            current.setdefault(key, value)
        elif line and not line.startswith(" "):
            current = None  # the block ended
    return blocks


_ERROR_LINE = re.compile(r"error|exceeded|killed|cancelled|out of memory|oom", re.I)


def _error_line(path: str) -> str:
    """The last line of a log that reads like an error (`segrefine` ends its log with its one-line
    error; slurmstepd writes e.g. `Exceeded job memory limit`), or "" when there is none."""
    try:
        lines = [ln.strip() for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    hits = [ln for ln in lines if _ERROR_LINE.search(ln)]
    return hits[-1][:300] if hits else ""


def _messages(log_text: str) -> Dict[str, str]:
    """Executor messages naming an external job (e.g. `SLURM-job '12' failed, SLURM status is: ...`)."""
    out = {}
    for m in re.finditer(r"SLURM-job '([\w.]+)' failed[^\n]*", log_text):
        out[m.group(1)] = m.group(0).strip()
    return out


_EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit)\b.*)$", re.M)


def crash_row(log_text: str) -> Dict[str, str]:
    """The row of a run that Snakemake itself stopped with an exception (e.g. it could not remove or create an
    output in a read-only folder) before any job reported an error: the exception's last line as the reason."""
    hits = [m.group(1).strip() for m in _EXCEPTION.finditer(log_text) if not m.group(1).startswith("Error in rule")]
    reason = hits[-1][:300] if hits else "Snakemake stopped before the run finished (see the Snakemake log)"
    return {
        "status": "failed",
        "rule": "(snakemake)",
        "jobid": "",
        "outputs": "",
        "log": "",
        "external_jobid": "",
        "failed_attempts": "1",
        "reason": reason,
    }


def summarize_run(
    log_path: Union[None, str, List[str]], workdir: str = ".", crashed: bool = False
) -> List[Dict[str, str]]:
    """One row per job that failed at least once in the run logged at `log_path` (Snakemake 9 hands
    the handlers a list of log files); ``crashed``: Snakemake ended without calling its success or error handler,
    so a row of its own exception is added."""
    paths = [log_path] if isinstance(log_path, (str, os.PathLike)) else list(log_path or [])
    text = "\n".join(Path(p).read_text(errors="replace") for p in paths if p and Path(p).is_file())
    executor_msgs = _messages(text)
    jobs: Dict[str, Dict[str, str]] = {}
    attempts: Dict[str, int] = {}
    for block in parse_errors(text):
        key = block["rule"] + "|" + block.get("output", block.get("jobid", ""))
        attempts[key] = attempts.get(key, 0) + 1
        jobs[key] = block
    rows = []
    for key, block in jobs.items():
        outputs = [o.strip() for o in block.get("output", "").split(",") if o.strip()]
        done = bool(outputs) and all(os.path.exists(os.path.join(workdir, o)) for o in outputs)
        logs = [p.strip() for p in block.get("log", "").split(",") if p.strip()]
        ext = block.get("external_jobid", "")
        reason = ""
        for p in logs:  # the step's own log first, then e.g. the SLURM log
            reason = reason or _error_line(os.path.join(workdir, p))
        message = block.get("message", "")
        if message in ("", "None"):
            message = executor_msgs.get(ext, "")
        if message:
            message = message.split("For further error details")[0].strip()
            reason = message + (f" | {reason}" if reason else "")
        rows.append(
            {
                "status": "succeeded on retry" if done else "failed",
                "rule": block["rule"],
                "jobid": block.get("jobid", ""),
                "outputs": ",".join(outputs),
                "log": ",".join(logs),
                "external_jobid": ext,
                "failed_attempts": str(attempts[key]),
                "reason": reason or "no log (see the Snakemake log)",
            }
        )
    if crashed:
        rows.append(crash_row(text))
    return rows


def write_summary(rows: List[Dict[str, str]], out: str, fallback: str = ".snakemake/run_summary.tsv") -> str:
    """Write the summary at ``out``; where that fails (a read-only or full results folder, often the very
    reason the run failed) write it at ``fallback`` instead. Returns the path written."""

    def write(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            with open(tmp, "w", newline="") as fh:
                w = csv.DictWriter(fh, COLUMNS, delimiter="\t", lineterminator="\n")
                w.writeheader()
                w.writerows(rows)
        return str(path)

    try:
        return write(out)
    except OSError as exc:
        if not fallback:
            raise
        written = write(fallback)
        rows.append(
            {
                "status": "failed",
                "rule": "(run summary)",
                "jobid": "",
                "outputs": str(out),
                "log": "",
                "external_jobid": "",
                "failed_attempts": "1",
                "reason": f"{out}: cannot write ({exc.strerror or exc}); this summary is at {written}",
            }
        )
        return write(fallback)


def report(rows: List[Dict[str, str]]) -> str:
    jobs = [r for r in rows if not r["rule"].startswith("(")]  # "(snakemake)", "(run summary)": not jobs
    failed = [r for r in jobs if r["status"] == "failed"]
    lines = [
        f"SegRefine run summary: {len(failed)} job(s) failed"
        + (f", {len(jobs) - len(failed)} succeeded on retry" if len(jobs) > len(failed) else "")
        + ("; Snakemake itself stopped" if any(r["rule"] == "(snakemake)" for r in rows) else "")
    ]
    for r in rows:
        lines.append(
            f"  {r['status']}: rule {r['rule']} -> {r['outputs'] or '-'} "
            f"(failed attempts: {r['failed_attempts']}, "
            f"log: {r['log'] or '-'}): {r['reason']}"
        )
    return "\n".join(lines)
