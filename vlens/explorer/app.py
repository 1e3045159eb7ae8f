"""The web app of `vlens explore`: a FastAPI app with one page and a small JSON API over a `Session`.

Routes: `GET /` (the page, `vlens/templates/explore.html.j2`), `GET /static/plotly.min.js` (plotly.js
from the installed plotly package: nothing is fetched from the network), `GET /api/info`,
`POST /api/image` and `/api/vector` (uploads), `POST /api/geometry`, `/api/steer`, `/api/look`,
`/api/latent` (model work: each starts a job and returns `{"job": id}`; with `?wait=1` it answers
with the result; `/api/latent` with a `layer` shows that layer's transcoder feature), `GET /api/job/{id}`
(state, current stage, result or error), `POST /api/graph` (upload an attribution-graph JSON),
`GET /api/graph/{id}` (what the graph panel draws), `/api/graph/{id}/page.html` (the graph as one
stand-alone page) and `/api/graph/{id}/snippet?node=` (Python that prints a node's patches), `POST /api/snippet`,
`GET /api/export/{id}.html` (a job's figure as a stand-alone page), `GET /latents/...` (the SAE latent
browser pages). Model work runs on one worker thread, so the page never freezes; a `VlensError` is
answered `400 {"error": message}` and the server keeps running.

FastAPI is imported when an app is built (`build_app`), so this module imports without the extra; a
missing extra is an `InputError` naming `pip install 'vlens[explore]'`. The app's routes are plain
functions defined inside `build_app` (their annotations are real objects, so this module does not use
postponed annotations).
"""

import contextlib
import importlib.util
import itertools
import json
import tempfile
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import InputError, NotFoundError, VlensError
from ..graph_view import viewer_script
from ..viz import render
from .session import TOKEN_CHOICES, VECTOR_KINDS, VIEWS, Session, Settings
from .snippet import graph_snippet, session_snippet

__all__ = ["Jobs", "build_app"]


_EXTRA = "pip install 'vlens[explore]'"


@contextlib.contextmanager
def _save_unmounted() -> Iterator[None]:
    """Import the web stack with nnsight's `.save` lifted off `object` for the moment.

    nnsight mounts `save` on every object; anyio refuses to define its typed-attribute classes (which
    it does lazily, on first use) once every class has an unannotated public `save`. So the anyio
    modules the server and the test client use are imported here, with the mount lifted, then restored.
    """
    try:
        from nnsight import save
        from nnsight._c import mount, unmount
    except ImportError:  # no nnsight C extension: nothing is mounted
        mount = unmount = None
    mounted = unmount is not None and hasattr(object(), "save")
    if mounted:
        unmount("save")
    try:
        import anyio._backends._asyncio  # noqa: F401
        import anyio.abc  # noqa: F401
        import anyio.from_thread  # noqa: F401
        import anyio.streams.memory  # noqa: F401
        import anyio.streams.stapled  # noqa: F401
        import anyio.streams.tls  # noqa: F401
        import anyio.to_thread  # noqa: F401

        yield
    finally:
        if mounted:
            mount(save, "save")


def _need_extra() -> None:
    """Refuse to build the app without the explore extra, naming the install command."""
    for module, package in (("fastapi", "fastapi"), ("python_multipart", "python-multipart"), ("uvicorn", "uvicorn")):
        if importlib.util.find_spec(module) is None:
            raise InputError(f"vlens explore needs its web extra ({package} is not installed): {_EXTRA}")


def _error(e: BaseException) -> Any:
    from fastapi.responses import JSONResponse

    if isinstance(e, VlensError):
        return JSONResponse({"error": str(e)}, status_code=404 if isinstance(e, NotFoundError) else 400)
    return JSONResponse({"error": f"internal error ({type(e).__name__}): {e}"}, status_code=500)


