"""The execution profiles cover the workflow's rules: every rule that may ask for a GPU is given memory,
time and CPUs per GPU by profiles/slurm (not the 2 GB / 30 min defaults), threads on the cluster, and
every rule the profile names exists (a renamed rule would silently fall back to the defaults)."""

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _rules():
    """{rule name: its text} of rules/*.smk, `use rule A as B with:` included (B inherits A's text)."""
    rules = {}
    for smk in sorted((REPO / "rules").glob("*.smk")):
        text = smk.read_text()
        heads = list(re.finditer(r"^(?:rule (\w+)|use rule (\w+) as (\w+) with):", text, re.M))
        for k, m in enumerate(heads):
            body = text[m.end() : heads[k + 1].start() if k + 1 < len(heads) else len(text)]
            if m.group(1):
                rules[m.group(1)] = body
            else:
                rules[m.group(3)] = body + "\n" + rules.get(m.group(2), "")
    return rules


def test_gpu_rules_get_memory_time_and_cpus_per_gpu_on_slurm():
    prof = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    rules = _rules()
    gpu_rules = {r for r, body in rules.items() if re.search(r"^\s+gpu=", body, re.M)}
    assert {"finetune", "evaluate", "segment_shard", "segment_shard_qc", "train_base"} <= gpu_rules
    for r in sorted(gpu_rules):
        res = prof["set-resources"].get(r)
        assert res and {"mem_mb", "runtime", "cpus_per_gpu"} <= set(res), f"profiles/slurm: {r} lacks resources"
        assert "attempt" in str(res["mem_mb"]), f"{r}: memory must grow with the attempt"
        assert r in prof["set-threads"], f"profiles/slurm: {r} has no threads"
    named = set(prof["set-resources"]) | set(prof["set-threads"])
    assert named <= set(rules), f"profiles/slurm names rules that do not exist: {sorted(named - set(rules))}"
