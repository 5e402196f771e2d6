"""The dashboard in a real headless Chromium (Debian's chromium + chromedriver, driven by Selenium),
against a store filled by the real driver running a small study and a small tuning (real training,
MLflow, sqlite and PostgreSQL) on the in-process backend: what is tested here is the pages, so no
Ray cluster starts (the study and tuning tests run the same drivers on Ray)."""
import dataclasses
import hashlib
import os
import shutil
import sqlite3
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import studies as specs

from bnnctl.orchestrator.formats import format_latency, format_value
from bnnctl.orchestrator.report import build_tables
from bnnctl.orchestrator.store import Store
from dashserver import Server, free_port

pytestmark = pytest.mark.slow

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    if os.environ.get("CI"):
        raise RuntimeError("CI must install Debian's chromium and chromium-driver (.ci/run does)")
    pytest.skip("headless Chromium not installed (apt-get install chromium chromium-driver)", allow_module_level=True)

TANH = {"model": {"binarize": {"quantizer": "tanh"}}}


def _study(root):
    return specs.study("dash", root, specs.rows(
        {"name": "relu", "set": {"model.activation.kind": "relu"}, "reference": 76.3},
        {"name": "prelu", "set": {"model.activation.kind": "prelu"}, "reference": 79.1},
    ), ablation="acts", seeds=(0, 1), description="A tiny isolated ablation over two seeds.",
        base_fields={"latency": True}, tracking={"experiment": "dash"}, execution={"max_parallel": 2})


def _tuning(root):
    # the tuning page shows no latency (the study above measures it)
    return specs.tuning("dash-tune", root, {
        "lambda_schedule.lambda_start": {"type": "float", "low": 0.5, "high": 2, "log": True},
        "lambda_schedule.lambda_end": {"type": "float", "low": 5, "high": 100, "log": True},
    }, trials=4, sampler={"name": "random", "seed": 0}, pruner={"name": "none"}, execution={"max_parallel": 2},
        base_fields={**TANH, "lambda_schedule": {"kind": "exponential", "lambda_start": 1.0, "lambda_end": 20.0}})


def _stages(root):
    prelu = {"model.activation.kind": "prelu"}
    return specs.study("dash-stages", root, specs.rows(
        ("single", prelu), {"name": "reverse", "set": prelu, "stages": "reverse_order"},
    ), ablation="order", description="A two-stage row beside a single-stage one.", tracking={"experiment": "dash"},
        base_fields={**TANH, "epochs": 4, "lambda_schedule": {"kind": "linear", "lambda_start": 1.0, "lambda_end": 20.0}})


def _prune(root):
    # no run passes the threshold: every trial but the default stops after epoch 1
    return specs.tuning("dash-prune", root, {
        "lambda_schedule.lambda_end": {"type": "float", "low": 5, "high": 100, "log": True},
    }, trials=3, sampler={"name": "random", "seed": 0}, pruner={"name": "threshold", "lower": 1000},
        base_fields={**TANH, "epochs": 3,
                     "lambda_schedule": {"kind": "exponential", "lambda_start": 1.0, "lambda_end": 20.0}})


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def filled(tmp_path_factory, request):
    """A store filled by a real study and a real tuning, and the dashboard serving it: on sqlite, and
    on a real PostgreSQL server (its URL with a password, which no page may show)."""
    from bnnctl.orchestrator.backends.inprocess import InProcessBackend
    from bnnctl.orchestrator.runcore import RunOptions
    from bnnctl.orchestrator.study import run_study
    from bnnctl.orchestrator.tuning import run_tuning

    root = tmp_path_factory.mktemp("dash")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        specs.write(root, _study(root / "syn"), "dash.yaml")
        specs.write(root, _tuning(root / "syn"), "tune.yaml")
        db = f"sqlite:///{root / '.bnnctl' / 'state.db'}"
        if request.param == "postgresql":
            db = request.getfixturevalue("pg_server").database()
        inprocess = RunOptions(db=db, backend_instance=InProcessBackend(capacity=2))
        assert run_study(root / "dash.yaml", options=inprocess).status == "completed"
        notrack = RunOptions(db=db, track=False, backend_instance=InProcessBackend(capacity=2))
        assert run_tuning(root / "tune.yaml", options=notrack).status == "completed"
        specs.write(root, _stages(root / "syn"), "stages.yaml")
        specs.write(root, _prune(root / "syn"), "prune.yaml")
        assert run_study(root / "stages.yaml", options=notrack).status == "completed"
        version = dataclasses.replace(notrack, overrides=(("optim.lr", 0.01),))
        assert run_study(root / "stages.yaml", options=version).study == "dash-stages@optim.lr=0.01"
        assert run_tuning(root / "prune.yaml", options=notrack).status == "completed"
        before = _fingerprint(root, db)
        server = Server(db, root / ".bnnctl" / "runs", mlflow_url="http://127.0.0.1:5000")
        yield {"root": root, "db": db, "server": server, "fingerprint": before}
        server.stop()
    finally:
        os.chdir(cwd)