class Jobs:
    """Model work on one worker thread: `submit(fn)` returns a job id; `status(id)` its state, stage and result.

    Example:
        >>> jobs = Jobs(lambda: "busy")
        >>> j = jobs.submit("add", lambda: 1 + 1)
        >>> jobs.wait(j)["result"]
        2
    """

    def __init__(self, stage: Callable[[], str], keep: int = 64) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlens-explore")
        self._jobs: dict[str, dict[str, Any]] = {}
        self._ids = itertools.count()
        self._stage = stage
        self._keep = keep
        self._lock = threading.Lock()

    def submit(self, what: str, fn: Callable[[], Any]) -> str:
        """Queue `fn` (its result must be JSON-able); return the job's id."""
        with self._lock:
            jid = str(next(self._ids))
            job: dict[str, Any] = {"id": jid, "what": what, "state": "queued"}
            self._jobs[jid] = job
            for old in list(self._jobs)[: max(len(self._jobs) - self._keep, 0)]:
                del self._jobs[old]

        def run() -> None:
            job["state"] = "running"
            try:
                job["result"] = fn()
                job["state"] = "done"
            except BaseException as e:  # noqa: BLE001 - every failure becomes a message on the page
                job["error"] = str(e) if isinstance(e, VlensError) else f"internal error ({type(e).__name__}): {e}"
                job["code"] = 404 if isinstance(e, NotFoundError) else 400 if isinstance(e, VlensError) else 500
                job["state"] = "error"
                if not isinstance(e, VlensError):
                    traceback.print_exc()

        job["future"] = self._pool.submit(run)
        return jid

    def status(self, jid: str) -> dict[str, Any]:
        """`{"id", "what", "state": queued|running|done|error, "stage", "result"|"error"}`."""
        job = self._jobs.get(jid)
        if job is None:
            raise NotFoundError(f"no job {jid!r} (finished jobs are kept for a while, then forgotten)")
        out = {k: v for k, v in job.items() if k not in ("future", "figure")}
        if job["state"] in ("queued", "running"):
            out["stage"] = self._stage() if job["state"] == "running" else "waiting for the model"
        return out

    def wait(self, jid: str) -> dict[str, Any]:
        """Block until the job ends; its status."""
        self._jobs[jid]["future"].result()
        return self.status(jid)

    def figure(self, jid: str) -> Any:
        """The plotly figure JSON a finished job produced (for export), or None."""
        job = self._jobs.get(jid) or {}
        result = job.get("result") or {}
        return result.get("figure") if isinstance(result, dict) else None

    def close(self) -> None:
        """Stop the worker (running work finishes first)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def build_app(session: Session) -> Any:
    """The FastAPI app over `session` (see the module docs for its routes).

    Example:
        >>> import vlens
        >>> from fastapi.testclient import TestClient
        >>> sess = Session(vlens.tiny(words=vlens.toy.data.all_words()), n_train=40, n_pool=2)
        >>> client = TestClient(build_app(sess))
        >>> client.get("/api/info").json()["family"]
        'llava-next'
        >>> client.post("/api/steer?wait=1", json={"src": "pink circle"}).json()["error"].startswith("unknown class")
        True
    """
    _need_extra()
    with _save_unmounted():
        import fastapi.responses  # noqa: F401 - loaded here, with the mount lifted, for the route helpers
        from fastapi import FastAPI, Request

    app = FastAPI(title="vlens explore", docs_url=None, redoc_url=None, openapi_url=None)
    jobs = Jobs(lambda: session.stage)
    app.state.session, app.state.jobs = session, jobs

    @app.exception_handler(VlensError)
    async def vlens_error(request: Request, e: VlensError) -> Any:
        return _error(e)

    @app.exception_handler(Exception)
    async def other_error(request: Request, e: Exception) -> Any:  # a bug: still a JSON message for the page
        return _error(e)

    _page_routes(app, session)
    _graph_routes(app, session)
    _view_routes(app, session, jobs, Path(tempfile.mkdtemp(prefix="vlens-explore-latents-")))
    return app


def _page_routes(app: Any, session: Session) -> None:
    """The page, its static files, the session's facts and uploads."""
    from fastapi import File, UploadFile
    from fastapi.responses import HTMLResponse, Response
    from plotly.offline import get_plotlyjs

    plotly_js: list[str] = []

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        info = session.info()
        return render("explore.html.j2", title=f"vlens explore — {info['model']}", info=info,
                      info_json=json.dumps(info).replace("</", "<\\/"), vector_kinds=VECTOR_KINDS,
                      token_choices=TOKEN_CHOICES, views=VIEWS, graph_script=viewer_script())

    @app.get("/static/plotly.min.js")
    def plotly() -> Any:
        if not plotly_js:
            plotly_js.append(get_plotlyjs())
        return Response(plotly_js[0], media_type="application/javascript",
                        headers={"Cache-Control": "max-age=86400"})

    @app.get("/favicon.ico")
    def favicon() -> Any:
        return Response(status_code=204)

    @app.get("/api/info")
    def info() -> dict:
        return session.info()

    @app.post("/api/image")
    async def upload_image(file: UploadFile = File(...)) -> dict:
        return session.add_image(await file.read(), file.filename or "upload")  # a bad file: the handler answers

    @app.post("/api/vector")
    async def upload_vector(file: UploadFile = File(...)) -> dict:
        return session.add_vector(await file.read(), file.filename or "vector.pt")


