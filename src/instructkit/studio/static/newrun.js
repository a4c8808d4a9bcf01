// The New run page: live validation as the user types, the YAML preview, data preview and Start.
"use strict";

Studio.formValues = function () {
  const values = {};
  for (const input of document.querySelectorAll("[data-key]")) {
    values[input.dataset.key] = input.type === "checkbox" ? String(input.checked) : input.value;
  }
  return values;
};

Studio.fillForm = function (values) {
  for (const input of document.querySelectorAll("[data-key]")) {
    const value = values[input.dataset.key];
    if (value === undefined || input.readOnly) continue;
    if (input.type === "checkbox") input.checked = value === "true"; else input.value = value;
  }
};

Studio.showErrors = function (errors) {
  for (const box of document.querySelectorAll("[data-error-for]")) {
    const problems = errors[box.dataset.errorFor] || [];
    box.hidden = !problems.length;
    box.replaceChildren(...problems.map((p) => Studio.el("div", {},
      Studio.el("code", {text: box.dataset.errorFor}), `: ${p.message}`, Studio.el("br"),
      Studio.el("span", {class: "fix", text: `Fix: ${p.fix}`}))));
    box.closest(".field").classList.toggle("invalid", problems.length > 0);
  }
  const general = errors[""] || [];
  const top = document.getElementById("form-errors");
  top.hidden = !general.length;
  top.textContent = general.map((p) => p.message).join("; ");
};

Studio.renderPreview = function (report) {
  const body = document.getElementById("preview-body");
  document.getElementById("data-preview").hidden = false;
  if (report.error) { body.replaceChildren(Studio.el("p", {class: "error", text: report.error})); return; }
  const parts = [];
  for (const ex of report.examples) {
    const pre = Studio.el("pre", {class: "example"});
    for (const span of ex.spans) pre.append(Studio.el(span.supervised ? "mark" : "span",
      span.supervised ? {class: "supervised", text: span.text} : {text: span.text}));
    parts.push(Studio.el("h3", {text: `${ex.where}: ${ex.n_tokens} tokens, ${ex.n_supervised} supervised ` +
                                      "(highlighted: what the loss trains on)"}), pre);
  }
  const lengths = report.token_lengths || {};
  const rows = [["rows", report.rows], ["formats", Object.entries(report.formats).map(([k, v]) => `${k}: ${v}`).join(", ")],
    ["template", report.template], ["examples kept", report.examples_kept], ["eval examples", report.eval_examples],
    ["dropped over max_length", `${report.dropped} (${(100 * report.dropped_share).toFixed(1)}%)`],
    ["truncated", `${report.truncated} (${(100 * report.truncated_share).toFixed(1)}%)`],
    ["token lengths", `p50 ${lengths.p50}, p90 ${lengths.p90}, p99 ${lengths.p99}, max ${lengths.max}`],
    ["supervised tokens", `${(100 * report.supervised_share).toFixed(1)}% of all tokens`],
    ["packing efficiency", `${(100 * report.packing_efficiency).toFixed(1)}% (packing ${report.packing ? "on" : "off"})`],
    ["bad rows", report.bad_total]];
  parts.push(Studio.el("h3", {text: "Counts"}), Studio.table(["", ""], rows, "data-counts"));
  parts.push(Studio.el("h3", {text: "Token lengths"}), Studio.histogram(report.histogram));
  if (report.bad.length) {
    parts.push(Studio.el("h3", {text: `Bad rows (${report.bad_total})`}),
      Studio.el("p", {class: report.stops_training ? "error" : "note", text: report.stops_training
        ? "Training stops on these rows (data.on_bad_row: error). Fix them, or set data.on_bad_row: skip."
        : "Training skips these rows (data.on_bad_row: skip)."}),
      Studio.table(["where", "reason", "detail"], report.bad.map((b) => [b.where, b.reason, b.detail]), "bad-rows"));
  }
  body.replaceChildren(...parts);
};