def _fingerprint(root: Path, db: str) -> dict:
    """The row counts and last changes of the state database's tables; for sqlite also the bytes of
    the file and its WAL."""
    from sqlalchemy import create_engine, text

    out = {}
    for name in ("state.db", "state.db-wal"):
        p = root / ".bnnctl" / name
        out[name] = hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else None
    engine = create_engine(db)
    with engine.connect() as c:
        out["rows"] = [c.execute(text(f"SELECT count(*) FROM {t}")).scalar()
                       for t in ("bnnctl_studies", "bnnctl_variants", "bnnctl_attempts", "bnnctl_metrics", "trials")]
        out["changed"] = [str(c.execute(text(f"SELECT max(updated_at) FROM {t}")).scalar())
                          for t in ("bnnctl_studies", "bnnctl_variants")]
    engine.dispose()
    return out


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1800"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _shot(browser, name: str, tmp_path) -> Path:
    """A screenshot (also copied to $BNNCTL_SCREENSHOTS when set, to look at)."""
    path = tmp_path / f"{name}.png"
    browser.save_screenshot(str(path))
    assert path.stat().st_size > 10_000  # a rendered page, not a blank one
    if os.environ.get("BNNCTL_SCREENSHOTS"):
        Path(os.environ["BNNCTL_SCREENSHOTS"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(os.environ["BNNCTL_SCREENSHOTS"]) / path.name)
    return path


def _wait(fn, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.2)
    return fn()


def _charts_drawn(browser) -> int:
    return browser.execute_script("return document.querySelectorAll('[data-plot] .main-svg').length")


def test_studies_page(filled, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(filled["server"].url + "/")
    rows = {r.get_attribute("data-name"): r for r in browser.find_elements(By.CSS_SELECTOR, "#studies tbody tr")}
    assert set(rows) == {"dash", "dash-tune", "dash-stages", "dash-stages@optim.lr=0.01", "dash-prune"}
    cells = [c.text for c in rows["dash"].find_elements(By.TAG_NAME, "td")]
    assert cells[:7] == ["dash", "", "study", cells[3], "completed", "pckh", "4 completed"]  # 2 rows x 2 seeds
    assert cells[3].endswith("dash.yaml")
    assert rows["dash-tune"].find_elements(By.TAG_NAME, "td")[2].text == "tuning"
    assert rows["dash-stages@optim.lr=0.01"].find_elements(By.TAG_NAME, "td")[1].text == "optim.lr=0.01"
    assert rows["dash-prune"].find_elements(By.TAG_NAME, "td")[6].text == "1 completed 2 pruned"

    def visible():
        return [r.get_attribute("data-name") for r in browser.find_elements(By.CSS_SELECTOR, "#studies tbody tr")
                if r.is_displayed()]

    search = browser.find_element(By.ID, "studies-search")
    search.send_keys("kind:tuning")
    assert sorted(visible()) == ["dash-prune", "dash-tune"]
    assert browser.find_element(By.CSS_SELECTOR, "[data-count-for=studies]").text == "2 of 5"
    search.clear()
    search.send_keys("stages")  # plain words: anywhere in the row
    assert sorted(visible()) == ["dash-stages", "dash-stages@optim.lr=0.01"]
    search.clear()
    search.send_keys(" ")
    header = browser.find_element(By.XPATH, "//table[@id='studies']/thead/tr/th[1]")
    header.click()
    assert visible() == sorted(rows)  # by name
    header.click()
    assert visible() == sorted(rows, reverse=True)
    # config columns: the base config of each study; the ones that differ are offered and comparable
    browser.find_element(By.CSS_SELECTOR, "details.columns summary").click()
    box = browser.find_element(By.CSS_SELECTOR, "input[data-column-for=studies][value='optim.lr']")
    if not box.is_selected():
        box.click()
    heads = [th.get_attribute("textContent") for th in browser.find_elements(By.CSS_SELECTOR, "#studies thead th")]
    column = heads.index("optim.lr")
    assert browser.find_elements(By.CSS_SELECTOR, "#studies thead th")[column].is_displayed()
    lr = {r.get_attribute("data-name"): r.find_elements(By.TAG_NAME, "td")[column].text
          for r in browser.find_elements(By.CSS_SELECTOR, "#studies tbody tr")}
    assert lr["dash-stages@optim.lr=0.01"] == "0.01" and lr["dash"] == lr["dash-stages"] != "0.01"
    search.clear()
    search.send_keys("optim.lr<0.005 kind:study")
    assert sorted(visible()) == ["dash", "dash-stages"]
    search.clear()
    search.send_keys("epochs>3")
    assert sorted(visible()) == ["dash-stages", "dash-stages@optim.lr=0.01"]  # a config column compared as numbers
    search.clear()
    search.send_keys(" ")
    _shot(browser, "studies", tmp_path)


def test_study_page_numbers_match_the_store(filled, browser, tmp_path):
    from selenium.webdriver.common.by import By

    store = Store(filled["db"], readonly=True)
    s = store.study("dash")
    members = store.members(s.id)
    (table,) = build_tables(s.spec, members, store.variants([m.variant_key for m in members]))
    browser.get(filled["server"].url + "/study/dash")
    page_rows = browser.find_elements(By.CSS_SELECTOR, "table.ablation-table tbody tr")
    assert [r.get_attribute("data-row") for r in page_rows] == ["relu", "prelu"]  # spec order
    for row, expected in zip(page_rows, table.rows):
        value = row.find_element(By.CSS_SELECTOR, "td.value")
        assert value.text == format_value(expected.cell)
        assert float(value.get_attribute("data-mean")) == pytest.approx(expected.cell.mean)
        assert len(expected.cell.values) == 2  # both seeds
        assert row.find_element(By.CSS_SELECTOR, "td.paper").text == f"{expected.reference:.4g}"
        # the measured latency of the deployed model, with its speed-up over float32
        assert expected.latency_ms > 0 and row.find_element(By.CSS_SELECTOR, "td.latency").text == \
            format_latency(expected.latency_ms, expected.latency_float_ms, expected.latency_spread, True)
        assert expected.latency_quiet is True  # timed again at the end of the study, on a quiet worker
        lo, hi = expected.latency_spread
        assert lo <= expected.latency_ms <= hi
        assert ("best" in row.get_attribute("class").split()) == expected.best
        links = row.find_elements(By.CSS_SELECTOR, "td.links a")
        assert [a.text for a in links] == ["seed 0", "seed 1"]
    assert page_rows[0].find_element(By.CSS_SELECTOR, "td.delta").text == "baseline"
    assert f"measured on {table.latency_machines[0]}" in browser.find_element(By.CSS_SELECTOR, "p.rule").text
    assert _wait(lambda: _charts_drawn(browser) >= 1)  # the bar chart, drawn by Plotly served locally
    # the paper's per-joint groups; the 16 raw joints on demand
    heads = [th.text for th in browser.find_elements(By.CSS_SELECTOR, "#joint-groups thead th")]
    assert heads == ["ablation", "row", "Head", "Shoulder", "Elbow", "Wrist", "Hip", "Knee", "Ankle", "Mean"]
    relu = [td.text for td in browser.find_elements(By.CSS_SELECTOR, "#joint-groups tbody tr")[0].find_elements(By.TAG_NAME, "td")]
    assert relu[-1] == f"{table.rows[0].cell.mean:.1f}"
    assert not browser.find_element(By.ID, "per-joint").is_displayed()  # folded
    joints = browser.find_elements(By.CSS_SELECTOR, "#per-joint thead th")
    assert "head_top" in [j.get_attribute("textContent") for j in joints]
    # overlaid curves: one line per row and a band per row (2 seeds)
    assert _wait(lambda: browser.execute_script(
        "var el = document.getElementById('curves-1'); return el && el.data ? el.data.length : 0") == 4)
    names = browser.execute_script("return document.getElementById('curves-1').data.map(t => t.name)")
    assert names == ["relu ± std", "relu", "prelu ± std", "prelu"]
    # downloads: each export parsed back
    import csv
    import io
    import urllib.request

    links = {a.text: a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, "#downloads a")}
    assert set(links) >= {"CSV", "LaTeX", "Markdown", "HTML"}
    with urllib.request.urlopen(links["CSV"]) as r:
        assert r.headers["Content-Disposition"] == 'attachment; filename="dash-tables.csv"'
        rows = list(csv.DictReader(io.StringIO(r.read().decode())))
    assert [r["row"] for r in rows] == ["relu", "prelu"]
    assert float(rows[0]["mean"]) == pytest.approx(table.rows[0].cell.mean, abs=1e-4)
    with urllib.request.urlopen(links["LaTeX"]) as r:
        assert r.read().decode().count(r"\begin{tabular}") == 1
    with urllib.request.urlopen(links["Markdown"]) as r:
        assert "| relu |" in r.read().decode()
    with urllib.request.urlopen(links["HTML"]) as r:
        assert r.read().decode().startswith("<!doctype html>")
    _shot(browser, "study", tmp_path)


def test_compare_page_puts_studies_side_by_side_and_overlays_rows(filled, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(filled["server"].url + "/compare")
    boxes = browser.find_elements(By.CSS_SELECTOR, "input[name=study]")
    assert [b.get_attribute("value") for b in boxes] == ["dash", "dash-stages", "dash-stages@optim.lr=0.01"]  # not tunings
    boxes[0].click()
    browser.find_element(By.CSS_SELECTOR, "#compare-form button").click()
    assert _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "section.compared[data-study=dash] table.ablation-table"))
    for box in browser.find_elements(By.CSS_SELECTOR, "input[name=row]"):
        box.click()  # both rows of the table
    browser.find_elements(By.CSS_SELECTOR, "#compare-form button")[-1].click()
    assert _wait(lambda: browser.execute_script(
        "var el = document.getElementById('compare-curves'); return el && el.data ? el.data.length : 0") == 4)
    names = browser.execute_script("return document.getElementById('compare-curves').data.filter(t => t.showlegend !== false).map(t => t.name)")
    assert names == ["dash/acts/relu", "dash/acts/prelu"]
    _shot(browser, "compare", tmp_path)


