"""The viewer's web app: Starlette routes over `queries`, rendered by Jinja2 templates that ship
in this package (templates/, static/view.css; no JavaScript, nothing fetched from outside).

Read-only by construction: every route is GET (HEAD), the store is opened without `create`,
and no route calls anything that appends. Safe by default: it binds 127.0.0.1, answers only
requests addressed to a loopback name (a web page elsewhere cannot reach it by DNS
rebinding), and sends a Content-Security-Policy that allows no script at all, behind the
escaping that already keeps model text from being markup.
"""

from __future__ import annotations

import ipaddress
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from jinja2 import Environment, PackageLoader, StrictUndefined
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from selm_data.errors import SelmError
from selm_data.publish.diff import DIFF_ROWS, Diff, change, diff
from selm_data.publish.plots import plot
from selm_data.publish.snapshot import READS
from selm_data.publish.stats import SECTIONS, iteration_stats, quarantine_stats
from selm_data.store.schema import RESPONSE_ORIGINS
from selm_data.store.store import Store, open_store
from selm_data.view import queries, render

LOOPBACK_NAMES = ["127.0.0.1", "localhost", "::1", "[::1]"]
HEADERS = {
    # No script of any kind, styles and images from this server only, forms submit here.
    "content-security-policy": "default-src 'none'; style-src 'self'; img-src 'self'; "
                               "form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class SecurityHeaders:
    """Adds HEADERS to every response (pages, PNGs, the stylesheet, errors)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"],
                                      *((k.encode(), v.encode()) for k, v in HEADERS.items())]
            await send(message)

        await self.app(scope, receive, with_headers)


class HostCheck:
    """Answers only requests whose Host header names an allowed host ("*": any), so that a web
    page elsewhere cannot read the store by pointing its own DNS name at 127.0.0.1 (DNS
    rebinding). Starlette's TrustedHostMiddleware cuts "[::1]:8765" at the first colon; this
    reads an IPv6 literal whole."""

    def __init__(self, app: ASGIApp, allowed: list[str]) -> None:
        self.app = app
        self.allowed = set(allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and "*" not in self.allowed:
            headers = dict(scope["headers"])
            name = host_name(headers.get(b"host", b"").decode("latin-1"))
            if name not in self.allowed:
                await PlainTextResponse("Invalid host header", status_code=400)(
                    scope, receive, send)
                return
        await self.app(scope, receive, send)


def host_name(header: str) -> str:
    """The host of a Host header, without its port: "[::1]:8765" -> "[::1]"."""
    if header.startswith("["):
        return header[:header.find("]") + 1] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class BadRequest(SelmError):
    """A query parameter that does not parse (answered 400, not 404)."""


class Viewer:
    """The store and what the pages share: templates, the overview and plot cached per store
    version, and the search index.

    Each thread of the server's pool reads through its own `Store`: a Store keeps its Delta
    tables and refreshes them in place when asked for a version, which two threads must not do
    at once.
    """

    def __init__(self, store: Store) -> None:
        self._uri = store.uri
        self._local = threading.local()
        self._local.store = store
        self.env = Environment(loader=PackageLoader("selm_data.view", "templates"),
                               autoescape=True, undefined=StrictUndefined,
                               trim_blocks=True, lstrip_blocks=True)
        self.env.globals.update(
            markdown=render.markdown, num=render.num, pct=render.pct, short=render.short,
            shade=render.shade, store_uri=store.uri, origins=RESPONSE_ORIGINS)
        self._lock = threading.Lock()  # one computation of the cached overview and plot
        self._plot: tuple[tuple[int, ...], bytes | None] | None = None
        self._stats: tuple[tuple[int, ...], dict[str, Any]] | None = None
        self._diffs: dict[tuple[Any, ...], Diff] = {}
        self.texts = queries.TextIndex()

    @property
    def store(self) -> Store:
        """This thread's Store (opened read-only on first use)."""
        store: Store | None = getattr(self._local, "store", None)
        if store is None:
            store = self._local.store = open_store(self._uri)
        return store

    def page(self, template: str, status: int = 200, **values: Any) -> HTMLResponse:
        html = self.env.get_template(template).render(**values)
        return HTMLResponse(html, status_code=status)

    def overview(self) -> dict[str, Any]:
        """The overview's tables, computed again only when a table changed (`inspect`'s
        statistics read every response's length: ~1.5 s on a 100k-pair iteration)."""
        with self._lock:
            key = tuple(self.store.versions().values())
            if self._stats is None or self._stats[0] != key:
                try:
                    stats = iteration_stats(self.store).to_dicts()
                except SelmError:
                    stats = []
                answers, matrices = queries.win_matrices(self.store)
                snapshots, checkpoints = queries.snapshots_and_checkpoints(self.store)
                self._stats = (key, {
                    "stats": stats, "quarantine": quarantine_stats(self.store).to_dicts(),
                    "answers": answers.to_dicts(), "matrices": matrices,
                    "snapshots": snapshots, "checkpoints": checkpoints})
            return self._stats[1]

    def diff(self, a: str, b: str) -> Diff:
        """`selm-data diff A B`, kept for the store's versions: a diff joins both sides whole
        (~10 s for two 100k-pair sides), and a user comes back to the same comparison."""
        key = (a, b, *(self.store.version(t) for t in READS))
        with self._lock:
            if key not in self._diffs:
                if len(self._diffs) >= 8:
                    self._diffs.pop(next(iter(self._diffs)))
                self._diffs[key] = diff(self.store, a, b)
            return self._diffs[key]

    def scores_png(self) -> bytes | None:
        """`inspect --plot`'s PNG, drawn again only when pairs or judgments changed."""
        with self._lock:
            key = (self.store.version("pairs"), self.store.version("judgments"))
            if self._plot is None or self._plot[0] != key:
                with tempfile.TemporaryDirectory() as tmp:
                    try:
                        png: bytes | None = plot(self.store, Path(tmp) / "scores.png").read_bytes()
                    except SelmError:  # nothing scored yet, or matplotlib missing
                        png = None
                self._plot = (key, png)
            return self._plot[1]


Handler = Callable[[Viewer, Request], Response]


def _int(request: Request, name: str, default: int | None = None) -> int | None:
    value = request.query_params.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise BadRequest(f"{name} must be a whole number, not {value!r}") from None


def _float(request: Request, name: str) -> float | None:
    value = request.query_params.get(name, "").strip()
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        raise BadRequest(f"{name} must be a number, not {value!r}") from None


def _link(path: str, params: dict[str, Any]) -> str:
    kept = {k: v for k, v in params.items() if v not in (None, "", False)}
    return path + ("?" + urlencode(kept) if kept else "")


# --- pages ----------------------------------------------------------------------------------


def overview(v: Viewer, request: Request) -> Response:
    tables = v.overview()
    return v.page("overview.html", title="Overview", sections=SECTIONS,
                  has_plot=bool(tables["stats"]), **tables)


def scores_png(v: Viewer, request: Request) -> Response:
    png = v.scores_png()
    if png is None:
        raise SelmError("no plot: nothing is scored yet, or matplotlib is missing "
                        "(pip install 'selm[plot]')")
    return Response(png, media_type="image/png")


FILTERS = ("ref", "ties", "margin_min", "margin_max", "chosen_origin", "rejected_origin", "q",
           "failed")


def pairs(v: Viewer, request: Request) -> Response:
    iterations, snapshots = queries.sources(v.store)
    snapshot = request.query_params.get("snapshot") or None
    iteration = _int(request, "iter")
    if snapshot is None and iteration is None:
        if not iterations:
            raise SelmError("the store holds no pairs yet; build an iteration first: "
                            "`selm-data build --iter 1`")
        iteration = iterations[-1]
    if snapshot is not None:
        iteration = None
    # What the form shows and every link keeps: the source, the filters as typed, the order.
    params: dict[str, Any] = {"iter": iteration, "snapshot": snapshot,
                              "sort": request.query_params.get("sort", "pair"),
                              **{k: request.query_params.get(k, "") for k in FILTERS}}
    page = _int(request, "page", 1) or 1
    common: dict[str, Any] = {
        "title": "Pairs", "iterations": iterations, "snapshots": snapshots, "params": params,
        "ref_roles": queries.REF_ROLES,
        "link": lambda **changes: _link("/pairs", {**params, **changes})}
    if params["failed"] and iteration is not None:
        rows, total = queries.failed_page(v.store, iteration, page)
        return v.page("failed.html", rows=rows, total=total, page=page,
                      pages=max(1, -(-total // queries.PER_PAGE)), **common)
    q = queries.PairQuery(
        iteration=iteration, snapshot=snapshot, ref=params["ref"], ties=params["ties"],
        margin_min=_float(request, "margin_min"), margin_max=_float(request, "margin_max"),
        chosen_origin=params["chosen_origin"], rejected_origin=params["rejected_origin"],
        text=params["q"].strip(), sort=params["sort"], page=page)
    return v.page("pairs.html", result=queries.pair_page(v.store, q, v.texts), **common)


def pair(v: Viewer, request: Request) -> Response:
    view = queries.pair_view(v.store, request.path_params["pair_id"])
    return v.page("pair.html", title=f"Pair {view.pair['pair_id'][:12]}", v=view)


def prompt(v: Viewer, request: Request) -> Response:
    across = queries.prompt_across(v.store, request.path_params["prompt_id"])
    return v.page("prompt.html", title="Prompt across iterations", p=across)


def compare(v: Viewer, request: Request) -> Response:
    iterations, snapshots = queries.sources(v.store)
    a, b = request.query_params.get("a", ""), request.query_params.get("b", "")
    result = v.diff(a, b) if a and b else None
    page = _int(request, "page", 1) or 1
    questions, total = queries.eval_questions(v.store, page)
    pages = max(1, -(-total // queries.PER_PAGE))
    return v.page("compare.html", title="Compare", iterations=iterations, snapshots=snapshots,
                  a=a, b=b, d=result, rows=DIFF_ROWS, change=change, questions=questions,
                  total=total, page=page, pages=pages,
                  link=lambda **changes: _link("/compare", {"a": a, "b": b, **changes}))


def question(v: Viewer, request: Request) -> Response:
    p = request.query_params
    across = queries.question_across(v.store, p.get("set", ""), p.get("id", ""))
    return v.page("question.html", title=f"Question {across.question_id} across policies",
                  qa=across)


def lineage_page(v: Viewer, request: Request) -> Response:
    from selm_data.publish.lineage import lineage

    node = lineage(v.store, request.path_params["row_id"])
    return v.page("lineage.html", title=f"Lineage of {node['kind']}", node=node)


def _handle(handler: Handler, v: Viewer) -> Callable[[Request], Response]:
    """A sync endpoint (Starlette runs it in a thread) that turns a user's error into a page."""
    def endpoint(request: Request) -> Response:
        try:
            return handler(v, request)
        except BadRequest as e:
            return v.page("error.html", status=400, title="Bad request", message=str(e))
        except SelmError as e:
            return v.page("error.html", status=404, title="Not found", message=str(e))
    return endpoint


def make_app(store: Store, *, allowed_hosts: list[str] | None = None) -> Starlette:
    """The viewer of `store`. `allowed_hosts`: the Host names it answers (default: loopback)."""
    v = Viewer(store)
    pages: list[tuple[str, Handler]] = [
        ("/", overview), ("/plots/scores.png", scores_png), ("/pairs", pairs),
        ("/pair/{pair_id}", pair), ("/prompt/{prompt_id}", prompt), ("/compare", compare),
        ("/question", question),
        ("/lineage/{row_id}", lineage_page),
    ]
    routes: list[Route | Mount] = [Route(path, _handle(h, v), methods=["GET"])
                                   for path, h in pages]
    routes.append(Mount("/static", StaticFiles(packages=[("selm_data.view", "static")]),
                        name="static"))
    return Starlette(routes=routes, middleware=[
        Middleware(SecurityHeaders),
        Middleware(HostCheck, allowed=allowed_hosts or LOOPBACK_NAMES),
    ])


def serve(store: Store, *, host: str = "127.0.0.1", port: int = 8765,
          say: Callable[[str], None] = print) -> None:
    """Serve the viewer until interrupted. A host other than loopback is allowed, with a
    warning: anyone who reaches that address reads the store."""
    import uvicorn

    if is_loopback(host):
        allowed = LOOPBACK_NAMES
    else:
        say(f"warning: --host {host} serves the store to every machine that can reach this "
            "address, without a password; the default 127.0.0.1 keeps it on this machine")
        allowed = ["*"]
    shown = f"[{host}]" if ":" in host else host
    say(f"selm-data view: http://{shown}:{port}/ (read-only; Ctrl-C stops it)")
    uvicorn.run(make_app(store, allowed_hosts=allowed), host=host, port=port,
                log_level="warning")


__all__ = ["HEADERS", "LOOPBACK_NAMES", "host_name", "is_loopback", "make_app", "serve"]
