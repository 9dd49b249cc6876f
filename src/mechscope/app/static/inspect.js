// Prompt inspector: the latents firing on each token, the logit lens at the last position, and one layer's
// attention pattern per head as a heatmap (white = 0, dark blue = 1; it grows with the prompt and scrolls).
"use strict";
ms.nav("/inspect");
const $ = id => document.getElementById(id);
// ColorBrewer "Blues" from light to dark. plotly's own "Blues" runs the other way (0 dark, 1 light-grey),
// which made the strongest attention look like the page's background.
const ATTENTION_SCALE = [[0, "#ffffff"], [0.125, "#deebf7"], [0.25, "#c6dbef"], [0.375, "#9ecae1"], [0.5, "#6baed6"],
  [0.625, "#4292c6"], [0.75, "#2171b5"], [0.875, "#08519c"], [1, "#08306b"]];
const LABEL_CHARS = 14;
let last = null;

// a token as plotly text: plotly reads "<b>", "<br>" and "&amp;" in labels as its own markup, so escape them
function plotText(t) { return t.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;"); }

function tickLabel(tok, i) {
  const t = ms.vis(tok);
  return plotText(`${t.length > LABEL_CHARS ? t.slice(0, LABEL_CHARS - 1) + "…" : t} ${i}`);
}

function drawHead() {
  if (!last || !window.Plotly) return;
  const h = Number($("head").value || 0), n = last.tokens.length;
  const names = last.labels || last.tokens;  // each token shown alone (a byte fragment as an escape)
  const idx = names.map((_, i) => i), ticks = names.map(tickLabel);
  const full = names.map(t => plotText(ms.vis(t)));
  const cell = n <= 16 ? 28 : n <= 48 ? 18 : 14;  // pixels per token: every tick label stays readable
  const side = Math.max(240, n * cell);
  const labelPx = 18 + 7 * Math.max(...ticks.map(t => t.length));
  const z = last.attention.pattern[h];
  Plotly.newPlot("attn", [{type: "heatmap", z, x: idx, y: idx, colorscale: ATTENTION_SCALE, reversescale: false,
    zmin: 0, zmax: 1, colorbar: {title: {text: "attention", side: "right"}, thickness: 14},
    text: z.map((row, q) => row.map((_, k) => `${full[q]} (${q}) → ${full[k]} (${k})`)),
    hovertemplate: "%{text}<br>attention %{z:.3f}<extra></extra>"}],
  {width: side + labelPx + 110, height: side + labelPx + 20, margin: {l: labelPx, r: 10, t: 10, b: labelPx},
    xaxis: {tickvals: idx, ticktext: ticks, tickangle: -60, tickfont: {size: 11}, title: {text: "key (attended to)"}},
    yaxis: {autorange: "reversed", tickvals: idx, ticktext: ticks, tickfont: {size: 11}, title: {text: "query"}}},
  {displaylogo: false});
}

$("head").addEventListener("change", drawHead);
$("f").addEventListener("submit", ev => {
  ev.preventDefault();
  const layer = $("layer").value.trim();
  const body = {text: $("text").value};
  const t = $("tokens");
  if (layer !== "") {
    if (!/^\d+$/.test(layer)) { ms.fail(t, new Error(`layer: “${layer}” is not a layer number; enter a whole number, or leave it empty for the middle layer.`)); return; }
    body.layer = Number(layer);
  }
  t.replaceChildren(ms.el("tr", {}, ms.el("td", {cls: "note", text: "running…"})));
  ms.api("/api/inspect", body).then(r => {
    last = r;
    t.replaceChildren(ms.el("tr", {}, ms.el("th", {text: "position"}), ms.el("th", {text: "token"}), ms.el("th", {text: "top latents (activation)"})));
    // one row per position: the token shown alone (a byte fragment of a character as escapes)
    (r.labels || r.tokens).forEach((tok, i) => t.append(ms.el("tr", {cls: "tok-row"}, ms.el("td", {cls: "n", text: String(i)}),
      ms.el("td", {}, ms.tok(tok)),
      ms.el("td", {}, ...((r.features || [])[i] || []).map(f => ms.el("span", {cls: "pill"}, ms.latLink(f.id), ms.el("span", {text: " " + f.act.toFixed(2)})))))));
    const lens = $("lens");
    lens.replaceChildren(ms.el("tr", {}, ms.el("th", {text: "layer"}), ms.el("th", {text: "top tokens"})));
    r.lens.labels.forEach((l, i) => lens.append(ms.el("tr", {}, ms.el("td", {text: l}),
      ms.el("td", {}, ...r.lens.top_tokens[i].map((tk, j) => ms.el("span", {cls: "pill"}, ms.tok(tk), ` ${r.lens.top_probs[i][j].toFixed(2)}`))))));
    $("atitle").textContent = `Attention, layer ${r.attention.layer}`;
    $("head").replaceChildren(...Array.from({length: r.attention.n_heads}, (_, h) => ms.el("option", {value: String(h), text: "head " + h})));
    drawHead();
  }).catch(e => ms.fail(t, e));
});