def test_variant_page(filled, browser, tmp_path):
    from selenium.webdriver.common.by import By

    store = Store(filled["db"], readonly=True)
    s = store.study("dash")
    prelu = next(m for m in store.members(s.id) if m.row == "prelu" and m.seed == 1)
    v = store.variant(prelu.variant_key)
    browser.get(f"{filled['server'].url}/study/dash/variant/{v.key}")
    assert browser.find_element(By.ID, "variant-status").text == "completed"
    assert browser.find_element(By.ID, "best-metric").text == f"{v.result['best_metric']:.4g}"
    diff = {tr.find_elements(By.TAG_NAME, "td")[0].text: tr.find_elements(By.TAG_NAME, "td")[2].text
            for tr in browser.find_elements(By.CSS_SELECTOR, "#config-diff tbody tr")}
    assert diff == {"model.activation.kind": "prelu"}  # against relu, same seed
    lat = v.result["latency"]  # its deployed model's measured latency, and where
    cells = [td.text for td in browser.find_elements(By.CSS_SELECTOR, "#latency td")]
    assert cells[0] == f"{lat['binary_ms']:.3g} ms ({lat['speedup']}x faster than float32: {lat['float_ms']:.3g} ms)"
    assert cells[1].startswith(lat["machine"]) and lat["speedup"] > 0
    assert lat["quiet"] and len(lat["binary_rounds"]) == 7 and "end of the study on a quiet worker" in cells[1]
    attempts = browser.find_elements(By.CSS_SELECTOR, "#attempts tbody tr")
    assert len(attempts) == len(store.attempts(v.key)) >= 1
    last = store.attempts(v.key)[-1]
    node = attempts[-1].find_element(By.CSS_SELECTOR, "td.node")
    # where it ran: the host (the in-process backend has no Ray node id to show beside it; the
    # running-page test below shows one)
    assert last.node and last.node_id == "in-process" and node.text == last.node
    assert node.get_attribute("title") == last.node_id
    link = browser.find_element(By.ID, "mlflow-link").get_attribute("href")
    assert link.endswith(f"/runs/{v.mlflow_run_id}") and s.spec["mlflow_experiment_id"] in link
    assert _wait(lambda: _charts_drawn(browser) >= 3)  # loss, metric, lambda + flips
    assert browser.execute_script("return document.getElementById('predictions').naturalWidth") > 0
    _shot(browser, "variant", tmp_path)


