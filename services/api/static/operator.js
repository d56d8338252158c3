// The operators' page: polls /operator/data and redraws. Plain DOM and SVG, no build step, no outside requests.
// Every string from the data is set as text (textContent / SVG text nodes), never parsed as HTML.
"use strict";

(function () {
  const KEY_STORE = "flywheel-operator-key";
  const SVG_NS = "http://www.w3.org/2000/svg";
  const COLORS = { rules: "#e8590c", model: "#1971c2" };
  const RULES_COLLAPSED = 40;

  let pollMs = 3000;
  let timer = null;
  let renders = 0;
  let showAllRules = false;
  let last = null;

  const $ = (id) => document.getElementById(id);

  // ------------------------------------------------------------------------------------------ key handling
  function keyFromFragment() {
    // /operator#key=... (for automation): a fragment is never sent to the server; drop it from the address bar.
    const m = /(?:^#|&)key=([^&]*)/.exec(location.hash);
    if (m) {
      sessionStorage.setItem(KEY_STORE, decodeURIComponent(m[1]));
      history.replaceState(null, "", location.pathname + location.search);
    }
  }

  function askKey(message) {
    $("main").hidden = true;
    $("forget-key").hidden = true;
    $("key-form").hidden = false;
    $("key-error").textContent = message || "";
    $("key-input").focus();
    document.body.dataset.state = "key";
    setStatus("no key", false);
  }

  function setStatus(text, isError) {
    const s = $("status");
    s.textContent = text;
    s.classList.toggle("error", !!isError);
  }

  // ------------------------------------------------------------------------------------------ polling
  let inflight = false;
  let again = false;

  async function poll() {
    clearTimeout(timer);
    timer = null;
    if (inflight) { again = true; return; } // the running poll polls again when done
    inflight = true;
    let next = true;
    try {
      next = await fetchAndRender();
    } finally {
      inflight = false;
    }
    if (again) { again = false; poll(); return; }
    if (next) timer = setTimeout(poll, pollMs);
  }

  // One poll: false when there is no (valid) key, so polling stops until one is given.
  async function fetchAndRender() {
    const key = sessionStorage.getItem(KEY_STORE);
    if (!key) {
      askKey("");
      return false;
    }
    try {
      const r = await fetch("/operator/data", {
        headers: { "X-API-Key": key, "Accept": "application/json" },
        cache: "no-store",
        credentials: "omit",
      });
      if (r.status === 401 || r.status === 403) {
        let detail = "";
        try { detail = (await r.json()).detail || ""; } catch (e) { detail = ""; }
        sessionStorage.removeItem(KEY_STORE);
        askKey(String(detail || ("refused (" + r.status + ")")));
        return false;
      }
      if (!r.ok) throw new Error("HTTP " + r.status);
      const data = await r.json();
      if (data.error) throw new Error(String(data.error));
      if (data.poll_s) pollMs = Math.max(1000, data.poll_s * 1000);
      last = data;
    } catch (e) {
      setStatus("cannot read /operator/data: " + e.message + " (retrying)", true);
      return true;
    }
    try {
      render(last);
      setStatus("updated " + fmtClock(last.at_ms) + " · every " + Math.round(pollMs / 1000) + " s", false);
    } catch (e) {
      console.error("operator page: drawing failed:", e); // a bug of this page: tests fail on console errors
      setStatus("drawing failed: " + e.message, true);
    }
    return true;
  }

  // ------------------------------------------------------------------------------------------ formatting
  const pct = (v, d) => (v === null || v === undefined || !isFinite(v)) ? "–" : (100 * v).toFixed(d === undefined ? 1 : d) + "%";
  const num = (v, d) => (v === null || v === undefined || !isFinite(v)) ? "–" : Number(v).toFixed(d === undefined ? 3 : d);
  const int = (v) => (v === null || v === undefined || !isFinite(v)) ? "–" : Math.round(v).toLocaleString("en");
  const pad = (n) => String(n).padStart(2, "0");

  function fmtClock(ms) {
    if (!ms) return "–";
    const d = new Date(ms);
    return pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds());
  }
  function fmtWhen(iso) {
    if (!iso) return "–";
    const d = new Date(iso);
    if (isNaN(d.getTime())) return String(iso);
    return d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " + fmtClock(d.getTime());
  }
  function ago(iso, nowMs) {
    const t = new Date(iso).getTime();
    if (!iso || isNaN(t)) return "";
    const s = Math.max(0, (nowMs - t) / 1000);
    if (s < 90) return Math.round(s) + " s ago";
    if (s < 5400) return Math.round(s / 60) + " min ago";
    if (s < 172800) return (s / 3600).toFixed(1) + " h ago";
    return Math.round(s / 86400) + " days ago";
  }
  function shortVersion(v) {
    // 20261201T190856218155Z-linear-681e08 -> 190856-linear-681e08
    if (!v) return "–";
    const m = /^\d{8}T(\d{6})\d*Z-(.*)$/.exec(v);
    return m ? m[1] + "-" + m[2] : String(v);
  }
  function composition(c) {
    if (!c || typeof c !== "object") return "–";
    return Object.keys(c).map((src) => {
      const g = c[src];
      if (!g || typeof g !== "object") return src + " " + g;
      return src + ": " + Object.keys(g).map((k) => k + " " + g[k]).join(", ");
    }).join("; ");
  }

  // ------------------------------------------------------------------------------------------ DOM helpers
  function el(tag, opts, text) {
    const e = document.createElement(tag);
    if (opts) {
      if (opts.cls) e.className = opts.cls;
      if (opts.title) e.title = opts.title;
    }
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function cell(spec) {
    if (spec === null || spec === undefined) return el("td", null, "–");
    if (typeof spec !== "object") return el("td", null, spec);
    const td = el("td", { cls: spec.cls, title: spec.title });
    if (spec.badge) td.appendChild(el("span", { cls: "badge " + spec.badge }, spec.text));
    else td.textContent = spec.text === null || spec.text === undefined ? "–" : String(spec.text);
    return td;
  }
  function fillTable(table, headers, rows, numeric) {
    table.replaceChildren();
    const thead = el("thead");
    const hr = el("tr");
    headers.forEach((h, i) => hr.appendChild(el("th", { cls: numeric && numeric.includes(i) ? "num" : "" }, h)));
    thead.appendChild(hr);
    const tbody = el("tbody");
    if (!rows.length) {
      const tr = el("tr");
      const td = el("td", { cls: "dim" }, "nothing yet");
      td.colSpan = headers.length;
      tr.appendChild(td);
      tbody.appendChild(tr);
    }
    rows.forEach((r) => {
      const tr = el("tr", { cls: r.cls || "" });
      (r.cells || r).forEach((c, i) => {
        const td = cell(c);
        if (numeric && numeric.includes(i)) td.classList.add("num");
        tr.appendChild(td);
      });
      tbody.appendChild(tr);
    });
    table.appendChild(thead);
    table.appendChild(tbody);
  }
  function dl(target, pairs) {
    target.replaceChildren();
    pairs.forEach(([k, v, title]) => {
      target.appendChild(el("dt", null, k));
      target.appendChild(el("dd", { title: title }, v === null || v === undefined || v === "" ? "–" : v));
    });
  }

  // ------------------------------------------------------------------------------------------ charts
  function sv(tag, attrs, text) {
    const e = document.createElementNS(SVG_NS, tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = String(text);
    return e;
  }

  function niceStep(span, target) {
    const raw = span / Math.max(1, target);
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    for (const m of [1, 2, 5, 10]) if (m * mag >= raw) return m * mag;
    return 10 * mag;
  }
  const TIME_STEPS = [1, 5, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400, 172800, 604800]
    .map((s) => s * 1000);

  function ticks(min, max, kind, target) {
    const out = [];
    if (kind === "time") {
      const step = TIME_STEPS.find((s) => (max - min) / s <= target) || TIME_STEPS[TIME_STEPS.length - 1];
      const off = new Date(min).getTimezoneOffset() * 60000;
      let t = Math.ceil((min - off) / step) * step + off;
      for (; t <= max; t += step) {
        const d = new Date(t);
        let label = pad(d.getHours()) + ":" + pad(d.getMinutes());
        if (step < 60000) label += ":" + pad(d.getSeconds());
        if (step >= 86400000) label = (d.getMonth() + 1) + "/" + d.getDate();
        out.push([t, label]);
      }
      return out;
    }
    const step = niceStep(max - min || 1, target);
    for (let v = Math.ceil(min / step) * step; v <= max + 1e-9; v += step) {
      out.push([v, Math.abs(v) >= 1000 ? Math.round(v).toLocaleString("en") : String(+v.toFixed(6))]);
    }
    return out;
  }

  function stepPath(pts, sx, sy) {
    let d = "";
    pts.forEach(([x, y], i) => {
      if (i === 0) d += "M" + sx(x).toFixed(1) + " " + sy(y).toFixed(1);
      else d += "H" + sx(x).toFixed(1) + "V" + sy(y).toFixed(1);
    });
    return d;
  }
  function linePath(pts, sx, sy) {
    return pts.map(([x, y], i) => (i ? "L" : "M") + sx(x).toFixed(1) + " " + sy(y).toFixed(1)).join("");
  }

  // opts: {x: {min, max, kind, label}, y: {label}, series: [{pts, color, width, dash, step, dots, name}],
  //        vlines: [{x, label}], empty}
  function plot(svg, opts) {
    const vb = svg.viewBox.baseVal;
    const W = vb.width, H = vb.height;
    const m = { l: 46, r: 14, t: 12, b: 34 };
    svg.replaceChildren();
    const drawn = opts.series.reduce((n, s) => n + s.pts.length, 0);
    svg.dataset.points = String(drawn);
    const x0 = opts.x.min, x1 = opts.x.max > opts.x.min ? opts.x.max : opts.x.min + 1;
    const sx = (x) => m.l + (x - x0) / (x1 - x0) * (W - m.l - m.r);
    const sy = (y) => H - m.b - Math.max(0, Math.min(1.02, y)) / 1.02 * (H - m.t - m.b);
    for (let y = 0; y <= 1.0001; y += 0.2) {
      svg.appendChild(sv("line", { x1: m.l, x2: W - m.r, y1: sy(y), y2: sy(y), class: "grid" }));
      svg.appendChild(sv("text", { x: m.l - 6, y: sy(y) + 4, "text-anchor": "end" }, Math.round(y * 100) + "%"));
    }
    svg.appendChild(sv("line", { x1: m.l, x2: W - m.r, y1: H - m.b, y2: H - m.b, class: "axis" }));
    svg.appendChild(sv("line", { x1: m.l, x2: m.l, y1: m.t, y2: H - m.b, class: "axis" }));
    if (!drawn) {
      svg.appendChild(sv("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, opts.empty || "no points yet"));
      svg.appendChild(sv("text", { x: (m.l + W - m.r) / 2, y: H - 4, "text-anchor": "middle" }, opts.x.label));
      return;
    }
    ticks(x0, x1, opts.x.kind, opts.x.kind === "time" ? 8 : 6).forEach(([v, label]) => {
      svg.appendChild(sv("line", { x1: sx(v), x2: sx(v), y1: H - m.b, y2: H - m.b + 4, class: "axis" }));
      svg.appendChild(sv("text", { x: sx(v), y: H - m.b + 16, "text-anchor": "middle" }, label));
    });
    svg.appendChild(sv("text", { x: (m.l + W - m.r) / 2, y: H - 4, "text-anchor": "middle" }, opts.x.label));
    svg.appendChild(sv("text", { x: 12, y: (m.t + H - m.b) / 2, "text-anchor": "middle",
      transform: "rotate(-90 12 " + ((m.t + H - m.b) / 2) + ")" }, opts.y.label));
    (opts.vlines || []).forEach((v) => {
      if (v.x < x0 || v.x > x1) return;
      svg.appendChild(sv("line", { x1: sx(v.x), x2: sx(v.x), y1: m.t, y2: H - m.b, class: "cross" }));
      const right = sx(v.x) < W * 0.7;
      svg.appendChild(sv("text", { x: sx(v.x) + (right ? 5 : -5), y: m.t + 12, class: "cross-label",
        "text-anchor": right ? "start" : "end" }, v.label));
    });
    opts.series.forEach((s) => {
      const pts = s.pts.filter(([x, y]) => y !== null && y !== undefined && isFinite(y) && isFinite(x));
      if (!pts.length) return;
      const d = s.step ? stepPath(pts, sx, sy) : linePath(pts, sx, sy);
      const attrs = { d: d, fill: "none", stroke: s.color, "stroke-width": s.width || 2.5,
        "stroke-linejoin": "round", class: "curve " + (s.name || "") };
      if (s.dash) attrs["stroke-dasharray"] = s.dash;
      if (s.opacity) attrs["stroke-opacity"] = s.opacity;
      svg.appendChild(sv("path", attrs));
      if (s.dots) pts.forEach(([x, y]) => svg.appendChild(sv("circle", { cx: sx(x), cy: sy(y), r: 3, fill: s.color })));
    });
  }

  function fitY(fit, x) {
    if (!fit) return null;
    if (fit.kind === "log") return x > 0 ? fit.a + fit.b * Math.log(x) : null;
    return fit.a + fit.b * x;
  }
  function fitText(fit, what) {
    if (!fit) return "not enough " + what + " for a fit yet";
    return fit.formula.replace("y =", "recall@1% =") + "   (R² " + num(fit.r2, 3) + ", " + fit.n + " points, n = "
      + int(fit.x_min) + "…" + int(fit.x_max) + ")";
  }

  function drawCurves(data) {
    const c = data.curves;
    const now = data.at_ms;
    // columns: rules [at_ms, rules, r01, r1, auc]; model [at_ms, flags, r01, r1, auc, version, served_r1]
    const rules = c.rules.filter((p) => p[0]);
    const model = c.model.filter((p) => p[0]);
    const times = rules.concat(model).map((p) => p[0]);
    let tmin = times.length ? Math.min.apply(null, times) : now - 60000;
    let tmax = Math.max(now, times.length ? Math.max.apply(null, times) : now);
    if (tmax - tmin < 60000) tmin = tmax - 60000;
    const extend = (pts) => pts.length ? pts.concat([[tmax, pts[pts.length - 1][1]]]) : pts;
    const cross = c.crossing;
    plot($("chart-headline"), {
      x: { min: tmin, max: tmax, kind: "time", label: "time (each point: a new champion, or a rule change)" },
      y: { label: "spam recall" },
      series: [
        { name: "rules-fit", pts: extend(rules.map((p) => [p[0], fitY(c.fits.rules, p[1])])), color: COLORS.rules, width: 1.5, dash: "6 4", step: true, opacity: 0.8 },
        { name: "model-fit", pts: extend(model.filter((p) => p[1] > 0).map((p) => [p[0], fitY(c.fits.model, p[1])])), color: COLORS.model, width: 1.5, dash: "6 4", step: true, opacity: 0.8 },
        { name: "rules-01", pts: extend(rules.map((p) => [p[0], p[2]])), color: COLORS.rules, width: 1, step: true, opacity: 0.7 },
        { name: "model-01", pts: extend(model.map((p) => [p[0], p[2]])), color: COLORS.model, width: 1, step: true, opacity: 0.7 },
        { name: "rules", pts: extend(rules.map((p) => [p[0], p[3]])), color: COLORS.rules, width: 3, step: true },
        { name: "model", pts: extend(model.map((p) => [p[0], p[3]])), color: COLORS.model, width: 3, step: true },
      ],
      vlines: cross ? [{ x: cross.at_ms, label: "model passes rules: " + int(cross.flags) + " flags, " + int(cross.rules) + " rules" }] : [],
      empty: "no curve points yet: the worker records one per champion and per rule change",
    });
    $("crossing").textContent = cross
      ? "The model's recall at 1% FPR (" + pct(cross.model_recall_1pct) + ") passed the rules' (" + pct(cross.rules_recall_1pct)
        + ", " + int(cross.rules) + " rules) with the champion trained on " + int(cross.flags) + " flagged messages, at "
        + fmtWhen(new Date(cross.at_ms).toISOString()) + "."
      : "The model has not passed the rules yet (" + int(c.points.model) + " champion points, " + int(c.points.rules)
        + " rule-set points).";

    const rx = rules.map((p) => p[1]);
    const rFit = c.fits.rules;
    const rsorted = rules.slice().sort((a, b) => a[1] - b[1] || a[0] - b[0]);
    plot($("chart-rules"), {
      x: { min: rx.length ? Math.min(0, Math.min.apply(null, rx)) : 0, max: rx.length ? Math.max.apply(null, rx) : 1, kind: "linear", label: "active rules" },
      y: { label: "recall" },
      series: [
        { name: "rules-fit", pts: rFit ? [[rFit.x_min, fitY(rFit, rFit.x_min)], [rFit.x_max, fitY(rFit, rFit.x_max)]] : [], color: "#495057", width: 1.5, dash: "6 4" },
        { name: "rules-01", pts: rsorted.map((p) => [p[1], p[2]]), color: COLORS.rules, width: 1, opacity: 0.6 },
        { name: "rules", pts: rsorted.map((p) => [p[1], p[3]]), color: COLORS.rules, width: 2.5, dots: true },
      ],
    });
    $("fit-rules").textContent = fitText(rFit, "rule-set points");

    const mpos = model.filter((p) => p[1] > 0).sort((a, b) => a[1] - b[1] || a[0] - b[0]);
    const mx = mpos.map((p) => p[1]);
    const mFit = c.fits.model;
    const fitPts = [];
    if (mFit) {
      const lo = Math.max(1, mFit.x_min), hi = mFit.x_max;
      for (let i = 0; i <= 80; i++) { const x = lo + (hi - lo) * i / 80; fitPts.push([x, fitY(mFit, x)]); }
    }
    plot($("chart-model"), {
      x: { min: 0, max: mx.length ? Math.max.apply(null, mx) : 1, kind: "linear", label: "flagged messages behind the champion" },
      y: { label: "recall" },
      series: [
        { name: "model-fit", pts: fitPts, color: "#495057", width: 1.5, dash: "6 4" },
        { name: "model-01", pts: mpos.map((p) => [p[1], p[2]]), color: COLORS.model, width: 1, opacity: 0.6 },
        { name: "model", pts: mpos.map((p) => [p[1], p[3]]), color: COLORS.model, width: 2.5, dots: true },
      ],
      vlines: cross ? [{ x: cross.flags, label: "passes the rules" }] : [],
      empty: "no champion trained on flags yet",
    });
    $("fit-model").textContent = fitText(mFit, "champions trained on flags");
  }

  // ------------------------------------------------------------------------------------------ sections
  function drawChampion(data) {
    const ch = data.champion || {};
    const v = ch.version || "none";
    $("champion-version").textContent = v;
    $("champion-head").textContent = v;
    document.body.dataset.champion = v;
    const here = data.served_here || {};
    $("served-here").textContent = "This API server (pid " + here.pid + ", " + here.workers + " worker(s)) serves "
      + (here.version === ch.version ? "the champion" : shortVersion(here.version) + ", not yet the champion")
      + " on " + here.provider + ".";
    const lin = ch.lineage || {};
    const counts = lin.counts || {};
    const cnt = (k) => counts[k] && typeof counts[k] === "object"
      ? Object.keys(counts[k]).map((g) => g + " " + int(counts[k][g])).join(", ") : "–";
    const offsets = lin.offsets && typeof lin.offsets === "object"
      ? Object.keys(lin.offsets).map((tp) => { const r = lin.offsets[tp]; return tp + " @" + (Array.isArray(r) ? r.join("…") : r); }).join("; ")
      : "–";
    const cal = ch.calibration && typeof ch.calibration === "object"
      ? Object.keys(ch.calibration).map((k) => k + " " + (typeof ch.calibration[k] === "number" ? num(ch.calibration[k], 3) : ch.calibration[k])).join(", ")
      : "none";
    dl($("champion-details"), [
      ["kind", ch.kind],
      ["created", ch.created_at ? fmtWhen(ch.created_at) + " (" + ago(ch.created_at, data.at_ms) + ")" : null],
      ["parent", ch.parent ? shortVersion(ch.parent) : "none", ch.parent],
      ["trained on", lin.source],
      ["flags", cnt("flags")],
      ["corpus", cnt("corpus")],
      ["data version", lin.data_version],
      ["untrusted flags left out", lin.untrusted_flags_left_out],
      ["Kafka offsets", offsets],
      ["calibration", cal],
      ["calibrated on", lin.calibration && typeof lin.calibration === "object"
        ? Object.keys(lin.calibration).map((k) => k + " " + lin.calibration[k]).join(", ") : lin.calibration],
      ["training", lin.training_s !== undefined ? num(lin.training_s, 2) + " s" : null],
      ["code", ch.code_version],
      ["missing", ch.missing],
    ].filter(([k, val]) => k !== "missing" || val));
    fillTable($("ancestry"), ["version", "kind", "created", "flags", "corpus", "data v."],
      (data.ancestry || []).map((a) => [{ text: shortVersion(a.version), title: a.version }, a.kind,
        fmtWhen(a.created_at), int(a.flags), int(a.corpus), a.data_version === undefined ? null : a.data_version]), [3, 4, 5]);
    fillTable($("history"), ["when", "action", "version", "reason"],
      (data.history || []).map((h) => [fmtWhen(h.at), { badge: h.action, text: h.action },
        { text: shortVersion(h.version), title: h.version }, { text: h.reason, cls: "reason" }]));
  }

  function drawDecisions(data) {
    fillTable($("decisions"), ["when", "kind", "challenger", "decision", "test", "chall. 1-AUC", "chall. R@1%",
      "champ. 1-AUC", "champ. R@1%", "evaluation set", "reason"],
      (data.decisions || []).map((d) => {
        const a = d.challenger_metrics || {}, b = d.champion_metrics || {};
        return [fmtClock(new Date(d.at).getTime()), d.kind, { text: shortVersion(d.challenger), title: d.challenger },
          { badge: d.decision, text: d.decision }, d.test, pct(a.one_minus_auc, 2), pct(a.recall_at_fpr_1pct),
          pct(b.one_minus_auc, 2), pct(b.recall_at_fpr_1pct), composition(d.evaluation_set),
          { text: d.reason, cls: "reason" }];
      }), [5, 6, 7, 8]);
  }

  function drawWorker(data) {
    const w = data.worker;
    if (!w) {
      $("worker-age").textContent = "no summary from the worker yet";
      fillTable($("counters"), ["counter", "value"], []);
      fillTable($("live"), ["version", "tp", "fp", "tn", "fn"], []);
      fillTable($("reporters-high"), ["reporter", "weight", "flags"], []);
      fillTable($("reporters-low"), ["reporter", "weight", "flags"], []);
      $("reporters-summary").textContent = "";
      return;
    }
    $("worker-age").textContent = "worker summary " + (w.age_s === null ? "" : Math.round(w.age_s) + " s old");
    const rows = [];
    const labels = w.labels || {};
    Object.keys(labels).forEach((k) => rows.push(["labels: " + k, int(labels[k])]));
    const counters = w.counters || {};
    Object.keys(counters).sort().forEach((k) => rows.push([k.replace(/_/g, " "), typeof counters[k] === "number" ? int(counters[k]) : counters[k]]));
    fillTable($("counters"), ["counter", "value"], rows, [1]);
    const live = w.live_verdicts || {};
    fillTable($("live"), ["version", "tp", "fp", "tn", "fn", "precision", "recall"],
      Object.keys(live).filter((v) => live[v] && typeof live[v] === "object").reverse().map((v) => {
        const t = live[v];
        const prec = t.tp + t.fp ? t.tp / (t.tp + t.fp) : null, rec = t.tp + t.fn ? t.tp / (t.tp + t.fn) : null;
        return [{ text: shortVersion(v), title: v }, int(t.tp), int(t.fp), int(t.tn), int(t.fn), pct(prec), pct(rec)];
      }), [1, 2, 3, 4, 5, 6]);
    const rep = w.reporters || {};
    $("reporters-summary").textContent = int(rep.total) + " reporters, " + int(rep.distrusted)
      + " distrusted (weight below half the consensus bar).";
    const rrows = (list) => (Array.isArray(list) ? list : []).filter((r) => r && typeof r === "object")
      .map((r) => [{ text: r.reporter, cls: "reason" }, num(r.weight, 3), int(r.flags)]);
    fillTable($("reporters-high"), ["reporter", "weight", "flags"], rrows(rep.highest), [1, 2]);
    fillTable($("reporters-low"), ["reporter", "weight", "flags"], rrows(rep.lowest), [1, 2]);
  }

  function drawRules(data) {
    const r = data.rules;
    $("rules-summary").textContent = int(r.active) + " active of " + int(r.total) + " · threshold " + num(r.threshold, 2)
      + " · " + int(r.hits_total) + " " + r.hits_scope;
    const rows = showAllRules ? r.rows : r.rows.slice(0, RULES_COLLAPSED);
    const table = $("rules");
    fillTable(table, ["rule", "state", "weight", "hits", "kind", "added", "description"],
      rows.map((x) => ({ cls: x.enabled ? "" : "off", cells: [x.name, { badge: x.enabled ? "on" : "off", text: x.enabled ? "active" : "off" },
        num(x.weight, 2), int(x.hits), x.kind, x.added, { text: x.description, cls: "reason" }] })), [2, 3]);
    if (r.rows.length > RULES_COLLAPSED) {
      const tr = el("tr");
      const td = el("td");
      td.colSpan = 7;
      const b = el("button", null, showAllRules ? "show the first " + RULES_COLLAPSED : "show all " + r.rows.length
        + (r.total > r.rows.length ? " (of " + r.total + ")" : ""));
      b.type = "button";
      b.addEventListener("click", () => { showAllRules = !showAllRules; if (last) drawRules(last); });
      td.appendChild(b);
      tr.appendChild(td);
      table.querySelector("tbody").appendChild(tr);
    }
  }

  function render(data) {
    $("key-form").hidden = true;
    $("main").hidden = false;
    $("forget-key").hidden = false;
    drawCurves(data);
    drawChampion(data);
    drawDecisions(data);
    drawWorker(data);
    drawRules(data);
    renders += 1;
    document.body.dataset.renders = String(renders);
    document.body.dataset.state = "ready";
  }

  // ------------------------------------------------------------------------------------------ start
  function start() {
    keyFromFragment();
    $("key-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const k = $("key-input").value.trim();
      if (!k) return;
      sessionStorage.setItem(KEY_STORE, k);
      $("key-input").value = "";
      $("key-form").hidden = true;
      setStatus("loading…", false);
      poll();
    });
    $("forget-key").addEventListener("click", () => {
      sessionStorage.removeItem(KEY_STORE);
      clearTimeout(timer);
      askKey("");
    });
    window.addEventListener("hashchange", () => { keyFromFragment(); poll(); });
    poll();
  }

  start();
})();
