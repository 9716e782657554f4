// SOAP demo page: plain browser JavaScript, no build step, no network access beyond this service.
// Flow: pick a model -> draw or upload -> POST classify (min-aux purification) -> show the result;
// optionally POST v1/attack (PGD on the undefended classifier) -> classify the adversarial image.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const INK = 280;          // drawing canvas size in CSS and canvas pixels
  const PEN = 22;           // stroke width on the 280 px canvas (about 2.2 px at 28 px, like MNIST strokes)
  const KEY_STEP = 10;      // keyboard pen movement in canvas pixels

  const state = {
    models: [],             // entries of GET v1/models
    info: null,             // GET v1/models/{name} of the selected model
    apiKey: "",
    current: null,          // {blob, url, name}: the image last classified (the attack starts from it)
    attack: {enabled: false, max_steps: 0, max_epsilon: 0, defaults: {}},
    busy: false,
    pen: {x: INK / 2, y: INK / 2, visible: false},
  };

  // ------------------------------------------------------------------ HTTP

  class ApiError extends Error {
    constructor(status, body) {
      super(`HTTP ${status}`);
      this.status = status;
      this.body = body;
    }
  }

  async function api(path, options = {}) {
    const headers = Object.assign({}, options.headers || {});
    if (state.apiKey) headers["X-API-Key"] = state.apiKey;
    const response = await fetch(path, Object.assign({}, options, {headers}));
    const text = await response.text();
    let body = null;
    try { body = text ? JSON.parse(text) : null; } catch (_) { body = {error: text.slice(0, 300)}; }
    if (!response.ok) throw new ApiError(response.status, body);
    return body;
  }

  const STATUS_WORDS = {
    400: "The request was not understood",
    401: "This service needs an API key (enter it under Model)",
    403: "This is switched off on the server",
    404: "Not found",
    413: "The file is too large for this service",
    415: "This kind of file is not supported",
    422: "The service could not use this input",
    429: "Too many requests; try again in a moment",
    500: "The service failed on this request",
    503: "The service is busy or shutting down; try again in a moment",
    504: "The service took too long to start on this request; try again",
  };

  function detailText(detail) {
    if (detail == null || detail === "") return "";
    if (typeof detail === "string") return detail;
    if (Array.isArray(detail)) {
      return detail.map((d) => (d && d.msg ? `${(d.loc || []).join(".")}: ${d.msg}` : JSON.stringify(d))).join("; ");
    }
    return JSON.stringify(detail);
  }

  /** A sentence a person can read, from whatever went wrong. */
  function describeError(err) {
    if (err instanceof ApiError) {
      const words = STATUS_WORDS[err.status] || "The request failed";
      const body = err.body || {};
      // The human-readable detail when there is one; the machine code (e.g. bad_image) only as a fallback.
      const text = detailText(body.detail) || (body.error ? String(body.error).replace(/_/g, " ") : "");
      return `${words} (HTTP ${err.status})${text ? ": " + text : "."}`;
    }
    if (err instanceof TypeError) return "Could not reach the service. Is it still running?";
    return String(err && err.message ? err.message : err);
  }

  // ------------------------------------------------------------------ status and errors

  function setStatus(text) { $("status").textContent = text; }

  function showError(err) {
    const box = $("error");
    box.textContent = typeof err === "string" ? err : describeError(err);
    box.hidden = false;
    setStatus("Something went wrong — see the message below.");
  }

  function clearError() {
    $("error").hidden = true;
    $("error").textContent = "";
  }

  function setBusy(busy) {
    state.busy = busy;
    for (const id of ["classify-drawing", "file"]) $(id).disabled = busy;
    $("certify").disabled = busy || !state.current;
    updateAttackButton();
  }

  // ------------------------------------------------------------------ models

  function selectedModel() {
    return state.models.find((m) => m.name === $("model").value) || null;
  }

  function inputShape() {
    const src = state.info || selectedModel() || {};
    return src.input_shape || [1, 28, 28];
  }

  function isDrawable() {
    const src = state.info || selectedModel() || {};
    return (src.dataset === "mnist") || inputShape()[0] === 1;
  }

  function budgets() {
    const p = (state.info && state.info.purifier) || {};
    if (p.budget_step == null || p.num_budgets == null) return null;
    return Array.from({length: p.num_budgets}, (_, e) => e * p.budget_step);
  }

  function suspiciousThreshold() {
    const c = state.info && state.info.calibration;
    if (!c) return null;
    if (c.suspicious_threshold != null) return c.suspicious_threshold;
    const q = c.aux_loss_quantiles && c.aux_loss_quantiles[c.suspicious_quantile];
    return q == null ? null : q;
  }

  async function loadModels() {
    let body;
    try {
      body = await api("v1/models");
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) $("api-key-row").hidden = false;
      showError(err);
      return;
    }
    const list = Array.isArray(body) ? body : (body.models || []);
    state.models = list;
    const select = $("model");
    select.innerHTML = "";
    for (const m of list) {
      const opt = document.createElement("option");
      opt.value = m.name;
      opt.textContent = `${m.name}${m.dataset ? ` (${m.dataset})` : ""}`;
      select.appendChild(opt);
    }
    const preferred = list.find((m) => m.default) || list[0];
    if (preferred) select.value = preferred.name;
    select.disabled = list.length === 0;
    if (!list.length) { showError("The service has no models loaded."); return; }
    clearError();
    await onModelChange();
  }

  async function onModelChange() {
    const name = $("model").value;
    state.info = null;
    try {
      state.info = await api(`v1/models/${encodeURIComponent(name)}`);
    } catch (err) {
      showError(err);
    }
    const info = state.info || selectedModel() || {};
    const shape = inputShape();
    const parts = [
      info.dataset && `dataset ${info.dataset}`,
      `input ${shape.join("×")}`,
      info.aux_task && `auxiliary task: ${info.aux_task}`,
      info.class_names && `${info.class_names.length} classes`,
    ].filter(Boolean);
    const p = info.purifier;
    if (info.aux_head_trained === false) parts.push("no purification: its auxiliary head was not trained (mode none)");
    else if (p) parts.push(`purifier: ${p.steps} steps of ${fmt(p.step_size)}, ε ∈ {0, ${fmt(p.budget_step)}, …, ${fmt((p.num_budgets - 1) * p.budget_step)}}`);
    $("model-info").textContent = parts.join(" · ");
    showRobustness(info);
    $("draw-panel").hidden = !isDrawable();
    applyAttackDefaults();
    if (state.current) await classifyCurrent();
    else setStatus(isDrawable() ? "Draw a digit or upload an image." : "Upload an image.");
  }

  // The robustness truth next to the purification: what it resists, what it does not, where the numbers are.
  function showRobustness(info) {
    const r = info.robustness;
    const box = $("model-robustness");
    box.textContent = "";
    if (!r) return;
    const what = document.createElement("strong");
    what.textContent = "What it defends against: ";
    box.append(what);
    if (r.resists) box.append(`Resists: ${r.resists}. `);
    box.append(`Does not resist: ${r.does_not_resist}. `);
    const card = document.createElement("a");
    card.id = "model-robustness-card";
    card.href = r.model_card.replace(/^\//, "");  // relative, so the page works behind a path prefix
    card.textContent = "model card";
    box.append("Measured accuracies: ", card, ` and ${r.results} in the repository.`);
  }

  // ------------------------------------------------------------------ drawing

  const view = $("draw");
  const viewCtx = view.getContext("2d");
  const ink = document.createElement("canvas");
  ink.width = ink.height = INK;
  const inkCtx = ink.getContext("2d");

  function clearInk() {
    inkCtx.fillStyle = "#000";
    inkCtx.fillRect(0, 0, INK, INK);
    render();
  }

  function render() {
    viewCtx.drawImage(ink, 0, 0);
    if (state.pen.visible) {
      viewCtx.strokeStyle = "#ff9f1c";
      viewCtx.lineWidth = 2;
      viewCtx.beginPath();
      viewCtx.arc(state.pen.x, state.pen.y, PEN / 2, 0, 2 * Math.PI);
      viewCtx.stroke();
    }
  }

  function strokeTo(x0, y0, x1, y1) {
    inkCtx.strokeStyle = "#fff";
    inkCtx.lineWidth = PEN;
    inkCtx.lineCap = "round";
    inkCtx.lineJoin = "round";
    inkCtx.beginPath();
    inkCtx.moveTo(x0, y0);
    inkCtx.lineTo(x1, y1);
    inkCtx.stroke();
  }

  function canvasPoint(ev) {
    const r = view.getBoundingClientRect();
    return {x: (ev.clientX - r.left) * (INK / r.width), y: (ev.clientY - r.top) * (INK / r.height)};
  }

  let last = null;
  view.addEventListener("pointerdown", (ev) => {
    ev.preventDefault();
    view.setPointerCapture(ev.pointerId);
    last = canvasPoint(ev);
    strokeTo(last.x, last.y, last.x, last.y);
    render();
  });
  view.addEventListener("pointermove", (ev) => {
    if (!last) return;
    const p = canvasPoint(ev);
    strokeTo(last.x, last.y, p.x, p.y);
    last = p;
    render();
  });
  const endStroke = () => { last = null; };
  view.addEventListener("pointerup", endStroke);
  view.addEventListener("pointercancel", endStroke);

  // Keyboard drawing: arrows move the pen, Shift+arrows draw, Delete clears, Enter classifies.
  view.addEventListener("focus", () => { state.pen.visible = true; render(); });
  view.addEventListener("blur", () => { state.pen.visible = false; render(); });
  view.addEventListener("keydown", (ev) => {
    const moves = {ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1]};
    if (moves[ev.key]) {
      ev.preventDefault();
      const [dx, dy] = moves[ev.key];
      const from = {x: state.pen.x, y: state.pen.y};
      state.pen.x = Math.min(INK - PEN / 2, Math.max(PEN / 2, from.x + dx * KEY_STEP));
      state.pen.y = Math.min(INK - PEN / 2, Math.max(PEN / 2, from.y + dy * KEY_STEP));
      if (ev.shiftKey) strokeTo(from.x, from.y, state.pen.x, state.pen.y);
      render();
    } else if (ev.key === "Delete" || ev.key === "Backspace") {
      ev.preventDefault();
      clearInk();
    } else if (ev.key === "Enter") {
      ev.preventDefault();
      classifyDrawing();
    }
  });

  /** Downscale with repeated halving so thin strokes are averaged, not aliased. */
  function scaled(src, sx, sy, sw, sh, dw, dh) {
    let canvas = document.createElement("canvas");
    canvas.width = sw;
    canvas.height = sh;
    canvas.getContext("2d").drawImage(src, sx, sy, sw, sh, 0, 0, sw, sh);
    while (canvas.width / 2 > dw && canvas.height / 2 > dh) {
      const half = document.createElement("canvas");
      half.width = Math.ceil(canvas.width / 2);
      half.height = Math.ceil(canvas.height / 2);
      const c = half.getContext("2d");
      c.imageSmoothingQuality = "high";
      c.drawImage(canvas, 0, 0, half.width, half.height);
      canvas = half;
    }
    const out = document.createElement("canvas");
    out.width = dw;
    out.height = dh;
    const c = out.getContext("2d");
    c.imageSmoothingQuality = "high";
    c.drawImage(canvas, 0, 0, dw, dh);
    return out;
  }

  /** MNIST-style preprocessing: crop to the ink, fit into a 20/28 box, centre by mass in H×W. */
  function drawingToCanvas(h, w) {
    const data = inkCtx.getImageData(0, 0, INK, INK).data;
    let x0 = INK, y0 = INK, x1 = -1, y1 = -1;
    for (let y = 0; y < INK; y++) {
      for (let x = 0; x < INK; x++) {
        if (data[(y * INK + x) * 4] > 16) {
          if (x < x0) x0 = x;
          if (x > x1) x1 = x;
          if (y < y0) y0 = y;
          if (y > y1) y1 = y;
        }
      }
    }
    if (x1 < 0) return null;
    const bw = x1 - x0 + 1, bh = y1 - y0 + 1;
    const box = Math.max(1, Math.round(Math.min(h, w) * 20 / 28));
    const scale = box / Math.max(bw, bh);
    const sw = Math.max(1, Math.round(bw * scale)), sh = Math.max(1, Math.round(bh * scale));
    const digit = scaled(ink, x0, y0, bw, bh, sw, sh);
    const px = digit.getContext("2d").getImageData(0, 0, sw, sh).data;
    let mass = 0, mx = 0, my = 0;
    for (let y = 0; y < sh; y++) {
      for (let x = 0; x < sw; x++) {
        const v = px[(y * sw + x) * 4];
        mass += v; mx += v * (x + 0.5); my += v * (y + 0.5);
      }
    }
    const cx = mass ? mx / mass : sw / 2, cy = mass ? my / mass : sh / 2;
    const left = Math.min(w - sw, Math.max(0, Math.round(w / 2 - cx)));
    const top = Math.min(h - sh, Math.max(0, Math.round(h / 2 - cy)));
    const out = document.createElement("canvas");
    out.width = w;
    out.height = h;
    const c = out.getContext("2d");
    c.fillStyle = "#000";
    c.fillRect(0, 0, w, h);
    c.drawImage(digit, left, top);
    return out;
  }

  function canvasToBlob(canvas) {
    return new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
  }

  async function classifyDrawing() {
    if (state.busy) return;
    const [, h, w] = inputShape();
    const canvas = drawingToCanvas(h, w);
    if (!canvas) { showError("The canvas is empty: draw a digit first."); return; }
    const blob = await canvasToBlob(canvas);
    setCurrent(blob, "drawing.png");
    await classifyCurrent();
  }

  // ------------------------------------------------------------------ upload

  function setCurrent(blob, name) {
    if (state.current && state.current.url) URL.revokeObjectURL(state.current.url);
    state.current = {blob, name, url: URL.createObjectURL(blob)};
  }

  async function useFile(file) {
    if (!file || state.busy) return;
    setCurrent(file, file.name || "upload");
    await classifyCurrent();
  }

  $("file").addEventListener("change", (ev) => useFile(ev.target.files[0]));
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (ev) => { ev.preventDefault(); zone.classList.add("dragging"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (ev) => {
    ev.preventDefault();
    zone.classList.remove("dragging");
    if (ev.dataTransfer && ev.dataTransfer.files.length) useFile(ev.dataTransfer.files[0]);
  });

  // ------------------------------------------------------------------ classify and show

  function topK() {
    const n = (state.info && state.info.class_names && state.info.class_names.length) || 10;
    return Math.min(n, 10);
  }

  async function classify(blob, name) {
    const form = new FormData();
    form.append("file", blob, name);
    const params = new URLSearchParams({
      model: $("model").value, top_k: String(topK()), return_purified: "true", return_curve: "true",
    });
    const body = await api(`classify?${params}`, {method: "POST", body: form});
    return body;
  }

  async function classifyCurrent() {
    if (!state.current) return;
    clearError();
    setBusy(true);
    setStatus("Purifying and classifying…");
    try {
      const body = await classify(state.current.blob, state.current.name);
      showResult(body, {inputUrl: state.current.url});
    } catch (err) {
      $("result").hidden = true;
      showError(err);
    } finally {
      setBusy(false);
    }
  }

  /** mode=certify: the smoothed prediction of the current image with its certified L2 radius. */
  async function certifyCurrent() {
    if (!state.current) return;
    clearError();
    setBusy(true);
    setStatus("Certifying (randomized smoothing)…");
    const out = $("certificate");
    try {
      const form = new FormData();
      form.append("file", state.current.blob, state.current.name);
      const params = new URLSearchParams({
        model: $("model").value, mode: "certify", samples: String($("certify-samples").value || 10000),
      });
      const body = await api(`classify?${params}`, {method: "POST", body: form});
      const c = body.results[0];
      const t = body.timing_ms || {};
      out.textContent = c.abstained
        ? `Abstained: the noisy votes do not single out a class with confidence 1 − α = ${1 - c.alpha} ` +
          `(p_lower = ${fmt(c.p_lower, 4)} ≤ 0.5, σ = ${c.sigma}, ${c.samples} forward passes). No certificate.`
        : `Smoothed prediction ${labelText(c.label, c.class_name)}, certified L2 radius ${fmt(c.certified_radius, 3)} ` +
          `(pixels in [0, 1]; σ = ${c.sigma}, p_lower = ${fmt(c.p_lower, 4)}, α = ${c.alpha}, ` +
          `${c.samples} forward passes, seed ${c.seed}; compute ${fmt(t.compute, 0)} ms).`;
      $("certificate-panel").hidden = false;
      setStatus(c.abstained ? "Certify: abstained." : `Certified: ${labelText(c.label, c.class_name)} within L2 ${fmt(c.certified_radius, 3)}.`);
    } catch (err) {
      $("certificate-panel").hidden = true;
      showError(err);
    } finally {
      setBusy(false);
    }
  }

  function fmt(v, digits = 3) {
    if (v == null || Number.isNaN(v)) return "—";
    const a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e4)) return v.toExponential(2);
    return Number(v.toFixed(digits)).toString();
  }

  /** " (= k/255)" for a budget on the 8-bit grid of a colour model (how CIFAR budgets are usually quoted). */
  function in255(v) {
    const k = v * 255;
    return !isDrawable() && v > 0 && Math.abs(k - Math.round(k)) < 1e-3 ? ` (= ${Math.round(k)}/255)` : "";
  }

  function fmtLoss(v) {
    if (v == null) return "—";
    const a = Math.abs(v);
    return a !== 0 && (a < 1e-3 || a >= 1e5) ? Number(v).toExponential(3) : Number(v).toPrecision(4);
  }

  function labelText(label, className) {
    return className != null && String(className) !== String(label) ? `${className} (class ${label})` : String(label);
  }

  function showResult(body, {inputUrl, attack = null, adversarialUrl = null}) {
    const r = body.results[0];
    $("certificate-panel").hidden = true;  // a certificate belongs to the image it was made for
    $("pred-label").textContent = labelText(r.label, r.class_name);
    $("pred-confidence").textContent = `with probability ${(100 * r.confidence).toFixed(1)} %`;
    $("pred-eps").textContent = fmt(r.epsilon);
    $("pred-eps-255").textContent = in255(r.epsilon);
    $("pred-aux-before").textContent = fmtLoss(r.aux_loss_before);
    $("pred-aux-after").textContent = fmtLoss(r.aux_loss);
    const thr = suspiciousThreshold();
    const sus = $("pred-suspicious");
    sus.textContent = r.suspicious
      ? `yes (aux loss before > ${fmtLoss(thr)}, the clean-data threshold)`
      : (thr != null ? `no (threshold ${fmtLoss(thr)})` : "no (this model has no calibration, so nothing is flagged)");
    sus.className = r.suspicious ? "suspicious-yes" : "suspicious-no";

    $("img-input").src = inputUrl;
    $("fig-adversarial").hidden = !adversarialUrl;
    if (adversarialUrl) $("img-adversarial").src = adversarialUrl;
    if (r.purified_png) $("img-purified").src = `data:image/png;base64,${r.purified_png}`;

    renderBars(r);
    renderCurve(r);
    const t = body.timing_ms || {};
    $("timing").textContent = `Request ${body.request_id || ""} · model ${body.model || ""} · queue ${fmt(t.queue, 1)} ms · compute ${fmt(t.compute, 1)} ms · total ${fmt(t.total, 1)} ms`;

    const summary = $("attack-summary");
    summary.hidden = !attack;
    if (attack) {
      summary.textContent = `PGD attack (ε = ${fmt(attack.epsilon)}, ${attack.steps} steps of ${fmt(attack.step_size)}): ` +
        `the undefended classifier says ${labelText(attack.clean_label, attack.clean_class_name)} on the input and ` +
        `${labelText(attack.adversarial_label, attack.adversarial_class_name)} on the adversarial image ` +
        `(${attack.adversarial_label === attack.clean_label ? "the attack failed" : "the attack succeeded"}). ` +
        `After purification the service says ${labelText(r.label, r.class_name)}.`;
    }
    $("result").hidden = false;
    setStatus(`${attack ? "Attacked, purified and classified" : "Classified"}: ${labelText(r.label, r.class_name)}, ` +
      `ε = ${fmt(r.epsilon)}, aux loss ${fmtLoss(r.aux_loss_before)} → ${fmtLoss(r.aux_loss)}` +
      `${r.suspicious ? ", suspicious" : ""}.`);
  }

  function renderBars(r) {
    const list = $("bars");
    list.innerHTML = "";
    const items = r.top_k || [];
    $("top-k").textContent = String(items.length);
    items.forEach((item, i) => {
      const li = document.createElement("li");
      if (i === 0) li.className = "top";
      const pct = (100 * item.probability).toFixed(1);
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = item.class_name != null ? String(item.class_name) : String(item.label);
      name.title = labelText(item.label, item.class_name);
      const track = document.createElement("span");
      track.className = "track";
      track.setAttribute("aria-hidden", "true");
      const fill = document.createElement("span");
      fill.className = "fill";
      fill.style.display = "block";
      fill.style.width = `${Math.max(0, Math.min(100, 100 * item.probability))}%`;
      track.appendChild(fill);
      const value = document.createElement("span");
      value.className = "pct";
      value.textContent = `${pct} %`;
      li.append(name, track, value);
      list.appendChild(li);
    });
  }

  const SVG = "http://www.w3.org/2000/svg";
  function svg(tag, attrs, text) {
    const el = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
    if (text != null) el.textContent = text;
    return el;
  }

  /** Aux loss at every budget (return_curve) as an inline SVG line chart, the chosen ε marked. */
  function renderCurve(r) {
    const box = $("curve");
    box.innerHTML = "";
    const curve = r.aux_curve;
    if (!curve || !curve.length) {
      $("curve-text").textContent = "The service returned no curve for this image.";
      return;
    }
    const xs = budgets() && budgets().length === curve.length ? budgets() : curve.map((_, i) => i);
    const W = 420, H = 250, L = 62, R = 14, T = 14, B = 40;
    const thr = suspiciousThreshold();
    let lo = Math.min(...curve), hi = Math.max(...curve);
    if (thr != null && thr <= hi * 1.5 && thr >= lo / 1.5) { lo = Math.min(lo, thr); hi = Math.max(hi, thr); }
    if (hi - lo < 1e-12) { hi += Math.abs(hi) * 0.1 + 1e-6; lo -= Math.abs(lo) * 0.1 + 1e-6; }
    const pad = (hi - lo) * 0.08;
    lo -= pad; hi += pad;
    const xMax = xs[xs.length - 1] || 1;
    const X = (v) => L + (W - L - R) * (v / xMax);
    const Y = (v) => T + (H - T - B) * (1 - (v - lo) / (hi - lo));

    const chosen = curve.findIndex((_, i) => Math.abs(xs[i] - r.epsilon) < 1e-6);
    const root = svg("svg", {viewBox: `0 0 ${W} ${H}`, role: "img",
      "aria-label": `Auxiliary loss from ${fmtLoss(curve[0])} at ε = 0 to ${fmtLoss(curve[curve.length - 1])} at ε = ${fmt(xMax)}; chosen ε = ${fmt(r.epsilon)} with loss ${fmtLoss(r.aux_loss)}.`});
    root.appendChild(svg("line", {class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B}));
    root.appendChild(svg("line", {class: "axis", x1: L, y1: T, x2: L, y2: H - B}));
    for (let i = 0; i <= 4; i++) {
      const v = lo + (hi - lo) * i / 4;
      root.appendChild(svg("line", {class: "axis", x1: L - 4, y1: Y(v), x2: L, y2: Y(v)}));
      root.appendChild(svg("text", {x: L - 6, y: Y(v) + 4, "text-anchor": "end"}, Number(v).toPrecision(3)));
    }
    const every = Math.ceil(xs.length / 6);
    xs.forEach((v, i) => {
      if (i % every !== 0 && i !== xs.length - 1) return;
      root.appendChild(svg("line", {class: "axis", x1: X(v), y1: H - B, x2: X(v), y2: H - B + 4}));
      root.appendChild(svg("text", {x: X(v), y: H - B + 16, "text-anchor": "middle"}, fmt(v)));
    });
    root.appendChild(svg("text", {x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle"}, "purification budget ε (L∞)"));
    root.appendChild(svg("text", {x: 12, y: (T + H - B) / 2, "text-anchor": "middle",
      transform: `rotate(-90 12 ${(T + H - B) / 2})`}, "auxiliary loss"));
    if (thr != null && thr >= lo && thr <= hi) {
      root.appendChild(svg("line", {class: "threshold", x1: L, y1: Y(thr), x2: W - R, y2: Y(thr)}));
      root.appendChild(svg("text", {x: W - R - 2, y: Y(thr) - 4, "text-anchor": "end"}, "suspicious threshold"));
    }
    if (chosen >= 0) {
      root.appendChild(svg("line", {class: "chosen", x1: X(xs[chosen]), y1: T, x2: X(xs[chosen]), y2: H - B}));
    }
    root.appendChild(svg("polyline", {class: "line", points: curve.map((v, i) => `${X(xs[i])},${Y(v)}`).join(" ")}));
    curve.forEach((v, i) => {
      const dot = svg("circle", {class: i === chosen ? "chosen-point" : "point", cx: X(xs[i]), cy: Y(v), r: i === chosen ? 5 : 2.5});
      dot.appendChild(svg("title", {}, `ε = ${fmt(xs[i])}: aux loss ${fmtLoss(v)}`));
      root.appendChild(dot);
    });
    if (chosen >= 0) {
      const right = X(xs[chosen]) > W - 120;
      root.appendChild(svg("text", {x: X(xs[chosen]) + (right ? -6 : 6), y: T + 12, "text-anchor": right ? "end" : "start",
        class: "chosen-label"}, `chosen ε = ${fmt(r.epsilon)}`));
    }
    box.appendChild(root);
    $("curve-text").textContent = `Lowest auxiliary loss ${fmtLoss(r.aux_loss)} at ε = ${fmt(r.epsilon)} ` +
      `(loss ${fmtLoss(curve[0])} without purification); min-aux keeps the smallest ε reaching the lowest loss.`;
  }

  // ------------------------------------------------------------------ attack

  function updateAttackButton() {
    $("attack").disabled = state.busy || !state.attack.enabled || !state.current;
  }

  function applyAttackDefaults() {
    const d = state.attack.defaults && state.attack.defaults[$("model").value];
    if (d) {
      $("attack-eps").value = String(Number(d.epsilon.toFixed(4)));
      $("attack-steps").value = String(d.steps);
      $("attack-step-size").value = String(Number(d.step_size.toFixed(4)));
    }
    if (state.attack.max_steps) $("attack-steps").max = String(state.attack.max_steps);
    if (state.attack.max_epsilon) $("attack-eps").max = String(state.attack.max_epsilon);
    updateAttackButton();
  }

  async function loadAttackSettings() {
    try {
      state.attack = await api("v1/attack");
    } catch (err) {
      state.attack = {enabled: false};
    }
    $("attack-note").textContent = state.attack.enabled
      ? `The attack endpoint is on (at most ${state.attack.max_steps} steps and ε ≤ ${fmt(state.attack.max_epsilon)}). ` +
        "It attacks the image last classified."
      : "The attack endpoint is switched off on this server (it costs compute and hands out adversarial " +
        "examples, so it is off by default, `make run` included). Start the service with --enable-attack, or " +
        "run SOAP_ENABLE_ATTACK=1 make run, to use it.";
    applyAttackDefaults();
  }

  function base64ToBlob(b64, type) {
    const bytes = atob(b64);
    const arr = new Uint8Array(bytes.length);
    for (let i = 0; i < bytes.length; i++) arr[i] = bytes.charCodeAt(i);
    return new Blob([arr], {type});
  }

  async function attack() {
    if (!state.current || state.busy) return;
    clearError();
    setBusy(true);
    setStatus("Attacking the undefended classifier with PGD…");
    try {
      const form = new FormData();
      form.append("file", state.current.blob, state.current.name);
      const params = new URLSearchParams({
        model: $("model").value,
        epsilon: $("attack-eps").value,
        steps: $("attack-steps").value,
        step_size: $("attack-step-size").value,
      });
      const adv = await api(`v1/attack?${params}`, {method: "POST", body: form});
      const blob = base64ToBlob(adv.adversarial_png, "image/png");
      setStatus("Purifying and classifying the adversarial image…");
      const body = await classify(blob, "adversarial.png");
      showResult(body, {inputUrl: state.current.url, attack: adv, adversarialUrl: URL.createObjectURL(blob)});
    } catch (err) {
      showError(err);
    } finally {
      setBusy(false);
    }
  }

  // ------------------------------------------------------------------ wiring

  $("model").addEventListener("change", onModelChange);
  $("classify-drawing").addEventListener("click", classifyDrawing);
  $("clear-drawing").addEventListener("click", () => { clearInk(); view.focus(); });
  $("attack").addEventListener("click", attack);
  $("certify").addEventListener("click", certifyCurrent);
  $("api-key-apply").addEventListener("click", () => {
    state.apiKey = $("api-key").value.trim();
    loadAttackSettings();
    loadModels();
  });

  clearInk();
  Promise.all([loadAttackSettings(), loadModels()]).then(() => { document.body.dataset.ready = "true"; });
})();
