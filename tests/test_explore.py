"""`vlens explore`: the JSON API on the toy model and tiny builds of every family, and the page in a real browser.

The API tests drive the FastAPI app in-process (`TestClient`, `?wait=1` answers with the result). The
browser test starts the real server on a free localhost port and drives headless Chromium (the system
one, through Playwright; never a downloaded browser); it skips without Chromium or Playwright. With
`VLENS_DOCS_SCREENSHOTS=1` it also writes the screenshots of docs/explore.md (docs/assets/explore-*.png).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path

import pytest
import torch

import vlens

pytest.importorskip("fastapi", reason="the explore extra is not installed: pip install 'vlens[explore]'")
pytest.importorskip("python_multipart", reason="the explore extra is not installed: pip install 'vlens[explore]'")

from vlens.explorer import Session, create_app, explore, load_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from browser_utils import chromium  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N_TRAIN = 40  # 2 toy images per class: enough for class means that flip the toy's answers
# (source, target, site, k) that flip the toy's two-choice answer (tests/test_steering.py finds the same)
FLIP = ("red circle", "blue circle", "resid_pre.1", 2.0)
FAMILIES = ["llava-next", "llava", "llava-onevision", "qwen2.5-vl", "qwen3-vl", "gemma3"]


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _pt(v: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.save(v, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def toy():
    return vlens.load("toy")


@pytest.fixture(scope="module")
def client(toy):
    from fastapi.testclient import TestClient

    session = Session(toy, n_train=N_TRAIN, n_pool=20, model="toy")
    with TestClient(create_app(session)) as c:
        yield c


def _first(name: str, n: int = 20) -> str:
    """The pool id of the first held-out toy image of class `name`."""
    return f"toy-{vlens.toy.CLASS_NAMES.index(name) % n}"


def test_page_and_local_plotly(client):
    page = client.get("/")
    assert page.status_code == 200 and 'src="/static/plotly.min.js"' in page.text and "red circle" in page.text
    assert 'src="http' not in page.text and "://cdn" not in page.text  # nothing is fetched from the network
    js = client.get("/static/plotly.min.js")
    assert js.status_code == 200 and len(js.content) > 1_000_000
    info = client.get("/api/info").json()
    assert info["sites"][:3] == ["resid_pre.0", "resid_post.0", "resid_pre.1"] and len(info["images"]) == 20


def test_steer_flips_the_toy_answer_and_the_snippet_reproduces_it(client, toy, capsys, monkeypatch):
    src, tgt, site, k = FLIP
    s = {"image": _first(src), "src": src, "tgt": tgt, "site": site, "k": k, "vector": "mean_diff"}
    r = client.post("/api/steer?wait=1", json=s)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["before"] == src and out["after"] == tgt and out["flipped"]
    assert out["p_after"] > 0.5 > out["p_before"]
    # a random direction of the same norm is the control: it does not flip
    ctrl = client.post("/api/steer?wait=1", json={**s, "vector": "random"}).json()
    assert not ctrl["flipped"] and abs(ctrl["norm"] - out["norm"]) < 1e-4
    # the exported snippet, run as it is, prints what the page showed
    code = client.post("/api/snippet", json=s).json()["code"]
    assert "vlm = vlens.load('toy')" in code
    monkeypatch.setattr(vlens, "load", lambda name: toy if name == "toy" else None)  # the same checkpoint, loaded once
    capsys.readouterr()
    exec(compile(code, "explore_snippet.py", "exec"), {})
    printed = capsys.readouterr().out
    assert f"after: {tgt}, p({tgt}) = {out['p_after']:.3f}" in printed, printed
    assert f"before: {src}, p({tgt}) = {out['p_before']:.3f}" in printed, printed


def test_the_docs_show_the_snippet_of_the_page_defaults():
    from vlens.explorer.session import Settings
    from vlens.explorer.snippet import snippet

    assert f"```python\n{snippet(Settings(), model='toy')}```" in (ROOT / "docs" / "explore.md").read_text()


def test_bad_inputs_answer_with_the_error_and_the_server_keeps_going(client):
    src, tgt, site, k = FLIP
    bad = client.post("/api/image", files={"file": ("notes.txt", b"not an image", "text/plain")})
    assert bad.status_code == 400 and "notes.txt is not an image" in bad.json()["error"]
    wide = client.post("/api/vector", files={"file": ("v.pt", _pt(torch.ones(3)), "application/octet-stream")})
    assert wide.status_code == 400 and "width 3" in wide.json()["error"] and "d_model 64" in wide.json()["error"]
    unknown = client.post("/api/steer?wait=1", json={"src": "pink circle", "tgt": tgt})
    assert unknown.status_code == 404 and "unknown class 'pink circle'" in unknown.json()["error"]
    assert client.post("/api/steer?wait=1", json={"k": "lots"}).json()["error"].startswith("setting 'k'")
    assert "tokens must be one of" in client.post("/api/steer", json={"tokens": "images"}).json()["error"]
    # the next good requests work: an uploaded image, an uploaded vector (the toy's own class-mean difference)
    picture = vlens.toy.toy_dataset("heldout", n=20)[vlens.toy.CLASS_NAMES.index(src)].image
    up = client.post("/api/image", files={"file": ("red.png", _png(picture), "image/png")})
    assert up.status_code == 200, up.text
    session = client.app.state.session
    X, y = session.features(site)
    v = vlens.steering.diff_of_means(X, y, vlens.toy.CLASS_NAMES.index(src), vlens.toy.CLASS_NAMES.index(tgt))
    vec = client.post("/api/vector", files={"file": ("v.pt", _pt(v), "application/octet-stream")})
    assert vec.status_code == 200 and vec.json()["width"] == 64
    r = client.post("/api/steer?wait=1", json={"image": up.json()["id"], "src": src, "tgt": tgt, "site": site, "k": k,
                                               "vector": "upload", "upload": vec.json()["id"]})
    assert r.status_code == 200 and r.json()["after"] == tgt
    code = client.post("/api/snippet", json={"image": up.json()["id"], "vector": "upload",
                                             "upload": vec.json()["id"]}).json()["code"]
    assert "load_image('red.png')" in code and "torch.load('v.pt'" in code


def test_token_selections_damage_and_views(client, toy, tmp_path, monkeypatch):
    src, tgt, site, k = FLIP
    s = {"image": _first(src), "src": src, "tgt": tgt, "site": site, "k": k}
    r = client.post("/api/steer?wait=1", json={**s, "tokens": "box", "box": [0, 0, 64, 64],
                                               "caption": "a small red circle on the left on a dark background"})
    assert r.status_code == 200 and r.json()["damage"] is not None
    empty = client.post("/api/steer?wait=1", json={**s, "tokens": "box", "box": [10, 10, 10, 30]})
    assert empty.status_code == 400 and "is empty" in empty.json()["error"]
    g = client.post("/api/geometry?wait=1", json={"image": _first(src)}).json()
    assert g["counts"] == {"base": 16, "highres": 64, "newline": 8} and '"heatmap"' in g["figure"]
    for view in ("probe", "lens", "attribution"):
        look = client.post("/api/look?wait=1", json={**s, "view": view})
        assert look.status_code == 200 and look.json()["png"].startswith("data:image/png;base64,"), look.text
    page = client.get(f"/api/export/{look.json()['job']}.html")
    assert page.status_code == 404  # attribution has no plotly figure
    lens = client.post("/api/look?wait=1", json={**s, "view": "lens"}).json()
    assert lens["figure"] and client.get(f"/api/export/{lens['job']}.html").text.count("<script") >= 1
    # every "look" snippet runs as it is and writes the map
    monkeypatch.setattr(vlens, "load", lambda name: toy)
    monkeypatch.chdir(tmp_path)
    for view in ("lens", "probe", "attribution"):
        code = client.post("/api/snippet", json={**s, "view": view, "what": "look"}).json()["code"]
        exec(compile(code, f"look_{view}.py", "exec"), {})
        assert (tmp_path / "look.png").exists()
        (tmp_path / "look.png").unlink()
    assert (tmp_path / "lens.html").exists()
    # async mode: a job id, then its state
    jid = client.post("/api/look", json={**s, "view": "probe"}).json()["job"]
    client.app.state.jobs.wait(jid)
    assert client.get(f"/api/job/{jid}").json()["state"] == "done"
    assert client.get("/api/job/nope").status_code == 404


def test_sae_views_and_latent_browser(toy, tmp_path):
    from fastapi.testclient import TestClient

    import vlens.sae as vs

    sae = vs.train(torch.randn(512, toy.d_model), "paper", d_sae=16, steps=2, batch_size=256, progress=False)
    sae.cfg.metadata.hook_name = toy.hook_name("resid_pre.2")
    session = Session(toy, sae=sae, n_train=40, n_pool=4)
    with TestClient(create_app(session)) as c:
        info = c.get("/api/info").json()
        assert info["sae"]["site"] == "resid_pre.2" and info["sae"]["d_sae"] == 16
        r = c.post("/api/steer?wait=1", json={"vector": "sae", "latent": 3, "site": "resid_pre.2", "k": 4})
        assert r.status_code == 200, r.text
        assert c.post("/api/look?wait=1", json={"view": "sae", "latent": 3}).status_code == 200
        assert "out of range 0..15" in c.post("/api/look?wait=1", json={"view": "sae", "latent": 99}).json()["error"]
        page = c.post("/api/latent?wait=1", json={"latent": 3}).json()
        html = c.get(page["url"])
        assert html.status_code == 200 and "latent 3" in html.text
        assert c.get("/latents/..%2F..%2Fetc/passwd").status_code == 404


def _hf_image_means(vlm, samples, modules):
    """Reference class features: per sample, the mean over its image tokens of HF modules' values, caught with plain
    torch hooks (`modules`: name -> (module, "input" or "output")) on HF's own forward."""
    got = {k: [] for k in modules}
    cur = {}

    def hook(name, which):
        def fn(mod, args, out):
            cur[name] = args[0] if which == "input" else (out[0] if isinstance(out, tuple) else out)
        return fn

    handles = [m.register_forward_hook(hook(k, w)) for k, (m, w) in modules.items()]
    try:
        for i in range(0, len(samples), 8):
            part = samples[i:i + 8]
            b = vlm.prepare([vlens.toy.QUESTION] * len(part), [x.image for x in part])
            inputs = dict(b.inputs)
            pos = vlm.family.position_ids(inputs)
            if pos is not None:
                inputs["position_ids"] = pos
            with torch.no_grad():
                vlm.hf_model(**inputs)
            w = b.layout.image.float()
            for k in modules:
                h = cur[k].float().flatten(2)
                got[k].append((h * w[..., None]).sum(1) / w.sum(1, keepdim=True))
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in got.items()}


