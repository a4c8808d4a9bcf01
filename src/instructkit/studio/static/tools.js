// Chat beside the base model, evaluate, and export: jobs of instructkit subcommands with their progress.
"use strict";

Studio.watchJob = function (name, box) {
  const kind = box.dataset.kind;
  async function poll() {
    let job;
    try { job = await Studio.api(`/api/job?name=${encodeURIComponent(name)}&kind=${kind}`); }
    catch (e) { box.textContent = e.message; return; }
    if (job.status === "none") { box.replaceChildren(); return; }
    const step = job.steps.length > 1 ? ` (step ${job.step} of ${job.steps.length}: ${job.steps[job.step - 1] || ""})` : "";
    const parts = [Studio.el("p", {},
      Studio.el("span", {class: `status ${job.status}`, text: job.status}), ` ${step} · ${Studio.duration(job.elapsed_s)}`)];
    if (job.status === "completed" && job.result) {
      const size = job.result_size_mib !== undefined ? ` (${job.result_size_mib} MiB)` : "";
      parts.push(Studio.el("p", {class: "result"}, "Result: ", Studio.el("code", {text: job.result}), size));
      if (kind === "eval") parts.push(Studio.el("p", {}, Studio.el("a", {class: "button", id: "open-report",
        href: `/run/report?name=${encodeURIComponent(name)}`, text: "Open the report"})));
    }
    if (job.note) parts.push(Studio.el("p", {class: "error", text: job.note}));
    parts.push(Studio.el("pre", {class: "log", text: job.log.join("\n")}));
    box.replaceChildren(...parts);
    if (job.status === "running") setTimeout(poll, 1500);
  }
  poll();
  return poll;
};

Studio.startJob = async function (name, kind, body) {
  const box = document.getElementById(`job-${kind}`);
  try {
    await Studio.api(`/api/jobs/${kind}`, {name, ...body});
    Studio.watchJob(name, box);
  } catch (e) { box.replaceChildren(Studio.el("p", {class: "error", text: e.message})); }
};

Studio.chatPage = function (name) {
  const $ = (id) => document.getElementById(id);
  let turns = [];
  function bubble(side, who, text) {
    $(`${side}-log`).append(Studio.el("div", {class: `bubble ${who}`, text}));
  }
  $("send").onclick = async () => {
    const prompt = $("prompt").value;
    if (!prompt.trim()) return;
    $("send").disabled = true;
    bubble("tuned", "user", prompt);
    bubble("base", "user", prompt);
    try {
      const answer = await Studio.api("/api/chat", {name, prompt, system: $("system").value, turns,
        base: $("with-base").checked, max_new_tokens: Number($("max-new").value) || 64});
      bubble("tuned", "model", answer.tuned);
      bubble("base", "model", answer.base === null ? "(not asked)" : answer.base);
      turns.push({user: prompt, tuned: answer.tuned, base: answer.base || ""});
      $("prompt").value = "";
    } catch (e) {
      bubble("tuned", "error", e.message);
    }
    $("send").disabled = false;
  };
  $("reset").onclick = () => { turns = []; $("tuned-log").replaceChildren(); $("base-log").replaceChildren(); };
  $("run-eval").onclick = () => Studio.startJob(name, "eval", {data: $("eval-data").value});
  Studio.watchJob(name, $("job-eval"));
};

Studio.exportPage = function (name) {
  const $ = (id) => document.getElementById(id);
  $("run-merge").onclick = () => Studio.startJob(name, "merge", {dtype: $("merge-dtype").value});
  $("run-gguf").onclick = () => Studio.startJob(name, "gguf", {dtype: $("gguf-dtype").value});
  Studio.watchJob(name, $("job-merge"));
  Studio.watchJob(name, $("job-gguf"));
};
