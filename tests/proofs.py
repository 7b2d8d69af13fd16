"""The ``proves`` marker: the tests behind `gkd models`' "yes" cells (src/gkd/models/support.py).

``@pytest.mark.proves("TP")`` on a test parametrized by ``family`` claims that family's TP cell;
``@pytest.mark.proves("TP", families=[...])`` claims a list (a test that runs several families in one job).
``pytest --write-proofs`` rewrites src/gkd/models/proofs.json from this run: a cell whose claiming tests ran loses
the ones that failed or skipped and keeps those that passed; cells whose tests did not run are left as they were.
``pytest --collect-only --list-proofs FILE`` writes what the collected tests claim (tests/test_table.py compares
it with proofs.json and with what gkd implements). Works under pytest-xdist: the claims ride on each report.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

KEY = "proves"


def claims(item) -> list[list[str]]:
    """[[model_type, column], ...] that ``item`` claims to prove."""
    out = []
    for mark in item.iter_markers(KEY):
        column, families = mark.args[0], mark.kwargs.get("families")
        if families is None:
            callspec = getattr(item, "callspec", None)
            if callspec is None or "family" not in callspec.params:
                raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.proves({column!r}) needs families=[...] "
                                        "or a `family` parameter")
            families = [callspec.params["family"]]
        out += [[family, column] for family in families]
    return out


def pytest_addoption(parser):
    parser.addoption("--write-proofs", action="store_true",
                     help="rewrite src/gkd/models/proofs.json from the `proves` tests of this run")
    parser.addoption("--list-proofs", metavar="FILE", help="write what the collected tests claim to prove to FILE")


def pytest_configure(config):
    config.addinivalue_line("markers", "proves(column, families=None): the test proves `gkd models`' cell(s) "
                                       "of column for its `family` parameter or the families listed")
    if "PYTEST_XDIST_WORKER" not in os.environ:  # the process that sees every report
        config.pluginmanager.register(Outcomes(config.getoption("--write-proofs")), "gkd-proofs")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    listed = {}
    for item in items:
        cells = claims(item)
        if cells:
            item.user_properties.append((KEY, cells))  # (serialised with each report, to xdist's controller)
            for family, column in cells:
                listed.setdefault(family, {}).setdefault(column, []).append(item.nodeid)
    if config.getoption("--list-proofs"):
        Path(config.getoption("--list-proofs")).write_text(json.dumps(listed, indent=1, sort_keys=True))


class Outcomes:
    """Which claiming tests passed (their call passed, no phase failed or skipped); at the end, with
    --write-proofs, proofs.json updated for the tests that ran."""

    def __init__(self, write: bool):
        self.write, self.cells, self.passed, self.bad = write, {}, set(), set()

    def pytest_runtest_logreport(self, report):
        cells = next((v for k, v in report.user_properties if k == KEY), None)
        if not cells:
            return
        self.cells[report.nodeid] = cells
        if report.when == "call" and report.passed:
            self.passed.add(report.nodeid)
        if report.failed or report.skipped:
            self.bad.add(report.nodeid)

    def pytest_sessionfinish(self, session):
        if not self.write:
            return
        from gkd.models import support

        proved = support.proofs()
        for test_id, cells in self.cells.items():
            for family, column in cells:
                ids = proved.setdefault(family, {}).setdefault(column, [])
                if test_id in ids:  # it ran: it stays only if it passed
                    ids.remove(test_id)
                if test_id in self.passed and test_id not in self.bad:
                    ids.append(test_id)
        proved = {f: {c: sorted(ids) for c, ids in cols.items() if ids} for f, cols in proved.items()}
        support.PROOFS.write_text(json.dumps({f: c for f, c in proved.items() if c}, indent=1, sort_keys=True) + "\n")

    def pytest_terminal_summary(self, terminalreporter):
        if self.write:
            ok = len(self.passed - self.bad)
            terminalreporter.write_line(f"--write-proofs: {ok} of {len(self.cells)} proving test cases passed; "
                                        "src/gkd/models/proofs.json updated")