def _layouts(browser) -> list[dict]:
    """Every drawn chart's id, layout (axes' titles, ticks, shapes) and traces, as Plotly holds them."""
    return browser.execute_script("""return Array.from(document.querySelectorAll('[data-plot]')).filter(el => el.layout)
        .map(el => ({id: el.id, layout: el.layout, data: el.data.map(t => ({name: t.name, x: t.x, mode: t.mode,
                     showlegend: t.showlegend, yaxis: t.yaxis}))}))""")


def _titled(layout: dict, axis: str) -> str:
    title = (layout.get(axis) or {}).get("title") or {}
    return title.get("text", "") if isinstance(title, dict) else str(title)


def _tick_labels(browser, chart_id: str, axis: str = "xtick") -> list[str]:
    return browser.execute_script(
        f"return Array.from(document.querySelectorAll('#{chart_id} .{axis} text')).map(t => t.textContent)")


def test_two_stage_curves_axes_and_the_variants_table(filled, browser, tmp_path):
    """A two-stage row's curve starts at epoch 1 of its stage 1 and runs over its whole budget, the
    change of stage marked; every axis is titled, epochs are whole; the variants table sorts,
    filters and shows the config values that differ between rows; a version says what it is."""
    from selenium.webdriver.common.by import By

    store = Store(filled["db"], readonly=True)
    s = store.study("dash-stages")
    members = {m.row: m for m in store.members(s.id) if m.ablation}
    reverse = store.variant(members["reverse"].variant_key)
    stage1 = store.variant(reverse.deps[0])
    assert stage1.kind == "stage1"
    browser.get(filled["server"].url + "/study/dash-stages")
    assert _wait(lambda: _charts_drawn(browser) >= 2)
    charts = {c["id"]: c for c in _layouts(browser)}
    curves = charts["curves-1"]
    line = next(t for t in curves["data"] if t["name"] == "reverse")
    expected = [e for e, _ in store.metrics(stage1.key)["pckh"]] + [e + 2 for e, _ in store.metrics(reverse.key)["pckh"]]
    assert line["x"] == expected == [1, 2, 3, 4]  # stage 1's epochs 1-2, then stage 2's as 3-4
    assert next(t for t in curves["data"] if t["name"] == "single")["x"] == [1, 2, 3, 4]
    (shape,) = curves["layout"]["shapes"]
    assert shape["x0"] == shape["x1"] == 2.5 and shape["line"]["dash"] == "dash"
    assert curves["layout"]["annotations"][0]["text"] == "stage 1 | stage 2"
    assert _tick_labels(browser, "curves-1") == ["1", "2", "3", "4"]  # whole epochs only
    for chart in charts.values():  # every axis titled, the metric with its unit
        assert _titled(chart["layout"], "xaxis") and _titled(chart["layout"], "yaxis"), chart["id"]
    assert _titled(curves["layout"], "yaxis") == "pckh (%)" and _titled(charts["chart-1"]["layout"], "yaxis") == "pckh (%)"

    # the variants table: the config values that differ between the rows, sortable and filterable
    heads = [th.text for th in browser.find_elements(By.CSS_SELECTOR, "#variants-table thead th") if th.is_displayed()]
    assert heads[:6] == ["ablation", "row", "seed", "status", "pckh", "budget"]
    assert {"schedule_offset", "schedule_epochs"} <= set(heads[6:]) and "seed" not in heads[6:]
    assert "model.activation.kind" not in heads  # the same in both rows: selectable, not shown

    def table():
        return [[td.text for td in tr.find_elements(By.TAG_NAME, "td") if td.is_displayed()]
                for tr in browser.find_elements(By.CSS_SELECTOR, "#variants-table tbody tr") if tr.is_displayed()]

    offset, epochs = heads.index("schedule_offset"), heads.index("epochs")
    assert {r[1]: (r[5], r[epochs], r[offset]) for r in table()} == {"single": ("4", "4", "0"),
                                                                      "reverse": ("4", "2", "2")}  # budget: both stages
    values = {r: store.variant(m.variant_key).result["metrics"]["pckh"] for r, m in members.items()}
    pckh = browser.find_element(By.XPATH, "//table[@id='variants-table']/thead/tr/th[5]")
    pckh.click()
    pckh.click()  # descending
    shown = [values[r[1]] for r in table()]
    assert len(shown) == 2 and shown == sorted(shown, reverse=True)
    search = browser.find_element(By.ID, "variants-search")
    search.send_keys("row:reverse")
    assert [r[1] for r in table()] == ["reverse"]
    search.clear()
    search.send_keys(f"pckh>={max(values.values())}")
    assert sorted(r[1] for r in table()) == sorted(r for r, x in values.items() if x >= max(values.values()))
    search.clear()
    search.send_keys(f"pckh<{min(values.values())}")
    assert table() == []
    search.clear()
    search.send_keys(" ")
    browser.find_element(By.CSS_SELECTOR, "details.columns summary").click()
    browser.find_element(By.CSS_SELECTOR, "input[data-column-for=variants-table][value='model.activation.kind']").click()
    heads = [th.text for th in browser.find_elements(By.CSS_SELECTOR, "#variants-table thead th") if th.is_displayed()]
    kind = heads.index("model.activation.kind")
    assert [r[kind] for r in table()] == ["prelu", "prelu"]
    assert "its versions: dash-stages@optim.lr=0.01" in browser.find_element(By.ID, "version").text
    _shot(browser, "study-two-stage", tmp_path)
    browser.get(filled["server"].url + "/study/dash-stages@optim.lr=0.01")
    assert browser.find_element(By.ID, "version").text == \
        "version optim.lr=0.01 of dash-stages: --set optim.lr=0.01"
    heads = [th.text for th in browser.find_elements(By.CSS_SELECTOR, "#variants-table thead th") if th.is_displayed()]
    assert "optim.lr" not in heads  # the same in every row of the version
    _shot(browser, "study-version", tmp_path)


