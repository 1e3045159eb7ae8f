"""`vlens explore`: a local web page to intervene on a VLM and look at its image tokens.

Drop in an image, pick a site, a direction and a token selection, turn k, and see the greedy
answer and the target's probability before and after; look at per-patch maps (probe, SAE latent,
logit lens, attribution) and browse SAE latents. Every view exports as a Python snippet that
reproduces it with the library. Needs the `explore` extra: `pip install 'vlens[explore]'`.

| module     | holds                                                                              |
|------------|------------------------------------------------------------------------------------|
| `session`  | `Session` (model, images, cached class features; one method per view), `Settings` |
| `snippet`  | the settings as Python that reproduces the view                                    |
| `graphs`   | `GraphShelf`: the attribution graphs of the graph panel, and transcoders by layer  |
| `app`      | the FastAPI app (imported only when a server starts)                               |

    >>> import vlens
    >>> from vlens.explorer import explore
    >>> ex = explore(vlens.tiny(words=vlens.toy.data.all_words()), block=False, n_train=40, n_pool=4)
    vlens explore: http://127.0.0.1:...
    >>> ex.url.startswith("http://127.0.0.1:")
    True
    >>> ex.stop()
"""

from __future__ import annotations

import socket
import threading
import time
import webbrowser
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import InputError
from .session import Session, Settings, pixel_box

if TYPE_CHECKING:
    from ..model import VLM

__all__ = ["explore", "Explorer", "create_app", "load_model", "Session", "Settings", "pixel_box"]

_EXTRA = "pip install 'vlens[explore]'"


def create_app(session: Session) -> Any:
    """The FastAPI app over a `Session` (for `fastapi.testclient.TestClient` or your own server).

    Example:
        >>> import vlens
        >>> app = create_app(Session(vlens.tiny(words=vlens.toy.data.all_words()), n_train=40, n_pool=2))
        >>> type(app).__name__
        'FastAPI'
    """
    from .app import build_app

    return build_app(session)


def load_model(model: str = "toy") -> "VLM":
    """The model of `vlens explore --model`: 'toy', 'tiny:FAMILY' (a random tiny build that knows the toy's words),
    or anything `vlens.load` takes (a hub id, a directory).

    Example:
        >>> load_model("tiny:gemma3").family.name
        'gemma3'
    """
    from ..loading import load, tiny
    from ..toy.data import all_words

    if model.startswith("tiny:"):
        return tiny(family=model[5:], words=all_words())
    return load(model)


class Explorer:
    """A running explorer: `url`, the `session` behind it, and `stop()` (also on leaving a `with` block).

    `str(explorer)` is its URL.
    """

    def __init__(self, url: str, session: Session, server: Any, thread: threading.Thread | None) -> None:
        self.url, self.session = url, session
        self._server, self._thread = server, thread

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server and its worker (model work already running finishes first)."""
        self._server.should_exit = True
        self.session.closing = True
        if self._thread is not None:
            self._thread.join(timeout)
        self._server.config.app.state.jobs.close()

    def __enter__(self) -> "Explorer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"Explorer({self.url!r}, model {self.session.vlm.name!r})"

    def _repr_html_(self) -> str:
        return f'<a href="{self.url}" target="_blank">vlens explore: {self.url}</a>'


def _loopback(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


def explore(
    vlm: "VLM | str | Session | None" = None,
    *,
    sae: Any = None,
    probes: dict | None = None,
    data: Sequence | None = None,
    pool: Sequence | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    open_browser: bool = False,
    block: bool = True,
    n_train: int = 240,
    n_pool: int = 40,
    warm: bool = True,
    graphs: Sequence | None = None,
    transcoders: dict | None = None,
) -> Explorer:
    """Serve the explorer page for `vlm` (default: the toy model; a string goes to `load_model`; a `Session` is
    served as it is, with its cached features) and return it.

    `port=0` takes a free port; the URL is printed. `block=True` serves until Ctrl-C (then returns the stopped
    `Explorer`); `block=False` serves from a background thread and returns at once (a notebook: open
    `explorer.url`, later `explorer.stop()`). `sae` (an SAE-Lens SAE or a path for `vlens.sae.load`) enables the
    SAE vector, view and latent browser; `probes` maps sites to fitted probes (otherwise probes are fit on the
    class features when asked). `data` is the labelled data for class means (default `n_train` toy images),
    `pool` the images to pick from (default `n_pool` held-out toy images). `warm` reads the class features in
    the background right away. The server listens on `host`: keep the default (this machine only) unless you
    mean to share a page that has no login. `graphs` (attribution-graph JSON paths or dicts, circuit-tracer's
    format) open in the graph panel, and `transcoders` ({layer: transcoder}, or a list by layer) give their
    features' dashboards; `explorer.session.graphs.add(graph)` adds a graph to a running page (reload it).

    Example:
        >>> import vlens, urllib.request
        >>> ex = explore(vlens.tiny(words=vlens.toy.data.all_words()), block=False, n_train=40, n_pool=2, warm=False)
        vlens explore: http://127.0.0.1:... (model tiny-llava-next; Ctrl-C stops)
        >>> b"vlens explore" in urllib.request.urlopen(ex.url).read()
        True
        >>> ex.stop()
    """
    try:
        import uvicorn
    except ImportError:
        raise InputError(f"vlens explore needs its web extra (uvicorn is not installed): {_EXTRA}") from None
    if not isinstance(port, int) or not 0 <= port < 65536:
        raise InputError(f"port must be 0 (any free port) or 1..65535, not {port!r}")
    if isinstance(vlm, Session):
        if any(x is not None for x in (sae, probes, data, pool, graphs, transcoders)):
            raise InputError("a Session already holds its SAE, probes, data and graphs: pass them to Session(...) "
                             "instead (or session.graphs.add(graph))")
        session = vlm
    else:
        model = load_model(vlm if isinstance(vlm, str) else "toy") if vlm is None or isinstance(vlm, str) else vlm
        # what the snippet loads: the spec given, and the toy model by its name (`vlens.load("toy")` names it so)
        spec = vlm if isinstance(vlm, str) else "toy" if model.name == "toy" else None
        sae_path = None
        if isinstance(sae, str) or hasattr(sae, "__fspath__"):
            from ..sae.io import load as load_sae

            sae_path, sae = str(sae), load_sae(sae)
        session = Session(model, sae=sae, probes=probes, data=data, pool=pool, n_train=n_train, n_pool=n_pool,
                          model=spec, sae_path=sae_path, graphs=graphs, transcoders=transcoders)
    session.closing = False
    app = create_app(session)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)  # connections wait for the server from now on: the printed URL answers at once
    except OSError as e:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port} ({e.strerror}): pick another --port, or 0 for a free one"
                         ) from None
    bound = sock.getsockname()[1]
    url = f"http://{f'[{host}]' if ':' in host else host}:{bound}/"
    config = uvicorn.Config(app, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    if not _loopback(host):
        print(f"vlens explore: listening on {host}: anyone who can reach it can use the page (it has no login)")
    if warm and session.class_names:
        app.state.jobs.submit("warm", lambda: session.features(session.sites[0]) and None)
    print(f"vlens explore: {url}  (model {session.vlm.name}; Ctrl-C stops)", flush=True)
    if open_browser:
        webbrowser.open(url)
    if block:
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:
            pass
        finally:
            session.closing = True
            app.state.jobs.close()
            sock.close()
        return Explorer(url, session, server, None)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="vlens-explore-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    if not server.started:
        raise InputError(f"the explorer's server did not start on {url}: check the host, or try another port")
    return Explorer(url, session, server, thread)