def test_in_layer_sites_read_hf_modules_and_run_every_view(client, toy):
    """The page offers attn_out, mlp_in, mlp_out and z of every layer; their class features are HF's own module
    values (torch hooks), and every view runs there (the lens refuses z, which is not in the residual basis)."""
    info = client.get("/api/info").json()
    kinds = ("z", "attn_out", "mlp_in", "mlp_out")
    assert info["layer_sites"] == [f"{k}.{L}" for L in range(toy.n_layers) for k in kinds]
    assert client.get("/").text.count('<optgroup label="inside the layer">') == 1
    session = client.app.state.session
    layer = toy.hf_model.model.language_model.layers[1]
    modules = {"attn_out.1": (layer.self_attn, "output"), "mlp_in.1": (layer.mlp, "input"),
               "mlp_out.1": (layer.mlp, "output"), "z.1": (layer.self_attn.o_proj, "input")}
    ref = _hf_image_means(toy, session.data, modules)
    src, tgt = "red circle", "blue circle"
    base = {"image": _first(src), "src": src, "tgt": tgt, "k": 4.0}
    for site, want in ref.items():
        r = client.post("/api/steer?wait=1", json={**base, "site": site, "vector": "mean_diff"})
        assert r.status_code == 200 and isinstance(r.json()["after"], str), r.text
        torch.testing.assert_close(session.features(site)[0].float(), want, rtol=1e-4, atol=1e-5)
        for view in ("probe", "lens", "attribution"):
            look = client.post("/api/look?wait=1", json={**base, "site": site, "view": view})
            if view == "lens" and site.startswith("z."):
                assert look.status_code == 400 and "attn_out" in look.json()["error"]
            else:
                assert look.status_code == 200 and site in look.json()["title"], look.text


