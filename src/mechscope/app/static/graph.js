// Attribution-graph page: the view of a graph JSON (GET /api/graph), every string as text.
"use strict";
ms.nav("/graph");
const TABLES = {supernodes: "Suggested supernodes", edges: "Strongest edges"};
let pinned = [];
let groups = [];  // hand-made supernodes: [name, id, id, ...] (the graph JSON's qParams.supernodes format)
let clicked = null;
let steerOK = false;
const $ = id => document.getElementById(id);
const quoted = t => `"${ms.vis(t)}"`;  // a token with its spaces visible and newlines as \n: " Mary"
const isFeature = (view, id) => view.nodes[id] && view.nodes[id].rows[0][1] === "feature";

function table(columns, rows) {
  const t = ms.el("table", {}, ms.el("tr", {}, ...columns.map(c => ms.el("th", {text: c}))));
  for (const r of rows) {
    t.append(ms.el("tr", {}, ...r.map(c => ms.el("td", {text: typeof c === "number" && !Number.isInteger(c) ? c.toFixed(4) : String(c)}))));
  }
  return t;
}

function drawPins(view) {
  $("pins").replaceChildren(...pinned.map(id => {
    const b = ms.el("button", {cls: "pin", text: "unpin"});
    b.addEventListener("click", () => { pinned = pinned.filter(x => x !== id); drawPins(view); });
    return ms.el("li", {text: view.nodes[id] ? view.nodes[id].name : id}, b);
  }));
  $("steer-pinned").disabled = !steerOK || !pinned.some(id => isFeature(view, id));
  $("group-pinned").disabled = pinned.length < 2;
}

function drawGroups(view) {
  const name = n => view.nodes[n] ? view.nodes[n].name : n;
  if (!groups.length) { $("groups").replaceChildren(ms.el("li", {cls: "note", text: "none yet: pin nodes, name them, group them."})); return; }
  $("groups").replaceChildren(...groups.map((g, k) => {
    const st = ms.el("button", {cls: "steer-group", text: "steer together"});
    st.disabled = !steerOK || !g.slice(1).some(id => isFeature(view, id));
    st.addEventListener("click", () => steer(view, g.slice(1).filter(id => isFeature(view, id))));
    const rm = ms.el("button", {cls: "pin", text: "remove"});
    rm.addEventListener("click", () => { groups.splice(k, 1); drawGroups(view); });
    return ms.el("li", {text: `${g[0]}: ${g.slice(1).map(name).join(", ")} `}, st, " ", rm);
  }));
}

function exportJSON() {
  ms.api("/api/graph/export", {pinned: pinned, supernodes: groups}).then(data => {
    const a = ms.el("a", {href: URL.createObjectURL(new Blob([JSON.stringify(data)], {type: "application/json"})),
      download: (data.metadata.slug || "graph") + ".json"});
    document.body.append(a);
    a.click();
    a.remove();
  }).catch(e => ms.fail($("groups"), e));
}

