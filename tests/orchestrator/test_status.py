"""`bnnctl study status` of a large study: a summary, pages, every variant on request; the same
answers as the variants themselves give."""
import re

from typer.testing import CliRunner

from bnnctl.orchestrator.cli import app
from bnnctl.orchestrator.cli.study import STATUS_PAGE
from bnnctl.orchestrator.records import VariantRow
from bnnctl.orchestrator.store import Store
from storefill import fill

runner = CliRunner()


def _status(url: str, *args: str):
    r = runner.invoke(app, ["study", "status", "s", "--db", url, *args], env={"COLUMNS": "250"})
    return r.exit_code, r.output


def test_a_small_study_shows_every_variant(tmp_path):
    url = f"sqlite:///{tmp_path / 'state.db'}"
    keys = fill(Store(url), "s", 3)
    code, out = _status(url)
    assert code == 0 and all(k in out for k in keys) and "by row" not in out
    assert re.search(rf"{keys[-1]}\s+│\s+row\s+│\s+running\s+│\s+1\s+│\s+host", out)


def test_a_large_study_is_summarised_by_row_and_paged(tmp_path):
    url = f"sqlite:///{tmp_path / 'state.db'}"
    store = Store(url)
    keys = fill(store, "s", 60)  # 120 variants, more than a page
    s = store.study("s")
    failed = keys[5]
    with store.session() as session:  # one failed variant among the completed ones
        session.get(VariantRow, failed).status = "failed"
        session.get(VariantRow, failed).error = "loss became NaN"
    code, out = _status(url)
    assert code == 0 and f"{s.name}: running, by row" in out
    row2 = re.search(r"│ ab\s+│ r2\s+│\s+(\d+)\s+│\s+(\d*)\s+│\s+(\d*)\s+│\s+(\d*)\s+│\s+(\d+)", out)
    assert row2 is not None and row2.groups() == ("2", "1", "1", "", "2")  # completed, failed, running columns
    assert "running and failed variants (2 of 2)" in out and failed in out and keys[-1] in out
    assert "loss became NaN" in out and keys[0] not in out  # a finished variant is not listed
    assert f"{len(keys)} variants: --all shows every one, --page N {STATUS_PAGE} at a time" in out
    code, page2 = _status(url, "--page", "2")
    assert code == 0 and f"(variants {STATUS_PAGE + 1}-{len(keys)} of {len(keys)}, page 2 of 2)" in page2
    assert all(k in page2 for k in keys[STATUS_PAGE:]) and keys[0] not in page2
    code, every = _status(url, "--all")
    assert code == 0 and all(k in every for k in keys)
    code, beyond = _status(url, "--page", "3")
    assert code != 0 and "--page 3: s has 120 variants, 2 page(s) of 100" in beyond and "Traceback" not in beyond