def _graph_routes(app: Any, session: Session) -> None:
    """The graph panel: uploads, what it draws, the stand-alone page, the snippet of a node."""
    from fastapi import File, UploadFile
    from fastapi.responses import HTMLResponse

    @app.post("/api/graph")
    async def upload_graph(file: UploadFile = File(...)) -> dict:
        return session.graphs.add(await file.read(), file.filename or "graph.json")

    @app.get("/api/graph/{gid}")
    def graph_view(gid: str) -> dict:
        return session.graphs.view(gid)

    @app.get("/api/graph/{gid}/page.html", response_class=HTMLResponse)
    def graph_page(gid: str) -> str:
        return session.graphs.page(gid)

    @app.get("/api/graph/{gid}/snippet")
    def graph_code(gid: str, node: str) -> dict:
        if node not in session.graphs.view(gid)["ids"]:
            raise NotFoundError(f"no node {node!r} in graph {gid}: click one of its nodes")
        return {"code": graph_snippet(session.graphs.files[gid], node)}


def _latent_of(body: dict, session: Session) -> tuple[int, int | None]:
    """(latent, layer or None) of a latent request; a layer without a transcoder is refused at once."""
    try:
        n = int(body.get("latent", -1))
        layer = None if body.get("layer") is None else int(body["layer"])
    except (TypeError, ValueError):
        raise InputError(f"latent and layer must be integers, not {body.get('latent')!r}, {body.get('layer')!r}"
                         ) from None
    if layer is not None:
        session.graphs.transcoder(layer)
    return n, layer


async def _body(request: Any) -> dict:
    """The request's JSON object of settings, or an InputError."""
    try:
        body = await request.json()
    except ValueError:
        raise InputError("the request body must be JSON") from None
    if not isinstance(body, dict):
        raise InputError("the request body must be a JSON object of settings")
    return body


def _view_routes(app: Any, session: Session, jobs: Jobs, latents_dir: Path) -> None:
    """The views, run as jobs (`?wait=1` answers when done), their snippets, exports and latent pages."""
    from fastapi import Request
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

    def _start(what: str, fn: Callable[[], Any], wait: int) -> Any:
        jid = jobs.submit(what, fn)
        if not wait:
            return {"job": jid}
        st = jobs.wait(jid)
        if st["state"] == "error":
            return JSONResponse({"error": st["error"], "job": jid}, status_code=st["code"])
        return {**st["result"], "job": jid}

    @app.post("/api/geometry")
    async def geometry(request: Request, wait: int = 0) -> Any:
        body = await _body(request)
        key = str(body.get("image", ""))
        session.image(key)  # an unknown image is refused at once
        return _start("geometry", lambda: session.geometry(key), wait)

    @app.post("/api/steer")
    async def steer(request: Request, wait: int = 0) -> Any:
        s = Settings.from_dict(await _body(request))
        session.image(s.image)
        return _start("steer", lambda: session.steer(s), wait)

    @app.post("/api/look")
    async def look(request: Request, wait: int = 0) -> Any:
        s = Settings.from_dict(await _body(request))
        session.image(s.image)
        return _start("look", lambda: session.look(s), wait)

    @app.post("/api/latent")
    async def latent(request: Request, wait: int = 0) -> Any:
        n, layer = _latent_of(await _body(request), session)
        folder = f"latent-{n}" if layer is None else f"layer-{layer}-latent-{n}"

        def run() -> dict:
            out = latents_dir / folder
            if not (out / f"latent_{n}.html").exists():
                session.latent_page(n, out, layer=layer)
            return {"url": f"/latents/{folder}/latent_{n}.html", "latent": n, "layer": layer}

        return _start("latent", run, wait)

    @app.get("/api/job/{jid}")
    def job(jid: str) -> dict:
        return jobs.status(jid)

    @app.post("/api/snippet")
    async def snippet(request: Request) -> dict:
        body = await _body(request)
        what = body.pop("what", "steer")
        if what not in ("steer", "look"):
            raise InputError(f"what must be 'steer' or 'look', not {what!r}")
        return {"code": session_snippet(session, Settings.from_dict(body), what)}

    @app.get("/api/export/{jid}.html", response_class=HTMLResponse)
    def export(jid: str) -> str:
        import plotly.io as pio

        fig = jobs.figure(jid)
        if fig is None:
            raise NotFoundError(f"job {jid} has no figure to export (run a view with a figure first)")
        return pio.from_json(fig).to_html(include_plotlyjs=True, full_html=True)

    @app.get("/latents/{folder}/{name}")
    def latent_file(folder: str, name: str) -> Any:
        path = (latents_dir / folder / name).resolve()
        if latents_dir.resolve() not in path.parents or not path.is_file():
            raise NotFoundError(f"no latent page {folder}/{name}: open a latent first")
        return FileResponse(path)

