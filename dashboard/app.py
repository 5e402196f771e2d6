"""The dashboard: a read-only FastAPI app over the orchestrator's store, with server-rendered pages
(Jinja2) and Plotly charts whose JavaScript is served from the installed ``plotly`` package (no
internet needed). Pages of a running study or tuning poll their JSON twin and refresh in place.

Safety: the store is opened read-only (sqlite ``mode=ro``; PostgreSQL read-only transactions), so
the server cannot write it; files are served only from inside the runs folder (checkpoint folders);
only GET is served. The server binds to 127.0.0.1 unless told otherwise; every request's Host header
must name an allowed host (a loopback name, the bound address, ``--allowed-host``): a DNS-rebinding
page cannot reach it. Bound beyond loopback, every request needs the access token (``?token=`` once,
then a cookie; or ``Authorization: Bearer``). Every response carries a Content-Security-Policy
(scripts only from this server, no framing), ``X-Content-Type-Options: nosniff`` and
``Referrer-Policy: no-referrer``.
"""
from __future__ import annotations

import threading
from pathlib import Path

from . import views
from .views import NotFound

HERE = Path(__file__).resolve().parent
#: the only files of a variant the dashboard serves (never checkpoints)
SERVED = ("predictions.png",)
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
TOKEN_COOKIE = "bnnctl_dashboard_token"
#: study pages kept computed (each until its study changes)
VIEW_CACHE = 32
SECURITY_HEADERS = {
    # Plotly draws with inline style attributes and one <style> element: styles may be inline, scripts never
    "Content-Security-Policy": ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                                "img-src 'self' data: blob:; font-src 'self' data:; connect-src 'self'; "
                                "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def request_host(header: str) -> str:
    """The host part of a Host header (``name:port``, ``[::1]:port``), lower case."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def allowed_hosts(bind: str, extra=()) -> set[str]:
    """Host header values the server answers: loopback names, the bound address, this machine's
    names when bound to every interface, and ``extra`` (``--allowed-host``)."""
    import socket

    hosts = {*LOOPBACK_HOSTS, bind.strip("[]").lower(), *(h.lower() for h in extra)}
    if bind in ("0.0.0.0", "::", ""):
        hosts |= {socket.gethostname().lower(), socket.getfqdn().lower()}
    return hosts


def plotly_js() -> Path:
    import plotly

    path = Path(plotly.__file__).resolve().parent / "package_data" / "plotly.min.js"
    if not path.exists():
        raise FileNotFoundError(f"plotly.min.js is missing from the plotly package ({path}); reinstall plotly")
    return path


def templates():
    """The dashboard's pages, and the report's table markup (orchestrator/templates) they include."""
    from bnnctl.orchestrator.formats import jinja_env

    env = jinja_env(HERE / "templates")
    env.globals.update(metric_title=views.metric_title, whole_axis=views.whole_axis)  # axis titles and ticks
    return env


def _guard(token: str | None, answered: set[str]):
    """The request check every response passes first: Host header, method, access token. Returns a
    function giving None when the request may be served, else the refusal."""
    import secrets

    from fastapi.responses import PlainTextResponse, RedirectResponse

    def guarded(request):
        if request_host(request.headers.get("host", "")) not in answered:
            return PlainTextResponse("refused: this dashboard does not answer to that Host header (start it with "
                                     "--allowed-host NAME to add one)", status_code=400)
        if request.method not in ("GET", "HEAD"):
            return PlainTextResponse("refused: the dashboard is read-only", status_code=405)
        if token is None:
            return None
        given = request.query_params.get("token")
        if given is not None and secrets.compare_digest(given.encode(), token.encode()):
            # once from the printed URL; a cookie from then on, and the token leaves the address bar
            from urllib.parse import urlencode

            query = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
            target = request.url.path + (f"?{query}" if query else "")
            response = RedirectResponse(target, status_code=303)
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict", path="/")
            return response
        bearer = request.headers.get("authorization", "")
        offered = bearer[7:] if bearer.lower().startswith("bearer ") else request.cookies.get(TOKEN_COOKIE, "")
        if offered and secrets.compare_digest(offered.encode(), token.encode()):
            return None
        return PlainTextResponse("this dashboard needs its access token: open the URL it printed when it started "
                                 "(…/?token=…), or send Authorization: Bearer TOKEN", status_code=401,
                                 headers={"WWW-Authenticate": "Bearer"})

    return guarded


class _Site:
    """What the routes share: the read-only store, the run storage, the templates."""

    def __init__(self, db: str | None, runs_dir, mlflow_url: str | None, refresh_s: float) -> None:
        from bnnctl.orchestrator.runstorage import RunStorage
        from bnnctl.orchestrator.store import Store

        self.store = Store(db, readonly=True)
        self.storage = RunStorage(runs_dir)
        self.env = templates()
        self.mlflow_url, self.refresh_s = mlflow_url, refresh_s
        self._optuna: list = []  # one read-only Optuna storage (engine) for the app's lifetime, made on first use
        #: study name -> (its change stamp, its page's data, the page rendered or None)
        self._views: dict[str, tuple] = {}
        self._lock = threading.Lock()

    def study(self, name: str) -> dict:
        """A study page's data, computed again only when the study changed (its stamp, one
        aggregated query, is read first: a change during the computation shows at the next request)."""
        return self._study(name)[1]

    def study_page(self, name: str):
        """The study page, rendered again only when the study changed."""
        from fastapi.responses import HTMLResponse

        stamp, view, html = self._study(name)
        if html is None:
            html = self.render("study.html", s=view)
            with self._lock:
                if self._views.get(name, (None,))[0] == stamp:
                    self._views[name] = (stamp, view, html)
        return HTMLResponse(html)

    def _study(self, name: str) -> tuple:
        s = self.store.study(name)
        if s is None or s.kind != "study":
            raise NotFound(f"no study named {name!r}")
        stamp = self.store.stamp(s.id)
        with self._lock:
            hit = self._views.get(name)
        if hit is not None and hit[0] == stamp:
            return hit
        entry = (stamp, views.study(self.store, name), None)
        with self._lock:
            self._views[name] = entry
            while len(self._views) > VIEW_CACHE:
                self._views.pop(next(iter(self._views)))
        return entry

    def render(self, name: str, **ctx) -> str:
        from bnnctl.orchestrator.urls import mask_url

        return self.env.get_template(name).render(refresh_s=self.refresh_s, mlflow_url=mask_url(self.mlflow_url),
                                                  db=self.store.display_url, **ctx)

    def page(self, name: str, status: int = 200, **ctx):
        from fastapi.responses import HTMLResponse

        return HTMLResponse(self.render(name, **ctx), status_code=status)

    def tuning_studies(self, name: str) -> dict:
        from bnnctl.orchestrator.store import readonly_url
        from bnnctl.orchestrator.tuneresults import arm_studies, optuna_storage

        s = self.store.study(name)
        if s is None or s.kind != "tuning":
            raise NotFound(f"no tuning named {name!r}")
        if not self._optuna:
            self._optuna.append(optuna_storage(readonly_url(self.store.url), readonly=True))
        return arm_studies(s.layout, self._optuna[0])


def _errors(app, site: _Site) -> None:
    """404 pages (or JSON under /api/), and a bug as a short 500 page, never a traceback."""
    from fastapi import Request
    from fastapi.responses import JSONResponse

    @app.exception_handler(NotFound)
    async def not_found(request: Request, exc: NotFound):
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": str(exc)}, status_code=404)
        return site.page("404.html", 404, message=str(exc))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        import logging

        logging.getLogger("bnnctl.dashboard").exception("error serving %s", request.url.path)
        message = f"internal error ({type(exc).__name__}); the server log has the details"
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": message}, status_code=500)
        return site.page("404.html", 500, message=message)

    @app.exception_handler(404)
    async def no_route(request: Request, exc):
        return site.page("404.html", 404, message=f"no page at {request.url.path}")


def _pages(app, site: _Site) -> None:
    """The HTML pages and their JSON twins (/api/...)."""
    from fastapi import Query
    from fastapi.responses import HTMLResponse

    store, page, mlflow_url = site.store, site.page, site.mlflow_url

    @app.get("/", response_class=HTMLResponse)
    def index():
        listed = views.studies(store)
        return page("studies.html", studies=listed, columns=views.config_columns([s["config"] for s in listed]))

    @app.get("/api/studies")
    def api_studies():
        return views.studies(store)

    @app.get("/study/{name}", response_class=HTMLResponse)
    def study(name: str):
        return site.study_page(name)

    @app.get("/api/study/{name}")
    def api_study(name: str):
        return site.study(name)

    @app.get("/compare", response_class=HTMLResponse)
    def compare(study: list[str] = Query(default=[]), row: list[str] = Query(default=[])):
        return page("compare.html", c=views.compare(store, study, row))

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
        return page("tuning.html", t=views.tuning(store, name, site.tuning_studies(name)))

    @app.get("/api/tuning/{name}")
    def api_tuning(name: str):
        return views.tuning(store, name, site.tuning_studies(name))


#: table downloads: file extension -> (media type, report format)
EXPORTS = {"csv": ("text/csv", "csv"), "md": ("text/markdown", "md"), "tex": ("application/x-tex", "latex"),
           "html": ("text/html", "html")}


def _files(app, site: _Site) -> None:
    """Downloads (tables), a variant's images from the run storage, and the static files."""
    from fastapi.responses import FileResponse, JSONResponse, Response

    store = site.store

    @app.get("/study/{name}/tables.{ext}")
    def tables_file(name: str, ext: str):
        """A study's tables as a file to download (the same exports as `bnnctl study show --format`)."""
        from bnnctl.orchestrator import formats, report

        if ext not in EXPORTS:
            raise NotFound(f"no export {ext!r}; there are: {', '.join(EXPORTS)}")
        media, fmt = EXPORTS[ext]
        tables, cells = report.study_report(store, views._study(store, name, "study"))
        body = formats.export(tables, fmt, name, cells)
        return Response(body, media_type=f"{media}; charset=utf-8",
                        headers={"Content-Disposition": f'attachment; filename="{name}-tables.{ext}"'})

    @app.get("/files/{key}/{filename}")
    def files(key: str, filename: str):
        """A variant's predictions image, from the run storage (a folder, or a URL it downloads from)."""
        from bnnctl.orchestrator.runstorage import RunStorage, is_url

        v = store.variant(key)
        if v is None:
            raise NotFound(f"no variant {key!r}")
        if filename not in SERVED:
            return JSONResponse({"error": "refused: only a variant's own images are served"}, status_code=403)
        roots = [site.storage]
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

    @app.get("/static/style.css")
    def stylesheet():  # one stylesheet for the pages and the HTML export
        from bnnctl.orchestrator.formats import TEMPLATES

        return FileResponse(TEMPLATES / "style.css", media_type="text/css")

    @app.get("/static/{name}")
    def static(name: str):
        target = (HERE / "static" / name).resolve()
        if target.parent != (HERE / "static").resolve() or not target.is_file():
            raise NotFound(f"no static file {name!r}")
        return FileResponse(target)


def create_app(db: str | None = None, runs_dir: str | Path | None = None, mlflow_url: str | None = None,
               refresh_s: float = 3.0, token: str | None = None, hosts: set[str] | None = None):
    """The dashboard app over the store at ``db`` (read-only), serving images from the run storage
    ``runs_dir`` (a folder or an fsspec URL; default: $BNNCTL_STORAGE or .bnnctl/runs). ``token``:
    required on every request when given; ``hosts``: the Host header values answered (default:
    loopback names only, see :func:`allowed_hosts`)."""
    from fastapi import FastAPI, Request

    site = _Site(db, runs_dir, mlflow_url, refresh_s)
    app = FastAPI(title="bnnctl dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    guarded = _guard(token, set(hosts) if hosts is not None else set(LOOPBACK_HOSTS))

    @app.middleware("http")
    async def security(request: Request, call_next):
        response = guarded(request) or await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers[name] = value
        return response

    _errors(app, site)
    _pages(app, site)
    _files(app, site)
    return app