Studio.table = function (header, rows, id) {
  const table = Studio.el("table", {id});
  table.append(Studio.el("thead", {}, Studio.el("tr", {}, ...header.map((h) => Studio.el("th", {text: h})))));
  table.append(Studio.el("tbody", {}, ...rows.map((r) => Studio.el("tr", {}, ...r.map((c) => Studio.el("td", {text: String(c)}))))));
  return table;
};

// A hand-drawn SVG bar chart: twenty bars need no library.
Studio.histogram = function (h) {
  const ns = "http://www.w3.org/2000/svg", width = 460, height = 140, bar = width / h.counts.length;
  const top = Math.max(1, ...h.counts);
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height + 20}`);
  svg.setAttribute("class", "histogram");
  h.counts.forEach((count, i) => {
    const rect = document.createElementNS(ns, "rect"), tall = (height * count) / top;
    Object.entries({x: i * bar + 1, y: height - tall, width: bar - 2, height: tall}).forEach(([k, v]) => rect.setAttribute(k, v));
    const tip = document.createElementNS(ns, "title");
    tip.textContent = `${i * h.width}-${(i + 1) * h.width - 1} tokens: ${count} examples`;
    rect.append(tip);
    svg.append(rect);
  });
  const label = document.createElementNS(ns, "text");
  Object.entries({x: 0, y: height + 15}).forEach(([k, v]) => label.setAttribute(k, v));
  label.textContent = `0 to ${h.width * h.counts.length} tokens, bins of ${h.width} (max_length ${h.max_length})`;
  svg.append(label);
  return svg;
};

Studio.newRunPage = function () {
  const $ = (id) => document.getElementById(id);
  const form = $("config-form");
  let timer = null, latest = 0;
  async function check() {
    const ticket = ++latest;
    const nameInput = document.querySelector('[data-key="run_name"]');
    document.querySelector('[data-key="output_dir"]').value = `${form.dataset.runs}/${nameInput.value.trim()}`;
    try {
      const result = await Studio.api("/api/form/check", {values: Studio.formValues()});
      if (ticket !== latest) return; // an older answer arriving late
      Studio.showErrors(result.errors);
      $("yaml-preview").textContent = result.yaml;
      $("start").disabled = Object.keys(result.errors).length > 0;
    } catch (e) { alert(e.message); }
  }
  const later = () => { clearTimeout(timer); timer = setTimeout(check, 250); };
  form.addEventListener("input", later);
  form.addEventListener("change", later);
  $("download").onclick = () => {
    const blob = new Blob([$("yaml-preview").textContent], {type: "application/yaml"});
    const link = Studio.el("a", {href: URL.createObjectURL(blob),
      download: `${document.querySelector('[data-key="run_name"]').value || "config"}.yaml`});
    document.body.append(link); link.click(); link.remove();
  };
  $("import").onclick = async () => {
    try {
      Studio.fillForm((await Studio.api("/api/form/parse", {yaml: $("yaml-import").value})).values);
      check();
    } catch (e) { alert(e.message); }
  };
  $("check").onclick = async () => {
    const out = $("check-output");
    out.hidden = false; out.textContent = "running instructkit validate ...";
    try {
      const r = await Studio.api("/api/form/validate", {values: Studio.formValues()});
      out.textContent = `$ ${r.command}\n${r.output}\n(exit ${r.returncode})`;
      out.className = r.returncode === 0 ? "ok" : "error";
    } catch (e) { out.textContent = e.message; out.className = "error"; }
  };
  $("preview-data").onclick = async () => {
    $("preview-body").textContent = "tokenizing ...";
    $("data-preview").hidden = false;
    try { Studio.renderPreview(await Studio.api("/api/data/preview", {values: Studio.formValues(), n: 3})); }
    catch (e) { Studio.renderPreview({error: e.message}); }
  };
  $("start").onclick = async () => {
    $("start").disabled = true;
    try { window.location = (await Studio.api("/api/runs/start", {values: Studio.formValues()})).url; }
    catch (e) { alert(e.message); $("start").disabled = false; }
  };
  check();
};