def test_variant_page_axes_and_predictions_with_ground_truth(filled, browser, tmp_path):
    from selenium.webdriver.common.by import By

    store = Store(filled["db"], readonly=True)
    s = store.study("dash")
    key = next(m.variant_key for m in store.members(s.id) if m.row == "relu" and m.seed == 0)
    browser.get(f"{filled['server'].url}/study/dash/variant/{key}")
    assert _wait(lambda: _charts_drawn(browser) >= 3)
    charts = {c["id"]: c for c in _layouts(browser)}
    for chart in charts.values():
        assert _titled(chart["layout"], "xaxis") == "epoch" and _titled(chart["layout"], "yaxis"), chart["id"]
        assert _tick_labels(browser, chart["id"]) == ["1", "2"]  # 2 epochs: no 1.2, 1.4...
    assert _titled(charts["chart-metric"]["layout"], "yaxis") == "pckh (%)"
    flips = charts["chart-lambda"]["layout"]["yaxis2"]
    assert flips["title"]["text"].startswith("flip ratio") and flips["range"][0] == 0  # its own axis, from 0
    ticks = [float(t.replace("−", "-")) for t in _tick_labels(browser, "chart-lambda", "y2tick")]
    assert ticks and min(ticks) >= 0
    caption = browser.find_element(By.CSS_SELECTOR, "#predictions-figure figcaption").text
    assert "ground truth as white rings" in caption and "legend" in caption
    assert browser.execute_script("return document.getElementById('predictions').naturalHeight") > 128  # + legend
    _shot(browser, "variant-axes", tmp_path)


