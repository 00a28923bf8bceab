"""config/README.md names every sample-sheet column and every configuration section the schemas allow."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "config" / "README.md").read_text()


def test_every_sample_sheet_column_is_described():
    schema = yaml.safe_load((REPO / "config" / "schemas" / "samples.schema.yaml").read_text())
    rows = {line.split("|")[1].strip() for line in README.splitlines() if line.startswith("| `")}
    assert {f"`{c}`" for c in schema["properties"]} <= rows


def test_every_configuration_section_is_described():
    schema = yaml.safe_load((REPO / "config" / "schemas" / "config.schema.yaml").read_text())
    cells = " ".join(line.split("|")[1] for line in README.splitlines() if line.startswith("| `"))
    missing = [k for k in schema["properties"] if f"`{k}`" not in cells]
    assert not missing, f"config/README.md does not describe {missing}"