// the clicked feature's entry in its layer's feature database: label, density, top contexts, logit effects
function showFeature(view, id) {
  const box = $("feature-info");
  box.replaceChildren();
  if (!isFeature(view, id)) return;
  box.append(ms.el("p", {cls: "note", text: "loading the feature's contexts ..."}));
  ms.api("/api/graph/node/" + encodeURIComponent(id)).then(r => {
    if (clicked !== id) return;
    const f = r.feature;
    if (!f) { box.replaceChildren(ms.el("p", {cls: "note", text: "no feature database: " + r.why})); return; }
    const label = f.label ? `label: ${f.label}` + (f.label_score != null ? ` (${f.label_score_kind} ${Number(f.label_score).toFixed(3)}, ${f.label_explainer})` : "")
      : "no label yet (mechscope features explain)";
    box.replaceChildren(ms.el("h2", {text: `L${r.layer} #${r.latent}: feature database`}),
      ms.el("p", {cls: "label", text: label}),
      ms.el("p", {cls: "note", text: `density ${Number(f.density).toExponential(2)} · max activation ${Number(f.max_act).toFixed(3)} · here ${Number(r.activation).toFixed(3)} · over ${f.n_tokens} tokens`}));
    const ctx = ms.el("div", {id: "feature-contexts"});
    for (const ex of f.top) ctx.append(ms.context(ex, f.max_act, "top-example"));
    box.append(ms.el("h2", {text: "top contexts"}), ctx);
    const up = (f.logits.up || []).map(t => [quoted(t.token), t.value]), down = (f.logits.down || []).map(t => [quoted(t.token), t.value]);
    if (up.length) box.append(ms.el("h2", {text: "promotes"}), table(["token", "logit effect"], up));
    if (down.length) box.append(ms.el("h2", {text: "suppresses"}), table(["token", "logit effect"], down));
  }).catch(e => { if (clicked === id) ms.fail(box, e); });
}

function edgeHeads(view, source, target) {
  const out = $("edge-info");
  const name = n => view.nodes[n] ? view.nodes[n].name : n;
  out.replaceChildren(ms.el("p", {cls: "note", text: "splitting the edge over the heads ..."}));
  ms.api(`/api/graph/edge?source=${encodeURIComponent(source)}&target=${encodeURIComponent(target)}`).then(r => {
    const toks = view.tokens;
    const tok = p => (p >= 0 && p < toks.length) ? JSON.stringify(toks[p]) : String(p);
    out.replaceChildren(ms.el("h2", {text: `edge ${name(source)} -> ${name(target)}: ${r.edge.toFixed(4)}`}),
      ms.el("p", {cls: "note", text: "Each head's share is the sum of the edge's paths through it (exact in the frozen replacement model); per layer, the shares plus the paths through no head of that layer add up to the edge."}),
      table(["layer", "head", "share", "of edge", "strongest move (query <- key)"],
        r.top.map(h => [h.layer, h.head, h.contribution, (100 * h.fraction).toFixed(0) + "%", `${tok(h.moves[0][0])} <- ${tok(h.moves[0][1])} (${h.moves[0][2].toFixed(4)})`])));
    for (const a of r.attention) {
      out.append(ms.el("h2", {text: `why L${a.layer}H${a.head} attends ${tok(a.query_pos)} <- ${tok(a.key_pos)}: score ${a.score.toFixed(3)}, pattern ${a.pattern.toFixed(3)}`}),
        table(["query side", "key side", "score part"], a.pairs.slice(0, 10).map(p => [p.query, p.key, p.value])));
    }
    if (!r.top.length) out.append(ms.el("p", {cls: "note", text: "no head carries this edge: it runs through the residual stream at one position."}));
  }).catch(e => ms.fail(out, e));
}

function steer(view, ids) {
  const out = $("steer-out");
  const body = {nodes: ids, scale: Number($("steer-scale").value), max_new_tokens: Number($("steer-tokens").value)};
  out.replaceChildren(ms.el("p", {cls: "note", text: `steering ${ids.length} feature(s) ...`}));
  ms.api("/api/graph/steer", body).then(r => {
    const names = r.nodes.map(n => view.nodes[n.id] ? view.nodes[n.id].name : n.id).join(", ");
    out.replaceChildren(ms.el("p", {text: `steered ${names} to ${r.scale} x their activations; KL(before || after) = ${r.kl.toFixed(4)} nats`}),
      ms.el("h2", {text: "the graph's target logits"}),
      table(["token", "p before", "p after", "demeaned logit change"], r.targets.map(t => [quoted(t.token), t.prob_before, t.prob_after, t.logit_diff])),
      ms.el("h2", {text: "top next tokens"}),
      table(["before", "p", "after", "p"], r.top_before.map((t, i) => [quoted(t.token), t.prob, quoted(r.top_after[i].token), r.top_after[i].prob])),
      ms.el("h2", {text: "greedy continuation"}),
      table(["", "text"], [["before", r.continuation_before], ["after", r.continuation_after]]));
  }).catch(e => ms.fail(out, e));
}

