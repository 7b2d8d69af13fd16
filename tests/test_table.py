"""`gkd models`' table claims only what the tests proved: every cell gkd runs is claimed by a test marked
``@pytest.mark.proves`` (tests/proofs.py), every claim is a cell gkd runs, src/gkd/models/proofs.json (what
``pytest --write-proofs`` recorded passing) names exactly those tests, and each "yes" names them."""

import json
import re
import subprocess
import sys
from pathlib import Path

from gkd.models import support
from helpers import ROOT


def _claimed(tmp_path) -> dict:
    out = tmp_path / "claims.json"
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:xdist", "-p",
                           "no:cacheprovider", "--list-proofs", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def _cells(table: dict) -> set:
    return {(family, column) for family, columns in table.items() for column in columns}


def test_every_cell_gkd_runs_is_claimed_by_a_test_and_proofs_json_names_them(tmp_path):
    claimed = _claimed(tmp_path)
    runs = {(r["model_type"], c) for r in support.implemented() for c in support.COLUMNS if r[c]}
    assert _cells(claimed) - runs == set(), "tests claim cells that gkd refuses"
    assert runs - _cells(claimed) == set(), "gkd runs these without a test that proves them"
    assert support.proofs() == claimed, ("src/gkd/models/proofs.json is not what the tests claim: run the proving "
                                         "tests with `pytest --write-proofs` and commit the file")


def test_gkd_models_prints_each_yes_with_its_proofs():
    proc = subprocess.run([sys.executable, "-m", "gkd", "models"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == support.markdown()
    table, legend, outside = (proc.stdout.split("\n\n") + [""])[:3]
    assert "unproved" not in table
    refs = dict(re.findall(r"^\[(\d+)\] (\S+)$", legend, re.MULTILINE))
    for r in support.rows():
        line = next(x for x in table.splitlines() if f"`{r['model_type']}`" in x)
        cells = [c.strip() for c in line.strip("|").split("|")][3:]
        for column, cell in zip(support.COLUMNS, cells):
            if r[column] is True:  # "yes [1],[5]": each number a test id, which is one of the cell's proofs
                named = {refs[n].replace("<model_type>", r["model_type"]) for n in re.findall(r"\[(\d+)\]", cell)}
                assert cell.startswith("yes ") and named == set(r["proofs"][column]), (r["model_type"], column, cell)
            elif column in r["causes"]:  # "no [a]": a cause outside gkd, named below the table
                letter = re.fullmatch(r"no \[([a-z])\]", cell)
                assert letter and f"[{letter[1]}] {r['causes'][column]}" in outside, (r["model_type"], column, cell)
            else:
                assert cell == ("—" if r[column] is None else "no"), (r["model_type"], column, cell)
    doc = (Path(ROOT) / "docs" / "models.md").read_text()
    assert support.markdown() in doc, "docs/models.md's family table is not `gkd models`' output: paste it again"
