"""The dashboard: a read-only FastAPI app over the orchestrator's store, with server-rendered pages
(Jinja2) and Plotly charts whose JavaScript is served from the installed ``plotly`` package (no
internet needed). Pages of a running study or tuning poll their JSON twin and refresh in place.

Safety: the store is opened read-only (sqlite ``mode=ro``; PostgreSQL read-only transactions), so
the server cannot write it; files are served only from inside the runs folder (checkpoint folders);
the server binds to 127.0.0.1 unless told otherwise.
"""
from __future__ import annotations

from pathlib import Path

from . import views
from .views import NotFound

HERE = Path(__file__).resolve().parent


def plotly_js() -> Path:
    import plotly

    path = Path(plotly.__file__).resolve().parent / "package_data" / "plotly.min.js"
    if not path.exists():
        raise FileNotFoundError(f"plotly.min.js is missing from the plotly package ({path}); reinstall plotly")
    return path


def templates():
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]))
    from .tables import _giga, _millions, _size, format_number

    env.filters.update(fmt=format_number, millions=_millions, mib=_size, giga=_giga)
    return env


def create_app(db: str | None = None, runs_dir: str | Path | None = None, mlflow_url: str | None = None,
               refresh_s: float = 3.0):
    """The dashboard app over the store at ``db`` (read-only), serving files from ``runs_dir``."""
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

    from bnnctl.orchestrator.executor import RUNS_DIR
    from bnnctl.orchestrator.store import Store, readonly_url

    store = Store(db, readonly=True)
    runs_root = Path(runs_dir or RUNS_DIR).resolve()
    env = templates()
    app = FastAPI(title="bnnctl dashboard", docs_url=None, redoc_url=None, openapi_url=None)

    def page(name: str, status: int = 200, **ctx) -> HTMLResponse:
        html = env.get_template(name).render(refresh_s=refresh_s, mlflow_url=mlflow_url, db=store.url, **ctx)
        return HTMLResponse(html, status_code=status)

    optuna_reader: list = []  # one read-only Optuna storage (engine) for the app's lifetime, made on first use

    def tuning_studies(name: str) -> dict:
        from bnnctl.orchestrator.tuning import arm_studies, optuna_storage

        s = store.study(name)
        if s is None or s.spec.get("kind") != "tuning":
            raise NotFound(f"no tuning named {name!r}")
        if not optuna_reader:
            optuna_reader.append(optuna_storage(readonly_url(store.url), readonly=True))
        return arm_studies(s.spec, optuna_reader[0])

    @app.exception_handler(NotFound)
    async def not_found(request: Request, exc: NotFound):
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": str(exc)}, status_code=404)
        return page("404.html", 404, message=str(exc))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):  # a bug: say so, without a traceback page
        import logging

        logging.getLogger("bnnctl.dashboard").exception("error serving %s", request.url.path)
        message = f"internal error ({type(exc).__name__}); the server log has the details"
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": message}, status_code=500)
        return page("404.html", 500, message=message)

    @app.exception_handler(404)
    async def no_route(request: Request, exc):
        return page("404.html", 404, message=f"no page at {request.url.path}")

    @app.get("/", response_class=HTMLResponse)
    def index():
        return page("studies.html", studies=views.studies(store))

    @app.get("/api/studies")
    def api_studies():
        return views.studies(store)

    @app.get("/study/{name}", response_class=HTMLResponse)
    def study(name: str):
        return page("study.html", s=views.study(store, name))

    @app.get("/api/study/{name}")
    def api_study(name: str):
        return views.study(store, name)

    @app.get("/study/{name}/variant/{key}", response_class=HTMLResponse)
    def study_variant(name: str, key: str):
        return page("variant.html", v=views.variant(store, key, name, mlflow_url))

    @app.get("/variant/{key}", response_class=HTMLResponse)
    def variant(key: str):
        return page("variant.html", v=views.variant(store, key, None, mlflow_url))

    @app.get("/api/variant/{key}")
    def api_variant(key: str, study: str | None = None):
        return views.variant(store, key, study, mlflow_url)

    @app.get("/tuning/{name}", response_class=HTMLResponse)
    def tuning(name: str):
        return page("tuning.html", t=views.tuning(store, name, tuning_studies(name)))

    @app.get("/api/tuning/{name}")
    def api_tuning(name: str):
        return views.tuning(store, name, tuning_studies(name))

    @app.get("/files/{key}/{filename}")
    def files(key: str, filename: str):
        """A file of a variant's checkpoint folder (its predictions image): only inside the runs folder."""
        v = store.variant(key)
        if v is None or not v.checkpoint_dir:
            raise NotFound(f"no variant {key!r}")
        folder = Path(v.checkpoint_dir).resolve()
        target = (folder / filename).resolve()
        if not (target.is_relative_to(runs_root) and target.is_relative_to(folder)) or target.suffix not in (".png", ".json"):
            return JSONResponse({"error": "refused: only a variant's own images under the runs folder are served"},
                                status_code=403)
        if not target.is_file():
            raise NotFound(f"no file {filename!r} for variant {key}")
        return FileResponse(target)

    @app.get("/static/plotly.min.js")
    def plotly():
        return FileResponse(plotly_js(), media_type="application/javascript")

    @app.get("/static/{name}")
    def static(name: str):
        target = (HERE / "static" / name).resolve()
        if target.parent != (HERE / "static").resolve() or not target.is_file():
            raise NotFound(f"no static file {name!r}")
        return FileResponse(target)

    return app


def to_html(tables, title: str) -> str:
    """A standalone HTML document of the ablation tables (``bnnctl study show --format html``): the
    same table markup as the dashboard's study page, with its stylesheet inlined."""
    from .tables import ALPHA
    from .views import table_data

    css = (HERE / "static" / "style.css").read_text()
    return templates().get_template("export.html").render(
        title=title, css=css, tables=[table_data(t) for t in tables], alpha=ALPHA)