function showNode(view, id) {
  const d = view.nodes[id];
  if (!d) return;
  const pin = ms.el("button", {cls: "pin", text: pinned.includes(id) ? "pinned" : "pin"});
  pin.addEventListener("click", () => { if (!pinned.includes(id)) { pinned.push(id); drawPins(view); pin.textContent = "pinned"; } });
  clicked = id;
  $("steer-clicked").disabled = !steerOK || !isFeature(view, id);
  const box = $("node-info");
  box.replaceChildren(ms.el("h2", {text: d.name}, pin), table(["quantity", "value"], d.rows));
  if (d.edges_in.length) {
    box.append(ms.el("h2", {text: "edges in (strongest)"}), table(["source", "weight"], d.edges_in));
    if (steerOK) {
      // which attention heads carry each incoming edge (the model re-runs: one edge at a time, on request)
      const pick = ms.el("select", {id: "edge-source"}, ...d.edges_in.map((e, i) => ms.el("option", {value: d.edges_in_ids[i], text: e[0]})));
      const go = ms.el("button", {id: "edge-heads", text: "which heads carry it?"});
      go.addEventListener("click", () => edgeHeads(view, pick.value, id));
      box.append(ms.el("p", {}, "edge from ", pick, " ", go));
    }
  }
  if (d.edges_out.length) box.append(ms.el("h2", {text: "edges out (strongest)"}), table(["target", "weight"], d.edges_out));
  showFeature(view, id);
}

ms.api("/api/graph").then(r => {
  const v = r.view;
  pinned = v.pinned.slice();
  steerOK = r.steering.available;
  if (!steerOK) $("steer-why").replaceChildren(ms.el("p", {cls: "note", text: "steering is off: " + r.steering.why}));
  $("steer-clicked").addEventListener("click", () => { if (clicked) steer(v, [clicked]); });
  $("steer-pinned").addEventListener("click", () => steer(v, pinned.filter(id => isFeature(v, id))));
  groups = (v.supernodes || []).map(g => g.slice());
  $("group-pinned").addEventListener("click", () => {
    const name = $("group-name").value.trim() || `group ${groups.length + 1}`;
    groups.push([name, ...pinned]);
    $("group-name").value = `group ${groups.length + 1}`;
    drawGroups(v);
  });
  $("export-json").addEventListener("click", exportJSON);
  document.getElementById("title").textContent = v.title;
  document.getElementById("summary").replaceChildren(...v.summary.map(([k, val, s]) =>
    ms.el("div", {cls: "card"}, ms.el("div", {cls: "k", text: k}), ms.el("div", {cls: "v", text: String(val)}), ms.el("div", {cls: "s", text: s}))));
  document.getElementById("notes").replaceChildren(...v.notes.map(n => ms.el("p", {cls: "note", text: "note: " + n})));
  Plotly.newPlot("graph", v.figure.data, v.figure.layout, {displaylogo: false, responsive: true});
  document.getElementById("graph").on("plotly_click", e => {
    const p = e.points && e.points[0];
    if (p && p.customdata !== undefined) showNode(v, p.customdata);
  });
  window.mechscopeShowNode = id => showNode(v, id);
  drawPins(v);
  drawGroups(v);
  const tables = document.getElementById("tables");
  for (const [key, title] of Object.entries(TABLES)) {
    const t = v.tables[key];
    if (t && t.rows.length) tables.append(ms.el("section", {id: "table-" + key}, ms.el("h2", {text: title}), ms.el("div", {cls: "plot-scroll"}, table(t.columns, t.rows))));
  }
}).catch(e => ms.fail(document.querySelector("main"), e));
