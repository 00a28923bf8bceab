# The end-of-run summary: after every run (success or failure) results/run_summary.tsv lists each
# job that failed at least once (final status, rule, outputs, log path, SLURM job id, attempts, and
# why: the step's one-line error or the SLURM state), and the same is printed. With keep-going
# (profiles/slurm) a failing sample does not stop the others; this says which failed and why.
# When Snakemake itself stops with an exception (e.g. it cannot remove or create an output in a read-only folder) it
# calls neither handler: the summary is then written at exit, with Snakemake's exception as the reason. Where the
# results folder cannot be written, the summary goes to .snakemake/run_summary.tsv and says so.
# imported as a module: a bare `report` would hide Snakemake's report() from rule files included later
import atexit  # noqa: E402

from segrefine import runsummary  # noqa: E402

_SUMMARY = {"log": None, "done": False}


def _run_summary(log, crashed=False):
    if _SUMMARY["done"]:
        return
    _SUMMARY["done"] = True
    rows = runsummary.summarize_run(log, crashed=crashed)
    written = runsummary.write_summary(rows, f"{RESULTS}/run_summary.tsv")
    if rows:
        print(runsummary.report(rows) + f"\n(written to {written})", file=sys.stderr)


def _summary_at_exit():
    if _SUMMARY["log"] is not None and not _SUMMARY["done"]:
        _run_summary(_SUMMARY["log"], crashed=True)


atexit.register(_summary_at_exit)


onstart:
    _SUMMARY["log"] = log


onsuccess:
    _run_summary(log)


onerror:
    _run_summary(log)
