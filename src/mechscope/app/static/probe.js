// Probe page: per-token scores of the loaded linear probes on a typed text (POST /api/probe), and a greedy
// generation under a runtime monitor (POST /api/monitor). Tokens are coloured by score against the probe's
// threshold (diverging: red above, blue below); every string is put in the page as text.
"use strict";
ms.nav("/probe");
const $ = id => document.getElementById(id);
let maxNew = 200;

const fmt = x => (x >= 0 ? "+" : "") + x.toFixed(4);

// A token strip: one span per drawn token (a token holding only leading bytes of a character is merged with
// the token that completes it, as in contexts), coloured by its score's distance from the threshold.
// opts.promptLen: tokens before it are faded; opts.alarms: positions outlined as alarms.
function strip(tokens, scores, threshold, opts) {
  const o = opts || {};
  const alarms = new Set(o.alarms || []);
  // full colour at the 95th percentile of the distances, so that one outlier (the first token of a chat, an
  // attention sink, often scores hundreds of logits away) does not wash out every other token
  const dist = scores.map(s => Math.abs(s - threshold)).sort((a, b) => a - b);
  const far = Math.max(1e-9, dist.length ? dist[Math.floor(0.95 * (dist.length - 1))] : 0);
  const line = ms.el("div", {cls: "ctx strip"});
  ms.groups(tokens, null).forEach((g, k) => {
    const last = g.pos[g.pos.length - 1];
    const s = scores[last];
    const span = ms.tok(g.text);
    const d = s - threshold;
    span.dataset.pos = String(g.pos[0]);
    span.dataset.score = String(s);
    span.title = g.pos.map(i => `position ${i}: score ${fmt(scores[i])}`).join("\n") +
      ` (threshold ${fmt(threshold)}; ${d > 0 ? "above" : "at or below"})`;
    const a = Math.min(1, Math.abs(d) / far);
    span.style.background = d > 0 ? `rgba(214,39,40,${a.toFixed(3)})` : `rgba(47,111,223,${a.toFixed(3)})`;
    if (a > 0.6) span.style.color = "#fff";
    span.classList.add(d > 0 ? "above" : "below");
    if (o.promptLen !== undefined && last < o.promptLen) span.classList.add("prompt");
    if (g.pos.some(i => alarms.has(i))) span.classList.add("alarm");
    if (k) line.append(document.createElement("wbr"));
    line.append(span);
  });
  return line;
}

function showScores(r) {
  const box = $("scores");
  box.replaceChildren();
  for (const p of r.probes) {
    const verdict = p.above ? "above" : "at or below";
    box.append(ms.el("div", {cls: "probe-result"},
      ms.el("h2", {text: `${p.name}`}),
      ms.el("p", {cls: "note", text: `${p.method} probe at ${p.site}; ${p.aggregation} over tokens ${r.aggregate_from}..` +
        `${r.n_tokens - 1}: ${fmt(p.aggregate)}, ${verdict} the threshold ${fmt(p.threshold)} (from ${p.threshold_from})`}),
      strip(r.tokens, p.scores, p.threshold)));
  }
}

function showMonitor(r) {
  const box = $("mon");
  const badge = r.flagged ? ms.el("span", {cls: "badge flag", text: "flagged"}) : ms.el("span", {cls: "badge", text: "not flagged"});
  const alarms = r.alarms.map(a => a.position);
  const rows = r.alarms.map(a => ms.el("tr", {}, ms.el("td", {cls: "n", text: String(a.position)}),
    ms.el("td", {}, ms.tok(a.token)), ms.el("td", {cls: "n", text: fmt(a.value)})));
  box.replaceChildren(
    ms.el("p", {}, badge, ms.el("span", {cls: "note", text: ` ${r.name} at ${r.site}; rule ${r.rule}` +
      (r.rule === "ema" ? ` (weight ${r.ema})` : ` (window ${r.window})`) + `; threshold ${fmt(r.threshold)} (from ${r.threshold_from}); ` +
      `${r.tokens.length - r.prompt_len} new tokens; ${r.alarms.length} alarm(s)`})),
    strip(r.tokens, r.scores, r.threshold, {promptLen: r.prompt_len, alarms}),
    rows.length ? ms.el("table", {id: "alarms"}, ms.el("tr", {}, ms.el("th", {cls: "n", text: "position"}),
      ms.el("th", {text: "alarm token"}), ms.el("th", {cls: "n", text: "rule value"})), ...rows)
      : ms.el("p", {cls: "note", text: "No alarm."}));
}

function noProbes(help) {
  $("info").replaceChildren(ms.el("span", {cls: "err", text: help}));
  for (const b of document.querySelectorAll("button[type=submit]")) b.disabled = true;
}

ms.api("/api/probes").then(r => {
  maxNew = r.max_new_tokens || maxNew;
  if (!r.probes.length) { noProbes(r.help); return; }
  $("info").textContent = `${r.probes.length} probe(s) loaded.`;
  for (const p of r.probes) {
    const label = `${p.name} (${p.site}, threshold ${fmt(p.threshold)})`;
    $("probe").append(ms.el("option", {value: p.name, text: label}));
    $("mprobe").append(ms.el("option", {value: p.name, text: label}));
  }
}).catch(e => ms.fail($("info"), e));

$("f").addEventListener("submit", ev => {
  ev.preventDefault();
  const body = {text: $("text").value, chat: $("chat").checked};
  if ($("probe").value) body.probes = [$("probe").value];
  $("scores").replaceChildren(ms.el("p", {cls: "note", text: "running…"}));
  ms.api("/api/probe", body).then(showScores).catch(e => ms.fail($("scores"), e));
});

$("mf").addEventListener("submit", ev => {
  ev.preventDefault();
  const box = $("mon");
  const n = $("n").value.trim(), thr = $("threshold").value.trim();
  if (!/^\d+$/.test(n) || Number(n) < 1 || Number(n) > maxNew) {
    ms.fail(box, new Error(`new tokens: “${n}” is not a whole number in 1..${maxNew}.`)); return;
  }
  const body = {prompt: $("prompt").value, probe: $("mprobe").value, max_new_tokens: Number(n), rule: $("rule").value,
    chat: $("mchat").checked};
  if (thr !== "") {
    if (!Number.isFinite(Number(thr))) { ms.fail(box, new Error(`threshold: “${thr}” is not a number; leave it empty for the probe's.`)); return; }
    body.threshold = Number(thr);
  }
  box.replaceChildren(ms.el("p", {cls: "note", text: "generating…"}));
  ms.api("/api/monitor", body).then(showMonitor).catch(e => ms.fail(box, e));
});