def test_pruned_trials_are_drawn_and_parallel_coordinates_are_readable(filled, browser, tmp_path):
    import optuna

    from selenium.webdriver.common.by import By

    storage = optuna.storages.RDBStorage(filled["db"])
    study = optuna.load_study(study_name="dash-prune/base", storage=storage)
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    assert len(pruned) == 2 and all(list(t.intermediate_values) == [1] for t in pruned)
    browser.get(filled["server"].url + "/tuning/dash-prune")
    assert _wait(lambda: _charts_drawn(browser) >= 2)
    chart = next(c for c in _layouts(browser) if c["id"].startswith("intermediate-"))
    lines = {t["name"]: t for t in chart["data"]}
    for t in pruned:
        trace = lines[f"trial {t.number} (pruned)"]
        assert trace["x"] == [1] and "markers" in trace["mode"]  # one epoch: a point, not an invisible line
    points = browser.execute_script(
        f"return document.querySelectorAll('#{chart['id']} .scatterlayer .trace .points path').length")
    assert points == 3 + 1 + 1  # the default's 3 epochs and each pruned trial's one
    assert _tick_labels(browser, chart["id"]) == ["1", "2", "3"]
    assert _titled(chart["layout"], "yaxis") == "pckh (%)"
    rows = browser.find_elements(By.CSS_SELECTOR, "table.trials tbody tr")
    assert sorted(r.find_elements(By.TAG_NAME, "td")[1].text for r in rows) == ["complete", "pruned", "pruned"]
    search = browser.find_element(By.CSS_SELECTOR, "input[data-filter-for=trials-1]")
    search.send_keys("state:pruned")
    assert sorted(int(r.get_attribute("data-trial")) for r in rows if r.is_displayed()) == sorted(t.number for t in pruned)
    _shot(browser, "tuning-pruned", tmp_path)
    # parallel coordinates (the other tuning): the title and every axis name inside the chart, none overlapping
    browser.get(filled["server"].url + "/tuning/dash-tune")
    assert _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "[id^=parallel-] .main-svg"))
    boxes = browser.execute_script("""var el = document.querySelector('[id^=parallel-]'), out = {chart: el.getBoundingClientRect(), ticks: []};
        el.querySelectorAll('.xtick text').forEach(t => out.ticks.push(t.getBoundingClientRect()));
        out.title = el.querySelector('.gtitle').getBoundingClientRect(); return out;""")
    chart_box, ticks = boxes["chart"], sorted(boxes["ticks"], key=lambda b: b["left"])
    assert len(ticks) == 3  # two parameters and the objective
    for a, b in zip(ticks, ticks[1:]):
        assert a["right"] <= b["left"], (a, b)  # no two axis names overlap
    for box in [*ticks, boxes["title"]]:
        assert chart_box["left"] <= box["left"] and box["right"] <= chart_box["right"] and box["top"] >= chart_box["top"]
    _shot(browser, "tuning-parallel", tmp_path)


def test_the_measured_latency_reaches_mlflow_and_the_results_frame(filled):
    """Each finished variant's latency, as the table shows it, is in its MLflow run and in results()."""
    from mlflow.tracking import MlflowClient

    from bnnctl.orchestrator.results import results

    store = Store(filled["db"], readonly=True)
    s = store.study("dash")
    variants = store.variants([m.variant_key for m in store.members(s.id)])
    client = MlflowClient(f"sqlite:///{filled['root'] / '.bnnctl' / 'mlflow.db'}")
    frame = results("dash", db=filled["db"]).set_index("variant")
    for key, v in variants.items():
        lat = v.result["latency"]
        assert lat["binary_ms"] > 0 and lat["float_ms"] > 0 and lat["speedup"] > 0
        metrics = client.get_run(v.mlflow_run_id).data.metrics
        assert {k: metrics[f"latency.{k}"] for k in ("binary_ms", "float_ms", "speedup")} == {
            k: lat[k] for k in ("binary_ms", "float_ms", "speedup")}
        assert frame.loc[key, "latency.binary_ms"] == lat["binary_ms"]
        assert frame.loc[key, "latency.machine"] == lat["machine"]


def test_tuning_page(filled, browser, tmp_path):
    import optuna

    from selenium.webdriver.common.by import By

    storage = optuna.storages.RDBStorage(filled["db"])
    study = optuna.load_study(study_name="dash-tune/base", storage=storage)
    browser.get(filled["server"].url + "/tuning/dash-tune")
    rows = browser.find_elements(By.CSS_SELECTOR, "table.trials tbody tr")
    assert len(rows) == len(study.trials) == 4
    for tr, t in zip(rows, sorted(study.trials, key=lambda t: t.number)):
        cells = tr.find_elements(By.TAG_NAME, "td")
        assert cells[1].text == t.state.name.lower() == "complete" and cells[2].text == f"{t.value:.4g}"
    best = browser.find_element(By.CSS_SELECTOR, "#arms tr[data-arm=base] td.best").text
    assert best == f"{study.best_value:.4g}"
    # history, importances, lambda schedule, intermediate values, parallel coordinates, one slice per parameter
    assert _wait(lambda: _charts_drawn(browser) >= 7)
    assert browser.find_element(By.CSS_SELECTOR, "[id^=parallel-] .main-svg")
    assert len(browser.find_elements(By.CSS_SELECTOR, ".chart.slice")) == 2
    note = browser.find_element(By.CSS_SELECTOR, ".importance-note").text
    assert "from 4 completed trials for 2 parameters: too few" in note  # 4 trials rank 2 parameters poorly
    ticks = browser.execute_script(
        "return Array.from(document.querySelectorAll('[id^=schedule-] .ytick text')).map(t => t.textContent)")
    assert ticks and all(t in ("0.1", "1", "10", "100", "1000") for t in ticks), ticks  # no bare 2, 5 minor labels
    _shot(browser, "tuning", tmp_path)


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


