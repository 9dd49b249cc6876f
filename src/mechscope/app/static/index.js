// Feature browser: a sorted, paged list of every latent, and search by token, text or label.
// The view (sort, page, or a search) lives in the URL's query string, so reload and back keep it.
"use strict";
ms.nav("/");
const $ = id => document.getElementById(id);
const list = $("list");
const ORDERS = ["max_act", "density", "density_asc", "id"], SIZES = [25, 50, 100, 200];
const NO_MATCH = {
  token: q => `no latent's top examples peak on the token “${q}”, and none promotes it.`,
  text: q => `no latent's top contexts contain “${q}”.`,
  label: q => `no label contains “${q}”.`,
};
let seq = 0;  // only the latest request may draw: an earlier, slower answer must not replace a newer view

function readView() {
  const p = new URLSearchParams(location.search);
  const order = ORDERS.includes(p.get("order")) ? p.get("order") : "max_act";
  const limit = SIZES.includes(Number(p.get("limit"))) ? Number(p.get("limit")) : 50;
  const offset = Math.max(0, Math.floor(Number(p.get("offset")) || 0));
  const by = ["token", "text", "label"].includes(p.get("by")) ? p.get("by") : "token";
  return {order, limit, offset: offset - (offset % limit), q: p.get("q") || "", by};
}

function writeView(v) {
  const p = v.q ? {q: v.q, by: v.by} : {order: v.order, limit: v.limit, offset: v.offset};
  history.replaceState(null, "", "?" + new URLSearchParams(p).toString());
}

function show(rows) {
  list.replaceChildren(ms.el("tr", {}, ms.el("th", {text: "latent"}), ms.el("th", {text: "label"}),
    ms.el("th", {cls: "n", text: "density"}), ms.el("th", {cls: "n", text: "max act"}), ms.el("th", {text: "top tokens"})));
  for (const r of rows) {
    list.append(ms.el("tr", {cls: "lat-row"}, ms.el("td", {}, ms.latLink(r.id)), ms.el("td", {}, ...(r.label ? [ms.el("span", {cls: "feature-label", text: r.label}),
      ms.el("div", {cls: "note", text: `${r.label_score == null ? "not scored" : (r.label_score_kind || "score") + " " + Number(r.label_score).toFixed(2)} · ${r.label_explainer || "?"}`})] : [])),
      ms.el("td", {cls: "n", text: (r.density ?? 0).toExponential(2)}), ms.el("td", {cls: "n", text: (r.max_act ?? 0).toFixed(2)}),
      ms.el("td", {}, ...(r.top_tokens || []).map(t => ms.el("span", {cls: "pill"}, ms.tok(t))))));
  }
}

function empty(text) {
  $("empty").hidden = !text;
  $("empty").textContent = text || "";
}

function render(v) {
  const mine = ++seq;
  writeView(v);
  $("pager").hidden = Boolean(v.q);
  $("clear").hidden = !v.q;
  empty("");
  if (v.q) {
    $("title").textContent = `Search ${v.by}: ${v.q}`;
    list.replaceChildren(ms.el("tr", {}, ms.el("td", {cls: "note", text: "searching…"})));
    return ms.api(`/api/search?q=${encodeURIComponent(v.q)}&by=${v.by}`).then(d => {
      if (mine !== seq) return;
      show(d.latents);
      if (!d.latents.length) empty(NO_MATCH[v.by](v.q));
    }).catch(e => { if (mine === seq) ms.fail(list, e); });
  }
  $("title").textContent = "Latents";
  return ms.api(`/api/features?order=${v.order}&offset=${v.offset}&limit=${v.limit}`).then(d => {
    if (mine !== seq) return;
    const n = d.latents.length;
    $("range").textContent = n ? `latents ${d.offset + 1}–${d.offset + n} of ${d.total}`
      : d.total ? `no latents from ${d.offset + 1}: there are ${d.total}` : "this database has no latents";
    $("prev").disabled = d.offset === 0;
    $("next").disabled = d.offset + n >= d.total;
    show(d.latents);
    if (!n && d.total) empty("this page is past the last latent; go back with “previous”.");
  }).catch(e => { if (mine === seq) ms.fail(list, e); });
}

let view = readView();
$("order").value = view.order;
$("limit").value = String(view.limit);
$("q").value = view.q;
$("by").value = view.by;
const go = changes => { view = {...view, ...changes}; return render(view); };

$("order").addEventListener("change", () => go({order: $("order").value, offset: 0}));
$("limit").addEventListener("change", () => go({limit: Number($("limit").value), offset: 0}));
$("prev").addEventListener("click", () => go({offset: Math.max(0, view.offset - view.limit)}));
$("next").addEventListener("click", () => go({offset: view.offset + view.limit}));
$("clear").addEventListener("click", () => { $("q").value = ""; go({q: ""}); });
$("search").addEventListener("submit", ev => {
  ev.preventDefault();
  const q = $("q").value;  // not trimmed: " the" and "the" are different text searches
  if (!q.trim()) { empty("type a token, some text or part of a label to search for."); return; }
  go({q, by: $("by").value});
});

ms.api("/api/info").then(i => { $("info").textContent =
  `${i.model || "no model"} · ${i.dictionary ? i.dictionary.architecture + " dictionary at " + i.dictionary.hook + ", " + i.dictionary.d_sae + " latents" : "no dictionary"}`; })
  .catch(e => ms.fail($("info"), e));
render(view);
