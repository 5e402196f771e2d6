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
#: the only files of a variant the dashboard serves (never checkpoints)
SERVED = ("predictions.png",)


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
    """The dashboard app over the store at ``db`` (read-only), serving images from the run storage
    ``runs_dir`` (a folder or an fsspec URL; default: $BNNCTL_STORAGE or .bnnctl/runs)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

    from bnnctl.orchestrator.runstorage import RunStorage
    from bnnctl.orchestrator.store import Store, readonly_url
    from bnnctl.orchestrator.urls import mask_url

    store = Store(db, readonly=True)
    storage = RunStorage(runs_dir)
    env = templates()
    app = FastAPI(title="bnnctl dashboard", docs_url=None, redoc_url=None, openapi_url=None)

    def page(name: str, status: int = 200, **ctx) -> HTMLResponse:
        html = env.get_template(name).render(refresh_s=refresh_s, mlflow_url=mask_url(mlflow_url), db=store.display_url, **ctx)
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
        """A variant's predictions image, from the run storage (a folder, or a URL it downloads from)."""
        from bnnctl.orchestrator.runstorage import RunStorage, is_url

        v = store.variant(key)
        if v is None:
            raise NotFound(f"no variant {key!r}")
        if filename not in SERVED:
            return JSONResponse({"error": "refused: only a variant's own images are served"}, status_code=403)
        roots = [storage]
        if v.checkpoint_dir and is_url(v.checkpoint_dir) and v.checkpoint_dir.endswith("/" + key):
            roots.append(RunStorage(v.checkpoint_dir.removesuffix("/" + key)))  # the storage it ran with
        for root in roots:
            try:
                target = root.local_copy(f"{key}/{filename}")
            except Exception:  # noqa: BLE001 - unreachable storage: try the next, then 404
                target = None
            if target is not None:
                return FileResponse(target)
        raise NotFound(f"no file {filename!r} for variant {key}")

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
