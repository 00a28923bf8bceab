# The end-of-run summary: after every run (success or failure) results/run_summary.tsv lists each
# job that failed at least once (final status, rule, outputs, log path, SLURM job id, attempts, and
# why: the step's one-line error or the SLURM state), and the same is printed. With keep-going
# (profiles/slurm) a failing sample does not stop the others; this says which failed and why.
# imported as a module: a bare `report` would hide Snakemake's report() from rule files included later
from segrefine import runsummary  # noqa: E402


def _run_summary(log):
    rows = runsummary.summarize_run(log)
    runsummary.write_summary(rows, f"{RESULTS}/run_summary.tsv")
    if rows:
        print(runsummary.report(rows), file=sys.stderr)


onsuccess:
    _run_summary(log)


onerror:
    _run_summary(log)