@pytest.mark.parametrize("site", ["mlp_out.2", "z.2"])
def test_sae_at_an_in_layer_site(toy, site):
    """An SAE whose hook_name is an in-layer site (Gemma Scope 2's mlp_out and hook_z) drives the SAE view, the SAE
    vector and the latent browser at that site."""
    from fastapi.testclient import TestClient

    import vlens.sae as vs

    sae = vs.train(torch.randn(512, toy.width(site)), "paper", d_sae=16, steps=2, batch_size=256, progress=False)
    sae.cfg.metadata.hook_name = toy.hook_name(site)
    with TestClient(create_app(Session(toy, sae=sae, n_train=40, n_pool=4))) as c:
        assert c.get("/api/info").json()["sae"]["site"] == site
        look = c.post("/api/look?wait=1", json={"view": "sae", "latent": 3})
        assert look.status_code == 200 and look.json()["title"] == f"SAE latent 3 at {site}", look.text
        r = c.post("/api/steer?wait=1", json={"vector": "sae", "latent": 3, "site": site, "k": 4})
        assert r.status_code == 200, r.text
        page = c.post("/api/latent?wait=1", json={"latent": 3}).json()
        assert c.get(page["url"]).status_code == 200


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family(family):
    from fastapi.testclient import TestClient

    vlm = load_model(f"tiny:{family}")
    with TestClient(create_app(Session(vlm, n_train=40, n_pool=2, model=f"tiny:{family}"))) as c:
        g = c.post("/api/geometry?wait=1", json={"image": "toy-0"})
        assert g.status_code == 200 and sum(g.json()["counts"].values()) > 0, g.text
        # an uploaded vector: no class features to read, so each family stays fast
        up = c.post("/api/vector", files={"file": ("v.pt", _pt(torch.randn(vlm.d_model)), "application/octet-stream")})
        s = {"image": "toy-0", "site": "resid_post.0", "k": 4.0, "tokens": "image", "vector": "upload",
             "upload": up.json()["id"]}
        r = c.post("/api/steer?wait=1", json=s)
        assert r.status_code == 200 and isinstance(r.json()["after"], str), r.text
        for view in ("lens", "attribution"):
            assert c.post("/api/look?wait=1", json={**s, "view": view}).status_code == 200
        code = c.post("/api/snippet", json=s).json()["code"]
        assert f'vlens.tiny(family="{family}"' in code


