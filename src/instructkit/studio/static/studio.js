// instructkit studio: helpers, charts (uPlot), the run page and the compare page.
// Charts are generic over the numeric keys of metrics.jsonl, so a metric training adds later is drawn
// without a change here; `eval_X` is drawn on X's chart when both exist.
"use strict";
const Studio = {};

Studio.api = async function (path, body) {
  const init = body === undefined ? {} : {method: "POST", headers: {"Content-Type": "application/json"},
                                          body: JSON.stringify(body)};
  const response = await fetch(path, init);
  let data = null;
  try { data = await response.json(); } catch (e) { data = {error: response.statusText}; }
  if (!response.ok) throw new Error((data && data.error) || response.statusText);
  return data;
};

Studio.el = function (tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
};

Studio.showMessage = function (text, isError = true) {
  const box = document.getElementById("message");
  if (!box) { if (text) alert(text); return; }
  box.hidden = !text;
  box.textContent = text || "";
  box.className = isError ? "error" : "note";
};

Studio.duration = function (seconds) {
  if (seconds === null || seconds === undefined) return "-";
  const s = Math.round(seconds), h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
  return h ? `${h} h ${m} min` : m ? `${m} min ${s % 60} s` : `${s} s`;
};

const X_KEYS = new Set(["step", "epoch"]);
const FIRST = ["loss", "lr", "tokens_per_s", "mfu", "grad_norm"];
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"];

Studio.numericKeys = function (records) {
  const keys = [];
  for (const r of records) {
    for (const [k, v] of Object.entries(r)) {
      if (!X_KEYS.has(k) && typeof v === "number" && !keys.includes(k)) keys.push(k);
    }
  }
  return keys;
};

// {chart title: [series key, ...]}: eval_X joins X's chart when X is logged too.
Studio.groupKeys = function (keys) {
  const groups = new Map();
  for (const k of keys) {
    const base = k.startsWith("eval_") && keys.includes(k.slice(5)) ? k.slice(5) : k;
    if (!groups.has(base)) groups.set(base, []);
    groups.get(base).push(k);
  }
  const rank = (t) => (FIRST.includes(t) ? FIRST.indexOf(t) : FIRST.length);
  return [...groups.entries()].sort((a, b) => rank(a[0]) - rank(b[0]) || a[0].localeCompare(b[0]));
};

Studio.points = function (records, key) {
  return records.filter((r) => typeof r[key] === "number" && typeof r.step === "number").map((r) => [r.step, r[key]]);
};

// charts: [[title, [{label, points: [[x, y], ...]}]]]; one uPlot per title, updated in place.
Studio.drawCharts = function (container, charts) {
  container._plots = container._plots || {};
  for (const [title, series] of charts) {
    const xs = [...new Set(series.flatMap((s) => s.points.map((p) => p[0])))].sort((a, b) => a - b);
    const data = [xs, ...series.map((s) => {
      const byX = new Map(s.points);
      return xs.map((x) => (byX.has(x) ? byX.get(x) : null));
    })];
    const signature = series.map((s) => s.label).join("|");
    let entry = container._plots[title];
    if (entry && entry.signature !== signature) { entry.plot.destroy(); entry.box.remove(); entry = null; }
    if (!entry) {
      const box = Studio.el("div", {class: "chart", "data-chart": title});
      container.append(box);
      const options = {
        // two charts a row on a wide window, one on a narrow one
        title, width: Math.max(360, Math.min(640, Math.floor((container.clientWidth - 40) / 2))), height: 240,
        scales: {x: {time: false}},
        axes: [{label: "step"}, {size: 60}],
        series: [{label: "step"}, ...series.map((s, i) => ({
          label: s.label, stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: true,
          points: {show: s.points.length < 60, size: 5},
        }))],
      };
      entry = {plot: new uPlot(options, data, box), box, signature};
      container._plots[title] = entry;
    } else {
      entry.plot.setData(data);
    }
    entry.box.dataset.points = String(xs.length);
  }
};

Studio.runCharts = function (records) {
  return Studio.groupKeys(Studio.numericKeys(records)).map(([title, keys]) =>
    [title, keys.map((k) => ({label: k, points: Studio.points(records, k)}))]);
};

Studio.runPage = function (name) {
  const state = {records: [], lastStep: null, status: null};
  const $ = (id) => document.getElementById(id);
  const q = encodeURIComponent(name);
  async function poll() {
    try {
      const data = await Studio.api(`/api/run?name=${q}&have=${state.records.length}` +
                                    (state.lastStep === null ? "" : `&last_step=${state.lastStep}`));
      const m = data.metrics;
      state.records = m.reset ? m.records : state.records.concat(m.records);
      const last = state.records[state.records.length - 1];
      state.lastStep = last ? last.step : null;
      const run = data.run;
      $("status").textContent = run.status;
      $("status").className = `status ${run.status}`;
      $("step").textContent = run.step;
      $("total").textContent = run.total_steps || "?";
      $("eta").textContent = run.status === "running" ? Studio.duration(run.eta_s) : "-";
      $("stop").hidden = !run.can_stop;
      $("resume").hidden = !run.can_resume;
      $("delete").hidden = !run.can_delete;
      $("report-link").hidden = !run.has_report;
      const log = $("log"), atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
      log.textContent = data.log.join("\n");
      if (atEnd) log.scrollTop = log.scrollHeight;
      Studio.drawCharts($("charts"), Studio.runCharts(state.records));
      state.status = run.status;
    } catch (e) {
      Studio.showMessage(e.message);
    }
  }
  async function act(path, body, after) {
    try {
      const data = await Studio.api(path, body);
      Studio.showMessage(data.message || "", false);
      if (after) after(data);
      poll();
    } catch (e) { Studio.showMessage(e.message); }
  }
  $("stop").onclick = () => act("/api/run/stop", {name});
  $("resume").onclick = () => act("/api/run/resume", {name});
  $("delete").onclick = () => {
    if (!confirm(`Delete the run ${name} and its checkpoints, final model and exports? This cannot be undone.`)) return;
    act("/api/run/delete", {name, confirm: name}, (data) => {
      if (data.left && data.left.length) alert(`Kept files of your own in the folder: ${data.left.join(", ")}`);
      window.location = "/";
    });
  };
  poll();
  setInterval(poll, 1500);
};

Studio.comparePage = function (names) {
  const container = document.getElementById("charts");
  async function poll() {
    const all = await Promise.all(names.map((n) => Studio.api(`/api/run?name=${encodeURIComponent(n)}`)));
    const keys = Studio.numericKeys(all.flatMap((d) => d.metrics.records));
    const charts = Studio.groupKeys(keys).flatMap(([, group]) => group).map((k) =>
      [k, all.map((d, i) => ({label: names[i], points: Studio.points(d.metrics.records, k)}))
        .filter((s) => s.points.length)]);
    Studio.drawCharts(container, charts);
    return all.some((d) => ["running", "starting"].includes(d.run.status));
  }
  poll().then((live) => { if (live) setInterval(poll, 3000); }).catch((e) => Studio.showMessage(e.message));
};
