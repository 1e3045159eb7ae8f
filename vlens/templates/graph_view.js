// vlens attribution-graph view: draws vlens.graph_view.view_data as SVG (rows: layers, columns: positions);
// clicking a node paints its image patches' influence (computed in Python, data.heat) over each picture.
// Used by the static export (graph.html.j2) and the explorer's graph panel. Plain DOM, nothing fetched.
function vlensGraphView(root, data, options) {
  options = options || {};
  const NS = "http://www.w3.org/2000/svg";
  const COLOURS = {embedding: "#8c959f", patch: "#1b998b", logit: "#2da44e", error: "#bbbbbb", feature: "#f58518"};
  const el = (tag, attrs, parent) => {
    const e = document.createElementNS(NS, tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(e);
    return e;
  };
  const kindOf = (n) => n.kind === "logit" ? "logit" : n.kind === "embedding" ? (n.patch ? "patch" : "embedding")
    : n.kind.includes("error") ? "error" : "feature";
  root.innerHTML = "";
  root.classList.add("vg");
  const graphBox = document.createElement("div"); graphBox.className = "vg-graph"; root.appendChild(graphBox);
  const side = document.createElement("div"); side.className = "vg-side"; root.appendChild(side);
  const info = document.createElement("div"); info.className = "vg-info"; side.appendChild(info);
  const pics = document.createElement("div"); pics.className = "vg-pics"; side.appendChild(pics);

  // layout: a column per position that has nodes, as wide as its fullest cell
  const ctxs = [...new Set(data.nodes.map((n) => n.ctx))].sort((a, b) => a - b);
  const cells = {}, colWidth = {};
  data.nodes.forEach((n, i) => { (cells[n.row + ":" + n.ctx] = cells[n.row + ":" + n.ctx] || []).push(i); });
  ctxs.forEach((c) => { colWidth[c] = 26; });
  for (const key in cells) { const c = +key.split(":")[1]; colWidth[c] = Math.max(colWidth[c], 14 * cells[key].length + 12); }
  const colX = {}; let x = 60;
  ctxs.forEach((c) => { colX[c] = x; x += colWidth[c]; });
  const nRows = data.nodes.reduce((m, n) => Math.max(m, n.row), 0) + 1, rowH = 46, top = 16;
  const height = top + nRows * rowH + 70, width = x + 20;
  const pos = data.nodes.map(() => null);
  for (const key in cells) {
    const [r, c] = key.split(":").map(Number), ids = cells[key];
    ids.forEach((i, j) => { pos[i] = [colX[c] + colWidth[c] / 2 + (j - (ids.length - 1) / 2) * 14, top + (nRows - 1 - r) * rowH + rowH / 2]; });
  }
  const svg = el("svg", {width, height, viewBox: `0 0 ${width} ${height}`, class: "vg-svg"}, graphBox);
  for (let r = 0; r < nRows; r++) {
    const y = top + (nRows - 1 - r) * rowH + rowH / 2;
    el("line", {x1: 50, x2: width, y1: y, y2: y, stroke: "#f0f0f0"}, svg);
    const t = el("text", {x: 4, y: y + 4, "font-size": 11, fill: "#57606a"}, svg);
    t.textContent = r === 0 ? "Emb" : r === nRows - 1 && data.nodes.some((n) => n.kind === "logit" && n.row === r) ? "Logit" : `L${r - 1}`;
  }
  ctxs.forEach((c) => {
    const t = el("text", {x: colX[c] + colWidth[c] / 2, y: height - 60, "font-size": 10, fill: "#57606a",
                          transform: `rotate(45 ${colX[c] + colWidth[c] / 2} ${height - 60})`}, svg);
    t.textContent = (data.tokens[c] === undefined ? "#" + c : data.tokens[c]).slice(0, 14);
  });
  const maxW = data.links.reduce((m, l) => Math.max(m, Math.abs(l[2])), 1e-12);
  // the strongest MAX_LINKS links are drawn faintly; the selected node's links are drawn over them
  const MAX_LINKS = 4000;
  const linkG = el("g", {}, svg), selG = el("g", {}, svg), nodeG = el("g", {}, svg);
  const line = ([s, t, w], opacity, cls, parent) => el("line", {x1: pos[s][0], y1: pos[s][1], x2: pos[t][0],
    y2: pos[t][1], stroke: w >= 0 ? "#1f5fa6" : "#b0306a", "stroke-width": 0.5 + 2.5 * Math.abs(w) / maxW,
    "stroke-opacity": opacity, class: cls}, parent);
  const strongest = data.links.length <= MAX_LINKS ? data.links
    : [...data.links].sort((a, b) => Math.abs(b[2]) - Math.abs(a[2])).slice(0, MAX_LINKS);
  strongest.forEach((l) => line(l, 0.04 + 0.12 * Math.abs(l[2]) / maxW, "vg-link", linkG));
  const marks = data.nodes.map((n, i) => {
    const k = kindOf(n), [cx, cy] = pos[i], size = n.target ? 7 : 5;
    const m = k === "embedding" || k === "patch" ? el("rect", {x: cx - size, y: cy - size, width: 2 * size, height: 2 * size})
      : el("circle", {cx, cy, r: size});
    m.setAttribute("fill", COLOURS[k]); m.setAttribute("stroke", "#333"); m.setAttribute("stroke-width", 0.6);
    m.setAttribute("class", "vg-node vg-" + k); m.setAttribute("data-id", n.id);
    if (k === "error") m.setAttribute("stroke-dasharray", "2 1");
    const title = el("title", {}, m); title.textContent = n.label;
    m.style.cursor = "pointer";
    m.addEventListener("click", () => select(i));
    nodeG.appendChild(m);
    return m;
  });

  // pictures, each with a canvas for the heat
  const canvases = (data.images || []).map((im, j) => {
    const wrap = document.createElement("div"); wrap.className = "vg-pic";
    const img = document.createElement("img"); img.src = im.src; img.alt = `picture ${j}`;
    const cv = document.createElement("canvas"), scale = Math.min(1, 512 / Math.max(im.size[0], im.size[1]));
    cv.width = Math.max(1, Math.round(im.size[0] * scale)); cv.height = Math.max(1, Math.round(im.size[1] * scale));
    cv.dataset.scale = scale; cv.className = "vg-heat"; cv.id = (root.id || "vg") + "-heat-" + j;
    wrap.appendChild(img); wrap.appendChild(cv); pics.appendChild(wrap);
    return cv;
  });

  function paint(i) {
    const grids = canvases.map((cv) => new Float32Array(cv.width * cv.height));
    let vmax = 0;
    for (const [k, v] of data.heat[i]) {
      const p = data.patches[k], cv = canvases[p.image];
      if (!cv) continue;
      const s = +cv.dataset.scale, g = grids[p.image];
      const x0 = Math.max(0, Math.floor(p.box[0] * s)), y0 = Math.max(0, Math.floor(p.box[1] * s));
      const x1 = Math.min(cv.width, Math.max(x0 + 1, Math.ceil(p.box[2] * s))), y1 = Math.min(cv.height, Math.max(y0 + 1, Math.ceil(p.box[3] * s)));
      for (let yy = y0; yy < y1; yy++) for (let xx = x0; xx < x1; xx++) g[yy * cv.width + xx] += v;
    }
    grids.forEach((g) => g.forEach((v) => { if (v > vmax) vmax = v; }));
    canvases.forEach((cv, j) => {
      const ctx = cv.getContext("2d"), img = ctx.createImageData(cv.width, cv.height);
      grids[j].forEach((v, q) => { img.data[4 * q] = 230; img.data[4 * q + 1] = 30; img.data[4 * q + 2] = 30;
        img.data[4 * q + 3] = vmax > 0 ? Math.round(170 * Math.min(1, v / vmax)) : 0; });
      ctx.putImageData(img, 0, 0);
    });
  }

  function select(i) {
    const n = data.nodes[i];
    marks.forEach((m, j) => m.setAttribute("stroke-width", j === i ? 2.5 : 0.6));
    selG.innerHTML = "";
    data.links.forEach((l) => { if (l[0] === i || l[1] === i) line(l, 0.35 + 0.65 * Math.abs(l[2]) / maxW, "vg-link-on", selG); });
    root.dataset.selected = n.id;
    const facts = [`<b></b>`, `layer ${n.layer} · position ${n.ctx} · ${n.kind}`];
    if (n.activation !== null && n.activation !== undefined) facts.push(`activation ${(+n.activation).toPrecision(3)}`);
    if (n.influence !== null && n.influence !== undefined) facts.push(`influence ${(+n.influence).toPrecision(3)}`);
    facts.push(data.patches.length ? `image patches: ${(100 * data.share[i]).toFixed(1)}% of its input influence`
      : "the graph has no image patches");
    info.innerHTML = facts.join("<br>");
    info.querySelector("b").textContent = n.label;
    info.dataset.share = data.share[i];
    paint(i);
    if (options.onSelect) options.onSelect(n, i);
  }

  let first = data.nodes.findIndex((n) => n.target);
  if (first < 0) first = data.nodes.findIndex((n) => n.kind === "logit");
  if (first >= 0) select(first);
  return {select: (id) => { const i = data.ids.indexOf(id); if (i < 0) throw new Error(`no node ${id}`); select(i); }, data};
}
