// Steering playground: up to 16 latents, each added or clamped; the unsteered and steered continuations and
// the measured effect. Nothing is sent until every row holds a latent id and a finite value (an empty id
// must not become latent 0); a new run and an error both clear the previous run's text and effect.
"use strict";
ms.nav("/steer");
const $ = id => document.getElementById(id);
const MAX_LATENTS = 16, MAX_VALUE = 1e4;
const rows = $("rows");
let info = {};  // /api/info: the dictionary's size, whether a feature database is loaded

function renumber() {  // the first row's fields are #lat, #val, #mode; later rows' #lat1, #val1, ...
  [...rows.children].forEach((r, k) => {
    const sfx = k === 0 ? "" : String(k);
    r.querySelector(".lat").id = "lat" + sfx;
    r.querySelector(".val").id = "val" + sfx;
    r.querySelector(".mode").id = "mode" + sfx;
    r.querySelector(".remove").hidden = rows.children.length === 1;
  });
  $("add").disabled = rows.children.length >= MAX_LATENTS;
  $("count").textContent = `${rows.children.length} of at most ${MAX_LATENTS} latents`;
}

function addRow(latent = "", value = "20", mode = "add") {
  const lat = ms.el("input", {type: "text", cls: "lat", size: "7", "aria-label": "latent", placeholder: "latent id"});
  const val = ms.el("input", {type: "text", cls: "val", size: "7", "aria-label": "value"});
  const sel = ms.el("select", {cls: "mode", "aria-label": "mode"}, ms.el("option", {value: "add", text: "add"}),
    ms.el("option", {value: "clamp", text: "clamp"}));
  const scale = ms.el("span", {cls: "note scale"});
  const remove = ms.el("button", {type: "button", cls: "remove secondary", text: "remove"});
  lat.value = latent; val.value = value; sel.value = mode;
  const row = ms.el("p", {cls: "steer-row"}, "latent ", lat, " value ", val, " ", sel, " ", remove, " ", scale);
  let timer = null, asked = 0;
  const lookUp = () => {
    clearTimeout(timer);
    timer = setTimeout(() => {
      const mine = ++asked;
      showScale(lat.value, scale, () => mine === asked);
    }, 250);
  };
  lat.addEventListener("input", lookUp);
  remove.addEventListener("click", () => { row.remove(); renumber(); });
  rows.append(row);
  renumber();
  if (latent !== "") lookUp();
  return row;
}

// the latent's scale beside its value: mean activation when active and the max, from the feature database
function showScale(text, where, current) {
  where.className = "note scale";
  const id = parseId(text);
  if (id === null) { where.textContent = ""; return; }
  if (!info.n_latents) {
    where.textContent = info.n_latents === null ? "no feature database loaded: activation scale unknown" : "";
    return;
  }
  where.textContent = "…";
  ms.api(`/api/feature/${id}/summary`).then(f => {
    if (!current()) return;
    where.textContent = `typical activation ${Number(f.mean_act).toFixed(2)} (mean when active) · max ${Number(f.max_act).toFixed(2)}` +
      ` · fires on ${(100 * f.density).toPrecision(2)}% of tokens` + (f.label ? ` · ${f.label}` : "");
  }).catch(e => {
    if (!current()) return;
    where.className = "err scale";
    where.textContent = e.message;
  });
}

function parseId(text) {
  const t = String(text).trim();
  return /^\d+$/.test(t) ? Number(t) : null;
}

// the request body, or an Error that says which field is wrong and how to fix it
function readForm() {
  const latents = [], seen = new Set(), problems = [];
  const d = info.dictionary ? info.dictionary.d_sae : null;
  [...rows.children].forEach((r, k) => {
    const where = rows.children.length > 1 ? `row ${k + 1}: ` : "";
    const idText = r.querySelector(".lat").value.trim(), valText = r.querySelector(".val").value.trim();
    const id = parseId(idText), value = Number(valText);
    if (idText === "") problems.push(`${where}latent: empty; enter a latent id (a whole number${d ? ` from 0 to ${d - 1}` : ""}).`);
    else if (id === null) problems.push(`${where}latent: “${idText}” is not a latent id; enter a whole number${d ? ` from 0 to ${d - 1}` : ""}.`);
    else if (d !== null && id >= d) problems.push(`${where}latent: ${id} does not exist; the dictionary has latents 0 to ${d - 1}.`);
    else if (seen.has(id)) problems.push(`${where}latent: ${id} is given twice; give each latent once.`);
    if (valText === "" || !Number.isFinite(value)) problems.push(`${where}value: “${valText}” is not a number; enter one such as 20 or -5.5.`);
    else if (Math.abs(value) > MAX_VALUE) problems.push(`${where}value: ${value} is outside ±${MAX_VALUE}.`);
    if (id !== null) seen.add(id);
    latents.push({id, value, mode: r.querySelector(".mode").value});
  });
  const nText = $("n").value.trim(), n = Number(nText);
  if (!/^\d+$/.test(nText) || n < 1 || n > 128) problems.push(`new tokens: “${nText}” must be a whole number from 1 to 128.`);
  if (!$("prompt").value.trim()) problems.push("prompt: empty; type the text to continue.");
  if (problems.length) throw new Error(problems.join("\n"));
  return {prompt: $("prompt").value, max_new_tokens: n, latents};
}

function clearRun(steeredText) {
  $("plain").textContent = "";
  $("effect").textContent = "";
  $("steered").textContent = steeredText;
}

$("add").addEventListener("click", () => addRow().querySelector(".lat").focus());
let run = 0;  // only the latest run may draw
$("f").addEventListener("submit", ev => {
  ev.preventDefault();
  const mine = ++run;
  let body;
  try { body = readForm(); } catch (e) { clearRun(""); ms.fail($("steered"), e); return; }
  clearRun("generating…");
  ms.api("/api/steer", body).then(r => {
    if (mine !== run) return;
    $("plain").textContent = r.unsteered;
    $("steered").textContent = r.steered;
    $("effect").textContent = r.effect || "";
  }).catch(e => { if (mine === run) { clearRun(""); ms.fail($("steered"), e); } });
});

const q = new URLSearchParams(location.search);
addRow(q.get("latent") || "", q.get("value") || "20");
ms.api("/api/info").then(i => {
  info = i;
  for (const r of rows.children) r.querySelector(".lat").dispatchEvent(new Event("input"));
}).catch(e => ms.fail($("effect"), e));