def test_bad_requests_and_the_store_is_never_written(filled, browser):
    from selenium.webdriver.common.by import By

    base = filled["server"].url
    assert _status(base + "/study/no-such-study") == 404
    assert _status(base + "/api/study/no-such-study") == 404
    assert _status(base + "/tuning/dash") == 404  # a study is not a tuning
    browser.get(base + "/study/no-such-study")
    assert "no study named 'no-such-study'" in browser.find_element(By.ID, "not-found").text
    store = Store(filled["db"], readonly=True)
    key = store.studies()[0] and next(iter(store.variants([m.variant_key for m in store.members(1)])))
    assert _status(f"{base}/files/{key}/predictions.png") == 200
    assert _status(f"{base}/files/{key}/last.pt") == 403  # checkpoints are not served
    assert _status(f"{base}/files/{key}/..%2F..%2Fstate.db") == 404
    # a server whose run storage is elsewhere does not find the image: it reads only its own storage
    other = Server(filled["db"], filled["root"] / "elsewhere")
    try:
        assert _status(f"{other.url}/files/{key}/predictions.png") == 404
    finally:
        other.stop()
    assert _fingerprint(filled["root"], filled["db"]) == filled["fingerprint"]  # every page above read, nothing written


def test_a_running_study_page_refreshes_itself(filled, browser, tmp_path):
    """While the orchestrator writes (here: the test, as its stand-in), an open page updates in place."""
    from selenium.webdriver.common.by import By

    if not filled["db"].startswith("sqlite"):
        pytest.skip("the stand-in writer copies the sqlite file; the PostgreSQL pages are read by the tests above")

    copy = tmp_path / "state.db"
    src = sqlite3.connect(filled["root"] / ".bnnctl" / "state.db")
    dst = sqlite3.connect(copy)
    src.backup(dst)
    src.close()
    dst.close()
    writer = Store(f"sqlite:///{copy}")
    s = writer.study("dash")
    writer.set_study_status(s.id, "running")
    key = next(m.variant_key for m in writer.members(s.id) if m.row == "prelu" and m.seed == 0)
    result = dict(writer.variant(key).result)
    with sqlite3.connect(copy) as c:  # the copy goes back to the moment this variant was to be retried
        c.execute("UPDATE bnnctl_variants SET status = 'pending', result = NULL WHERE key = ?", (key,))
    ray_node = "f00dcafe" * 7  # ... and a worker on a Ray node took it
    writer.start_attempt(key, "worker-b", str(filled["root"] / ".bnnctl" / "runs" / key))
    writer.set_attempt_node(key, "worker-b", ray_node)
    server = Server(f"sqlite:///{copy}", filled["root"] / ".bnnctl" / "runs")
    try:
        browser.get(server.url + "/study/dash")
        def cell():
            from selenium.common.exceptions import StaleElementReferenceException

            try:
                return browser.find_element(By.CSS_SELECTOR, "tr[data-row=prelu] td.value").text
            except StaleElementReferenceException:  # the live refresh swapped the page meanwhile
                return None

        before = _wait(cell)
        # the running variant's progress: its epochs recorded of its budget (read again if the live
        # refresh swapped the page meanwhile)
        from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

        def progress():
            try:
                return browser.find_element(By.CSS_SELECTOR, f"#running tr[data-variant='{key}'] td.epoch").text
            except (StaleElementReferenceException, NoSuchElementException):
                return None

        epochs = writer.variant(key).config["epochs"]
        assert _wait(lambda: progress() == f"{epochs}/{epochs}")  # every epoch recorded before the result
        result["metrics"] = {**result["metrics"], "pckh": 99.0}
        writer.finish(key, result)
        assert _wait(lambda: cell() not in (None, before), timeout=20)
        other = next(v for v in writer.variants([key]).values())
        assert other.result["metrics"]["pckh"] == 99.0
        assert browser.execute_script("return document.querySelector('main').dataset.refreshed") >= "1"
        assert browser.current_url.endswith("/study/dash")  # no reload, no navigation
        browser.get(f"{server.url}/study/dash/variant/{key}")  # the attempt shows the host and the Ray node
        node = browser.find_elements(By.CSS_SELECTOR, "#attempts tbody tr")[-1].find_element(By.CSS_SELECTOR, "td.node")
        assert (node.text, node.get_attribute("title")) == ("worker-b (f00dcafe)", ray_node)
    finally:
        server.stop()


def test_no_page_shows_the_database_password(filled):
    """Every page and JSON twin, read as a client would: the state URL appears masked, never in clear."""
    import urllib.request

    store = Store(filled["db"], readonly=True)
    key = next(iter(store.variants([m.variant_key for m in store.members(store.study("dash").id)])))
    base = filled["server"].url
    pages = ["/", "/study/dash", f"/study/dash/variant/{key}", "/tuning/dash-tune", "/api/study/dash", "/api/studies",
             "/api/tuning/dash-tune", f"/api/variant/{key}", "/study/nope"]
    password = filled["db"].split(":")[2].split("@")[0] if "@" in filled["db"] else None
    for page in pages:
        try:
            body = urllib.request.urlopen(base + page, timeout=30).read().decode()
        except urllib.error.HTTPError as err:
            body = err.read().decode()
        assert body, page
        if password:
            assert password not in body, page
    home = urllib.request.urlopen(base + "/", timeout=30).read().decode()
    assert (f"{password and '***'}" in home) if password else (filled["db"].removeprefix("sqlite:///") in home)