def test_explore_serves_in_a_thread_and_stops(toy):
    import json
    import urllib.request

    ex = explore(toy, block=False, n_train=40, n_pool=2, warm=False)
    try:
        assert ex.url.startswith("http://127.0.0.1:") and str(ex) == ex.url
        info = json.loads(urllib.request.urlopen(ex.url + "api/info", timeout=30).read())
        assert info["model"] == "toy"
    finally:
        ex.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(ex.url + "api/info", timeout=5)


def test_serving_prints_its_url_and_stops_on_ctrl_c():
    """What `vlens explore` runs (the command adds only argument checks, tested below), in a process of its own."""
    import json
    import signal
    import subprocess
    import urllib.request

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    code = "from vlens.explorer import explore; explore('tiny:llava', n_train=20, n_pool=2, warm=False)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT)
    try:
        line = proc.stdout.readline()
        assert line.startswith("vlens explore: http://127.0.0.1:"), line + proc.stderr.read()
        url = line.split()[2]
        assert json.loads(urllib.request.urlopen(url + "api/info", timeout=30).read())["family"] == "llava"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_cli_checks_arguments_first():
    from vlens.cli import main

    assert main(["explore", "--n-train", "0"]) == 2
    assert main(["explore", "--sae", "/no/such/sae"]) == 2


# -- in a real browser -------------------------------------------------------------------------------

def _playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    return sync_playwright


def _reddish(png: bytes) -> int:
    """Pixels of the heatmap colour (vlens.viz.heatmap_overlay paints red over the image)."""
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return int(((a[..., 0] - a[..., 1] > 70) & (a[..., 0] - a[..., 2] > 70)).sum())


