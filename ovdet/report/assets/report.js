// ovdet report: draws the run's boxes from the embedded JSON at the thresholds the sliders set. No network.
// Every string of the JSON comes from files (run.json, the journal, errors.jsonl) and goes into the page as text:
// elements are built with createElement and filled with textContent, never from HTML strings (innerHTML and the
// like). The page's Content-Security-Policy refuses inline style attributes and, with Trusted Types, makes any
// string written to innerHTML throw; styles are set through element.style (the CSSOM), which it allows.
(() => {
  "use strict";
  const started = performance.now();
  const D = JSON.parse(document.getElementById("ovdet-data").textContent);
  const C = D.classes, K = C.length, IMGS = D.images, EVAL = D.kind === "eval";
  const thr = C.map((c) => c.start);
  const S = { filter: "all", sort: "file", page: 0, size: 48, view: [], viewing: -1 };
  const NS = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "style") e.style.cssText = v;
      else e.setAttribute(k, v);
    }
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function svg(tag, attrs) {
    const e = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    return e;
  }
  const fmt = (v) => String(+(+v).toFixed(3));
  const fixed3 = (v) => (+v || 0).toFixed(3);
  const shown = (v) => (Array.isArray(v) ? v.join(", ")
    : v !== null && typeof v === "object" ? JSON.stringify(v) : String(v));
  const kept = (d) => d[1] > thr[d[0]];
  const shellQuote = (s) => (/^[\w@%+=:,./-]+$/.test(s) ? s : "'" + s.replace(/'/g, "'\\''") + "'");

  // ------------------------------------------------------------------ statistics at the current thresholds
  const scores = C.map(() => []);
  for (const im of IMGS) for (const d of im.d) scores[d[0]].push(d[1]);
  const totalBoxes = scores.reduce((a, s) => a + s.length, 0);
  let stats = null;

  function computeStats() {
    const st = C.map(() => ({ kept: 0, tp: 0, fp: 0, missed: 0, gt: 0 }));
    for (const im of IMGS) {
      im.d.forEach((d, j) => {
        if (!kept(d)) return;
        const s = st[d[0]];
        s.kept++;
        if (EVAL) { if (im.m[j]) s.tp++; else s.fp++; }
      });
      if (EVAL) im.g.forEach((g, j) => { st[g[0]].gt++; if (!(im.gs[j] > thr[g[0]])) st[g[0]].missed++; });
    }
    return st;
  }
  function imageFp(im) { let n = 0; im.d.forEach((d, j) => { if (kept(d) && !im.m[j]) n++; }); return n; }
  function imageMissed(im) { let n = 0; im.g.forEach((g, j) => { if (!(im.gs[j] > thr[g[0]])) n++; }); return n; }
  function uncertainty(im) {
    let u = Infinity;
    for (const d of im.d) u = Math.min(u, Math.abs(d[1] - thr[d[0]]));
    return u;
  }

  // ------------------------------------------------------------------ header, settings, skipped files
  function renderHeader() {
    const kept = stats.reduce((a, s) => a + s.kept, 0);
    $("summary").replaceChildren(el("b", {}, IMGS.length), " images · ", el("b", {}, D.errors.length), " skipped · ",
      el("b", { id: "kept-total" }, kept), ` of ${totalBoxes} boxes above the thresholds · ${D.kind} run `,
      el("code", {}, D.run), ` · made ${D.generated}`);
  }
  function renderSettings() {
    const t = $("settings");
    for (const [k, v] of Object.entries(D.settings)) {
      const tr = el("tr");
      tr.append(el("th", {}, k), el("td", {}, shown(v)));
      t.append(tr);
    }
    if (D.relabel) {
      const tr = el("tr");
      tr.append(el("th", {}, "relabelled from"), el("td", {}, shown(D.relabel.from || "")));
      t.append(tr);
    }
    $("errors-title").textContent = `Skipped files (${D.errors.length})`;
    for (const e of D.errors) $("errors").append(el("li", {}, `${e.image}: ${e.reason}`));
    const bad = Object.entries(D.thumb_errors || {});
    for (const [k, r] of bad) $("errors").append(el("li", {}, `${k}: no thumbnail (${r})`));
  }

  // ------------------------------------------------------------------ class table: sliders, counts, histograms
  const BINS = 24;
  function histogram(i) {
    const c = C[i], lo = Math.floor(c.floor * 100) / 100, w = 200, h = 34;
    const counts = new Array(BINS).fill(0);
    for (const s of scores[i]) counts[Math.min(BINS - 1, Math.floor(((s - lo) / (1 - lo)) * BINS))]++;
    const max = Math.max(1, ...counts);
    const g = svg("svg", { class: "hist", width: w, height: h, viewBox: `0 0 ${w} ${h}` });
    counts.forEach((n, b) => {
      const x0 = (b / BINS) * w, bh = Math.sqrt(n / max) * (h - 2); // sqrt: a crowd of low scores stays readable
      const above = lo + ((b + 0.5) / BINS) * (1 - lo) > thr[i];
      g.append(svg("rect", { x: x0 + 0.5, y: h - bh, width: w / BINS - 1, height: bh,
        fill: above ? c.color : "#c5cbd3" }));
    });
    const x = ((thr[i] - lo) / (1 - lo)) * w;
    g.append(svg("line", { x1: x, x2: x, y1: 0, y2: h, stroke: "#1d232b", "stroke-width": 1 }));
    const title = svg("title");
    title.textContent = `${scores[i].length} boxes, scores ${fmt(lo)}–1`;
    g.append(title);
    return g;
  }
  function renderClasses() {
    const t = $("classes");
    const head = el("tr");
    const cols = ["class", "threshold", "", "boxes shown", "score histogram"];
    if (EVAL) cols.push("TP", "FP", "missed", "precision", "recall");
    for (const h of cols) head.append(el("th", { class: /boxes|TP|FP|missed|precision|recall/.test(h) ? "num" : "" }, h));
    t.append(head);
    C.forEach((c, i) => {
      const tr = el("tr", { "data-class": i });
      const name = el("td");
      name.append(el("span", { class: "swatch", style: `background:${c.color}` }), document.createTextNode(c.name));
      for (const uri of c.x || []) {  // the crops this class was shown by (exemplars)
        name.append(el("img", { class: "exemplar", src: uri, alt: `exemplar of ${c.name}`, title: "exemplar" }));
      }
      const slider = el("input", { type: "range", min: Math.floor(c.floor * 100) / 100, max: 1, step: 0.01,
        value: c.start, "data-class": i, id: `thr-${i}`, "aria-label": `threshold of ${c.name}` });
      slider.addEventListener("input", () => { thr[i] = Math.max(+slider.value, c.floor); schedule(); });
      const td = el("td");
      td.append(slider);
      tr.append(name, td, el("td", {}, ""), el("td", { class: "num" }), el("td"));
      if (EVAL) for (let k = 0; k < 5; k++) tr.append(el("td", { class: "num" }));
      t.append(tr);
    });
  }
  function updateClasses() {
    const rows = $("classes").querySelectorAll("tr[data-class]");
    rows.forEach((tr) => {
      const i = +tr.dataset.class, s = stats[i], cells = tr.children;
      cells[2].replaceChildren(el("span", { class: "thr" }, fmt(thr[i])));
      cells[3].textContent = `${s.kept} / ${scores[i].length}`;
      cells[3].dataset.kept = s.kept;
      cells[4].replaceChildren(histogram(i));
      if (EVAL) {
        const p = s.tp + s.fp ? s.tp / (s.tp + s.fp) : 0, r = s.gt ? s.tp / s.gt : 0;
        [s.tp, s.fp, s.missed, p.toFixed(3), r.toFixed(3)].forEach((v, k) => { cells[5 + k].textContent = v; });
      }
    });
    $("relabel-cmd").textContent = relabelCommand();
  }
  function relabelCommand() {
    const conf = C.map((c, i) => `${c.name}=${fmt(thr[i])}`).join(",");
    return `ovdet relabel ${shellQuote(D.run)} --conf ${shellQuote(conf)} --out ${shellQuote(D.run + "-relabel")}`;
  }
  function copyCommand() {
    const text = relabelCommand();
    const done = (ok) => { $("copied").textContent = ok ? "copied" : "select the command and copy it"; };
    const fallback = () => {
      const range = document.createRange();
      range.selectNodeContents($("relabel-cmd"));
      const sel = window.getSelection();
      sel.removeAllRanges();
      sel.addRange(range);
      let ok = false;
      try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
      done(ok);
    };
    if (navigator.clipboard && window.isSecureContext) navigator.clipboard.writeText(text).then(() => done(true), fallback);
    else fallback();
  }

  // ------------------------------------------------------------------ evaluation: AP, confusion, PR curves
  function renderEval() {
    if (!EVAL) return;
    $("eval-section").hidden = false;
    const E = D.eval, R = E.result || {};
    const masked = R.mask_map50 !== null && R.mask_map50 !== undefined;  // mask mAP: the run and the data had masks
    $("eval-summary").textContent = `mAP50 ${fixed3(R.map50)} · mAP50-95 ${fixed3(R.map50_95)} · ` +
      (masked ? `mask mAP50 ${fixed3(R.mask_map50)} · mask mAP50-95 ${fixed3(R.mask_map50_95)} · ` : "") +
      `${R.images || IMGS.length} images · ${R.instances || 0} objects` + (R.masks_note ? ` · masks: ${R.masks_note}` : "");
    const ap = $("ap-table");
    const head = el("tr");
    const cols = ["class", "objects", "AP50", "AP50-95", ...(masked ? ["mask AP50", "mask AP50-95"] : [])];
    for (const h of cols) head.append(el("th", { class: h === "class" ? "" : "num" }, h));
    ap.append(head);
    for (const c of R.classes || []) {
      const tr = el("tr");
      tr.append(el("td", {}, shown(c.name)), el("td", { class: "num" }, shown(c.instances)),
        el("td", { class: "num" }, fixed3(c.ap50)), el("td", { class: "num" }, fixed3(c.ap50_95)));
      if (masked) tr.append(el("td", { class: "num" }, c.mask_ap50 === null ? "–" : fixed3(c.mask_ap50)),
        el("td", { class: "num" }, c.mask_ap50_95 === null ? "–" : fixed3(c.mask_ap50_95)));
      ap.append(tr);
    }
    $("confusion-note").textContent = "Rows: ground truth, columns: predictions, at the thresholds the report " +
      `opened with (${C.map((c) => `${c.name} ${fmt(c.start)}`).join(", ")}), IoU ${E.iou}.`;
    const names = [...C.map((c) => c.name), "background"];
    const cm = $("confusion");
    const top = el("tr");
    top.append(el("th", {}, "truth \\ predicted"));
    for (const n of names) top.append(el("th", { class: "num" }, n));
    cm.append(top);
    const max = Math.max(1, ...E.confusion.flat());
    (E.confusion || []).forEach((row, r) => {
      const tr = el("tr");
      tr.append(el("th", {}, names[r]));
      row.forEach((v, k) => tr.append(el("td", { style: `background: rgba(47,111,222,${(0.75 * v) / max})` }, v)));
      cm.append(tr);
    });
    renderCurves();
  }
  function renderCurves() {
    if (!EVAL) return;
    const box = $("pr-curves");
    box.replaceChildren();
    const w = 220, h = 170, pad = 26;
    C.forEach((c, i) => {
      const pts = D.eval.pr[i] || [];
      const g = svg("svg", { width: w, height: h, viewBox: `0 0 ${w} ${h}`, class: "pr" });
      const X = (r) => pad + r * (w - pad - 6), Y = (p) => h - pad - p * (h - pad - 6);
      g.append(svg("rect", { x: X(0), y: Y(1), width: X(1) - X(0), height: Y(0) - Y(1), fill: "#f8fafc", stroke: "#dde1e6" }));
      for (const [t, x, y, a] of [["recall", w / 2, h - 6, "middle"], ["precision", 10, h / 2, "middle"]]) {
        const lbl = svg("text", { x, y, "font-size": 10, fill: "#67707c", "text-anchor": a,
          transform: t === "precision" ? `rotate(-90 ${x} ${y})` : "" });
        lbl.textContent = t;
        g.append(lbl);
      }
      if (pts.length) g.append(svg("polyline", { points: pts.map((p) => `${X(p[0])},${Y(p[1])}`).join(" "),
        fill: "none", stroke: c.color, "stroke-width": 2 }));
      const s = stats[i];
      if (s.gt) {
        const p = s.tp + s.fp ? s.tp / (s.tp + s.fp) : 1, r = s.tp / s.gt;
        g.append(svg("circle", { cx: X(r), cy: Y(p), r: 4, fill: "#1d232b" }));
      }
      const fig = el("figure");
      fig.append(g, el("figcaption", {}, `${c.name} (${s.gt} objects)`));
      box.append(fig);
    });
  }

  // ------------------------------------------------------------------ gallery
  function renderControls() {
    const f = $("filter");
    const opts = [["all", "all images"], ["boxes", "images with boxes"], ["empty", "images without boxes"]];
    C.forEach((c, i) => opts.push([`class:${i}`, `images with ${c.name} (only its boxes)`]));
    if (EVAL) opts.push(["fp", "images with false positives"], ["missed", "images with misses"]);
    for (const [v, t] of opts) f.append(el("option", { value: v }, t));
    const s = $("sort");
    const sorts = [["file", "file order"], ["uncertain", "most uncertain first (scores near the threshold)"],
      ["most", "most boxes first"], ["fewest", "fewest boxes first"]];
    if (EVAL) sorts.push(["fp", "most false positives first"], ["missed", "most missed first"]);
    for (const [v, t] of sorts) s.append(el("option", { value: v }, t));
    f.addEventListener("change", () => { S.filter = f.value; S.page = 0; schedule(); });
    s.addEventListener("change", () => { S.sort = s.value; S.page = 0; schedule(); });
    $("page-size").addEventListener("change", () => { S.size = +$("page-size").value; S.page = 0; schedule(); });
    const legend = $("legend");
    const keys = [["ground truth", "5 3", "#16a34a"], ["prediction", "none", "#e11d48"]];
    if (EVAL) for (const [label, dash, stroke] of keys) {
      const key = svg("svg", { width: 18, height: 10 });
      key.append(svg("rect", { x: 1, y: 1, width: 16, height: 8, fill: "none", stroke, "stroke-width": 2,
        "stroke-dasharray": dash }));
      const item = el("span", { class: "legend-item" });
      item.append(key, document.createTextNode(label));
      legend.append(item);
    }
    else for (const c of C) {
      const item = el("span", { class: "legend-item" });
      item.append(el("span", { class: "swatch", style: `background:${c.color}` }), document.createTextNode(c.name));
      legend.append(item);
    }
  }
  const onlyClass = () => (S.filter.startsWith("class:") ? +S.filter.slice(6) : -1);
  function buildView() {
    const only = onlyClass();
    const keep = (im) => {
      switch (S.filter) {
        case "all": return true;
        case "boxes": return im.d.some(kept);
        case "empty": return !im.d.some(kept);
        case "fp": return imageFp(im) > 0;
        case "missed": return imageMissed(im) > 0;
        default: return im.d.some((d) => d[0] === only && kept(d));
      }
    };
    let view = [];
    for (let i = 0; i < IMGS.length; i++) if (keep(IMGS[i])) view.push(i);
    const count = (im) => im.d.reduce((a, d) => a + (kept(d) && (only < 0 || d[0] === only) ? 1 : 0), 0);
    const by = (key, desc) => {
      const k = new Map(view.map((i) => [i, key(IMGS[i])]));
      view.sort((a, b) => (desc ? k.get(b) - k.get(a) : k.get(a) - k.get(b)) || a - b);
    };
    if (S.sort === "uncertain") by(uncertainty, false);
    else if (S.sort === "most") by(count, true);
    else if (S.sort === "fewest") by(count, false);
    else if (S.sort === "fp") by(imageFp, true);
    else if (S.sort === "missed") by(imageMissed, true);
    S.view = view;
    S.page = Math.min(S.page, Math.max(0, Math.ceil(view.length / S.size) - 1));
  }
  function overlay(im, fontScale) {
    const only = onlyClass();
    const g = svg("svg", { viewBox: `0 0 ${im.w} ${im.h}`, preserveAspectRatio: "none" });
    const fs = Math.max(im.w, im.h) / fontScale;
    if (EVAL) for (const b of im.g) {
      if (only >= 0 && b[0] !== only) continue;
      g.append(svg("rect", { class: "gt", x: b[1], y: b[2], width: b[3] - b[1], height: b[4] - b[2], "data-class": b[0] }));
    }
    im.d.forEach((d, j) => {
      if (!kept(d) || (only >= 0 && d[0] !== only)) return;
      const [c, s, x1, y1, x2, y2] = d;
      const color = EVAL ? "#e11d48" : C[c].color;
      const outline = im.p && Array.isArray(im.p[j]) ? im.p[j].map(Number) : [];
      if (outline.length >= 6 && outline.every(Number.isFinite)) {  // the detection's mask, filled under its box
        let path = "";
        for (let k = 0; k + 1 < outline.length; k += 2) path += `${k ? "L" : "M"}${outline[k]} ${outline[k + 1]}`;
        g.append(svg("path", { class: "mask", d: path + "Z", fill: color, "fill-opacity": 0.4, "data-class": c }));
      }
      g.append(svg("rect", { class: "det", x: x1, y: y1, width: x2 - x1, height: y2 - y1, stroke: color,
        "data-class": c, "data-score": s }));
      const text = `${C[c].name} ${s.toFixed(2)}`, tw = text.length * fs * 0.56, th = fs * 1.3;
      const lx = Math.max(0, Math.min(x1, im.w - tw)), ly = y1 - th >= 0 ? y1 - th : Math.min(y1, im.h - th);
      g.append(svg("rect", { class: "lblbg", x: lx, y: ly, width: tw, height: th, fill: color, opacity: 0.85 }));
      const t = svg("text", { class: "lbl", x: lx + fs * 0.15, y: ly + fs * 1.0, "font-size": fs });
      t.textContent = text;
      g.append(t);
    });
    return g;
  }
  function frame(im, src, fontScale) {
    const f = el("div", { class: "frame" });
    if (src === null) f.append(el("div", { class: "missing" }, "no thumbnail: the image could not be read"));
    else {
      f.append(el("img", { src, loading: "lazy", decoding: "async", alt: im.n, width: im.w, height: im.h }));
      f.append(overlay(im, fontScale));
    }
    return f;
  }
  function renderGallery() {
    const g = $("gallery");
    const start = S.page * S.size, items = S.view.slice(start, start + S.size);
    const cards = items.map((i) => {
      const im = IMGS[i];
      const card = el("div", { class: "card", "data-index": i });
      const n = im.d.filter((d) => kept(d)).length;
      const cap = el("div", { class: "cap" });
      cap.append(el("span", { class: "name", title: im.n }, im.n), el("span", {}, EVAL ?
        `${n} pred · ${imageFp(im)} FP · ${imageMissed(im)} missed` : `${n} box${n === 1 ? "" : "es"}`));
      card.append(frame(im, im.t === null && D.thumb_errors[im.k] ? null : im.t || im.f, 26), cap);
      card.addEventListener("click", () => openViewer(S.view.indexOf(i)));
      return card;
    });
    g.replaceChildren(...cards);
    const pages = Math.max(1, Math.ceil(S.view.length / S.size));
    for (const id of ["pager-top", "pager-bottom"]) {
      const p = $(id);
      const prev = el("button", { type: "button", class: "prev" }, "‹ previous");
      const next = el("button", { type: "button", class: "next" }, "next ›");
      prev.disabled = S.page === 0;
      next.disabled = S.page >= pages - 1;
      prev.addEventListener("click", () => { S.page--; render(); });
      next.addEventListener("click", () => { S.page++; render(); });
      p.replaceChildren(prev, el("span", {}, `page ${S.page + 1} of ${pages} · ${S.view.length} images`), next);
    }
  }

  // ------------------------------------------------------------------ full-image viewer
  function openViewer(pos) {
    if (pos < 0 || pos >= S.view.length) return;
    S.viewing = pos;
    const im = IMGS[S.view[pos]];
    $("viewer-name").textContent = `${im.n} (${im.w}×${im.h})`;
    $("viewer-stage").replaceChildren(frame(im, im.f, 55));
    $("viewer").hidden = false;
  }
  function closeViewer() { $("viewer").hidden = true; S.viewing = -1; }
  $("viewer-close").addEventListener("click", closeViewer);
  document.addEventListener("keydown", (e) => {
    if (S.viewing < 0) return;
    if (e.key === "Escape") closeViewer();
    else if (e.key === "ArrowRight") openViewer(S.viewing + 1);
    else if (e.key === "ArrowLeft") openViewer(S.viewing - 1);
  });

  // ------------------------------------------------------------------ one render per frame, whatever changed
  let pending = false, renders = 0;
  function render() {
    pending = false;
    renders++;
    if (window.ovdetReport) window.ovdetReport.renders = renders;
    stats = computeStats();
    buildView();
    renderHeader();
    updateClasses();
    renderGallery();
    renderCurves();
  }
  function schedule() { if (!pending) { pending = true; requestAnimationFrame(render); } }

  renderSettings();
  renderClasses();
  renderControls();
  $("copy").addEventListener("click", copyCommand);
  stats = computeStats();
  renderEval();
  render();
  window.ovdetReport = { ready: true, initMs: performance.now() - started, thresholds: thr, relabelCommand, renders };
})();