# --------------------------------------------------------------------------- beyond localhost

def _get(port: int, path: str = "/", host: str | None = None, method: str = "GET", headers: dict | None = None):
    """(status, headers, body) of one request with exactly this Host header (http.client follows nothing)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.putrequest(method, path, skip_host=True)
    conn.putheader("Host", host if host is not None else f"127.0.0.1:{port}")
    for k, v in (headers or {}).items():
        conn.putheader(k, v)
    conn.endheaders()
    r = conn.getresponse()
    out = r.status, {k.lower(): v for k, v in r.getheaders()}, r.read().decode(errors="replace")
    conn.close()
    return out


@pytest.fixture()
def empty_db(tmp_path):
    url = f"sqlite:///{tmp_path / 'state.db'}"
    Store(url)  # created, no study
    return url


def test_host_header_checked_and_security_headers_on_every_response(empty_db, tmp_path):
    server = Server(empty_db, tmp_path / "runs")
    try:
        status, headers, _ = _get(server.port)
        assert status == 200
        for path in ("/", "/study/none", "/static/style.css"):  # pages, errors, files alike
            status, headers, _ = _get(server.port, path)
            csp = headers["content-security-policy"]
            assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp and "object-src 'none'" in csp
            assert headers["x-content-type-options"] == "nosniff" and headers["referrer-policy"] == "no-referrer"
            assert headers["x-frame-options"] == "DENY"
        assert _get(server.port, host=f"localhost:{server.port}")[0] == 200
        assert _get(server.port, host=f"[::1]:{server.port}")[0] == 200
        # a DNS-rebinding page: its own name in the Host header, this server's address underneath
        status, headers, body = _get(server.port, host=f"attacker.example:{server.port}")
        assert status == 400 and "Host header" in body and "frame-ancestors 'none'" in headers["content-security-policy"]
        assert _get(server.port, host="")[0] == 400
        assert _get(server.port, method="POST")[0] == 405  # read-only
    finally:
        server.stop()


def test_a_token_is_required_on_every_request_when_set(empty_db, tmp_path):
    server = Server(empty_db, tmp_path / "runs", token="s3cret-token", hosts={"127.0.0.1", "dash.lab"})
    try:
        assert _get(server.port)[0] == 401
        assert _get(server.port, "/api/studies")[0] == 401
        assert _get(server.port, "/static/style.css")[0] == 401
        assert _get(server.port, headers={"Authorization": "Bearer wrong"})[0] == 401
        assert _get(server.port, "/?token=wrong")[0] == 401
        status, _, body = _get(server.port, "/api/studies", headers={"Authorization": "Bearer s3cret-token"})
        assert status == 200 and body == "[]"
        # the printed URL: the token once in the address, then a cookie (HttpOnly, same-site), address cleaned
        status, headers, _ = _get(server.port, "/?token=s3cret-token&x=1")
        assert status == 303 and headers["location"] == "/?x=1"
        cookie = headers["set-cookie"]
        assert cookie.startswith("bnnctl_dashboard_token=s3cret-token;") and "HttpOnly" in cookie
        assert "samesite=strict" in cookie.lower()
        assert _get(server.port, headers={"Cookie": "bnnctl_dashboard_token=s3cret-token"})[0] == 200
        assert _get(server.port, host="dash.lab", headers={"Cookie": "bnnctl_dashboard_token=s3cret-token"})[0] == 200
        assert _get(server.port, host="other.lab", headers={"Cookie": "bnnctl_dashboard_token=s3cret-token"})[0] == 400
    finally:
        server.stop()


def test_binding_beyond_loopback_needs_the_flag_then_prints_a_token_and_requires_it(empty_db, tmp_path):
    import subprocess
    import sys

    from typer.testing import CliRunner

    from bnnctl.orchestrator.cli import app

    refused = CliRunner().invoke(app, ["dashboard", "--host", "0.0.0.0", "--db", empty_db])
    assert refused.exit_code == 1 and "--allow-remote" in refused.output and "Traceback" not in refused.output
    port = free_port()
    cli = [sys.executable, "-c", "from bnnctl.orchestrator.cli import main; main()", "dashboard", "--host",
           "0.0.0.0", "--port", str(port), "--allow-remote", "--db", empty_db, "--allowed-host", "dash.lab"]
    proc = subprocess.Popen(cli, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stdout.readline()
        assert line.startswith("bnnctl dashboard: http://") and "?token=" in line, line
        token = line.split("?token=")[1].split()[0]
        assert len(token) >= 32
        warning = proc.stderr.readline()
        assert warning.startswith("WARNING: the dashboard listens on 0.0.0.0") and "dash.lab" in warning
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                status = _get(port)[0]
                break
            except OSError:
                time.sleep(0.2)
        assert status == 401
        assert _get(port, headers={"Authorization": f"Bearer {token}"})[0] == 200
        assert _get(port, host="dash.lab", headers={"Authorization": f"Bearer {token}"})[0] == 200
        assert _get(port, host="evil.example", headers={"Authorization": f"Bearer {token}"})[0] == 400
    finally:
        proc.terminate()
        proc.wait(10)