@pytest.mark.browser
@pytest.mark.skipif(chromium() is None, reason="chromium is not on PATH (apt-get install -y chromium)")
@pytest.mark.skipif(_playwright() is None, reason="playwright is not installed (pip install playwright)")
def test_the_page_in_chromium(client, tmp_path):
    """Upload an image, set a class pair and k, steer: the answer flips and the heatmap draws; a bad upload
    shows its error and the next request still works."""
    src, tgt, k = "green circle", "blue circle", 2.0  # neither is red, so red pixels are the heatmap's
    picture = vlens.toy.toy_dataset("heldout", n=20)[vlens.toy.CLASS_NAMES.index(src)].image
    (tmp_path / "circle.png").write_bytes(_png(picture))
    (tmp_path / "notes.txt").write_text("not an image")
    shots = ROOT / "docs" / "assets" if os.environ.get("VLENS_DOCS_SCREENSHOTS") == "1" else None
    ex = explore(client.app.state.session, block=False)  # the API tests' session: its class features are read
    try:
        with _playwright()() as p, contextlib.closing(p.chromium.launch(
                executable_path=chromium(), args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                                  "--disable-component-update", "--disable-sync", "--no-first-run"])
        ) as browser:
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            page.set_default_timeout(90_000)
            page.goto(ex.url)
            page.wait_for_selector("#geometry .main-svg")  # the first data-set image, processed
            n = page.eval_on_selector_all("#images img", "els => els.length")
            page.set_input_files("#upload-image", str(tmp_path / "circle.png"))
            page.wait_for_function(f"document.querySelectorAll('#images img').length === {n + 1}")
            page.wait_for_function("document.getElementById('geometry-counts').textContent.includes('16 base')")
            page.fill("#src", src)
            page.fill("#tgt", tgt)
            page.select_option("#site", "resid_pre.1")
            page.eval_on_selector("#k", "(e, v) => { e.value = v; e.dispatchEvent(new Event('input')); }", str(k))
            assert page.inner_text("label[for=k]") == f"k = {k:g}"
            page.click("#run")
            page.wait_for_function(f"document.getElementById('answer-after').textContent === {tgt!r}")
            assert page.inner_text("#answer-before") == src and "flipped" in page.inner_text("#verdict")
            page.select_option("#view", "probe")
            page.click("#look")
            page.wait_for_selector("#heatmap[src^='data:image/png']")
            heat = page.locator("#heatmap").screenshot()
            assert _reddish(heat) > 200, "the heatmap did not draw"
            assert _reddish(page.locator("#picture").screenshot()) < 20  # the picture itself has no red
            if shots is not None:
                page.click("#snippet-steer")
                page.wait_for_selector("#snippet:not(:empty)")
                page.screenshot(path=str(shots / "explore-page.png"), full_page=True)
            # a bad upload: the message shows, the page and server go on
            page.set_input_files("#upload-image", str(tmp_path / "notes.txt"))
            page.wait_for_function("document.getElementById('error').textContent.includes('not an image')")
            assert page.inner_text("#answer-after") == tgt
            page.eval_on_selector("#k", "(e) => { e.value = '0'; e.dispatchEvent(new Event('input')); }")
            page.click("#run")
            page.wait_for_function(f"document.getElementById('answer-after').textContent === {src!r}")
            assert page.inner_text("#error") == ""
            if shots is not None:
                page.select_option("#view", "lens")
                page.click("#look")
                page.wait_for_selector("#lens-figure .main-svg")
                page.locator("#look-panel").screenshot(path=str(shots / "explore-lens.png"))
    finally:
        ex.stop()


@pytest.mark.browser
@pytest.mark.skipif(chromium() is None, reason="chromium is not on PATH (apt-get install -y chromium)")
@pytest.mark.skipif(_playwright() is None, reason="playwright is not installed (pip install playwright)")
def test_in_layer_sites_in_chromium(client):
    """The page's site list holds the sites inside each layer; the lens draws at attn_out, the probe map at mlp_out,
    and the lens at z shows why it refuses (then the page goes on)."""
    ex = explore(client.app.state.session, block=False)
    try:
        with _playwright()() as p, contextlib.closing(p.chromium.launch(
                executable_path=chromium(), args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                                  "--disable-component-update", "--disable-sync", "--no-first-run"])
        ) as browser:
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            page.set_default_timeout(90_000)
            page.goto(ex.url)
            page.wait_for_selector("#geometry .main-svg")
            inside = page.eval_on_selector_all("#site optgroup[label='inside the layer'] option",
                                               "els => els.map(e => e.value)")
            assert {"z.1", "attn_out.1", "mlp_in.1", "mlp_out.1"} <= set(inside)
            page.select_option("#site", "attn_out.1")
            page.select_option("#view", "lens")
            page.click("#look")
            page.wait_for_function("document.getElementById('look-title').textContent.includes('attn_out.1')")
            page.wait_for_selector("#lens-figure .main-svg")
            page.select_option("#site", "mlp_out.1")
            page.select_option("#view", "probe")
            page.click("#look")
            page.wait_for_function("document.getElementById('look-title').textContent.includes('mlp_out.1')")
            assert page.get_attribute("#heatmap", "src").startswith("data:image/png")
            page.select_option("#site", "z.1")
            page.select_option("#view", "lens")
            page.click("#look")
            page.wait_for_function("document.getElementById('error').textContent.includes('attn_out')")
            page.select_option("#view", "attribution")
            page.click("#look")
            page.wait_for_function("document.getElementById('look-title').textContent.includes('z.1')")
            assert page.inner_text("#error") == ""
    finally:
        ex.stop()
