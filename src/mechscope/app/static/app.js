// mechscope web app: every string from the server is put in the page with textContent, never as HTML.
"use strict";
const ms = {
  el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") e.textContent = v; else if (k === "cls") e.className = v; else e.setAttribute(k, v);
    }
    for (const k of kids) if (k != null) e.append(k);
    return e;
  },
  // a string for places that take plain text only (plot labels): newlines, tabs and invisible characters as escapes
  vis(t) {
    return String(t).replace(/\n/g, "\\n").replace(/\t/g, "\\t").replace(/\r/g, "\\r")
      .replace(/[\p{Cc}\p{Cf}\u00a0\u2028\u2029]/gu, c => "\\u" + c.codePointAt(0).toString(16).padStart(4, "0"));
  },
  // Characters made visible inside a token. The character itself stays in the page (copying the text or
  // reading textContent gives the exact text); the marker is CSS generated content (app.css: .sp .nl .tab .cc).
  // Each invisible or control character is a bidi isolate, so an override (U+202E) reorders nothing else.
  tok(text, cls) {
    const s = ms.el("span", {cls: "tok" + (String(text).length > ms.LONG_TOKEN ? " long" : "") + (cls ? " " + cls : "")});
    String(text).split(/([\p{Cc}\p{Cf}\p{Z}])/u).forEach((part, i) => {
      if (!part) return;
      if (i % 2 === 0) { s.append(part); return; }
      const cp = part.codePointAt(0);
      const kind = part === " " ? "sp" : part === "\n" ? "nl" : part === "\t" ? "tab" : "cc";
      const m = ms.el("span", {cls: kind, text: part});
      if (kind === "cc") m.dataset.cp = "U+" + cp.toString(16).toUpperCase().padStart(4, "0");
      s.append(m);
    });
    return s;
  },
  // tokens -> what is drawn: a token with an empty span (it holds only leading bytes of a character that a
  // later token completes) is merged with the following tokens up to the one that completes it
  groups(tokens, acts) {
    const out = [];
    let pos = [];
    tokens.forEach((t, j) => {
      pos.push(j);
      if (t !== "" || j === tokens.length - 1) {
        out.push({text: pos.map(i => tokens[i]).join(""), pos, act: Math.max(...pos.map(i => (acts && acts[i]) || 0))});
        pos = [];
      }
    });
    return out;
  },
  WINDOW_BEFORE: 30, WINDOW_AFTER: 10, LONG_TOKEN: 24,
  async api(path, body) {
    const opts = body === undefined ? {} : {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
    let r;
    try { r = await fetch(path, opts); } catch (e) {
      throw new Error(`the server did not answer (${e.message}); is \`mechscope serve\` still running?`);
    }
    const data = await r.json().catch(() => ({detail: `HTTP ${r.status} ${r.statusText}`.trim()}));
    if (!r.ok) throw new Error(ms.errorText(data.detail, r.status));
    return data;
  },
  fail(where, e) { where.replaceChildren(ms.el("p", {cls: "err", text: "error: " + (e && e.message ? e.message : String(e))})); },
  // One context (an example of FeatureDB.feature): tokens with a background whose opacity follows the
  // activation (max = full colour), the peak outlined. Shown: a window of WINDOW_BEFORE tokens before the
  // peak and WINDOW_AFTER after it; a button shows the whole context. Lines wrap between tokens.
  context(ex, maxAct, cls) {
    const tokens = ex.tokens || [], acts = ex.acts || [];
    const groups = ms.groups(tokens, acts);
    let peak = Number.isInteger(ex.max_pos) ? ex.max_pos : acts.indexOf(Math.max(...acts));
    const pg = Math.max(0, groups.findIndex(g => g.pos.includes(peak)));
    peak = groups.length ? groups[pg].pos[groups[pg].pos.length - 1] : 0;
    const lo = peak - ms.WINDOW_BEFORE, hi = peak + ms.WINDOW_AFTER;
    const box = ms.el("div", {cls: "ctx " + (cls || "")});
    const line = ms.el("span", {cls: "toks"});
    let hidden = 0;
    groups.forEach((g, k) => {
      const s = ms.tok(g.text, k === pg ? "peak" : "");
      const first = g.pos[0], last = g.pos[g.pos.length - 1];
      s.dataset.pos = String(first);
      s.title = g.pos.length === 1 ? `position ${first}: activation ${g.act.toFixed(3)}`
        : `positions ${first}-${last} (one character over ${g.pos.length} tokens): activations ` +
          g.pos.map(i => (acts[i] || 0).toFixed(3)).join(", ");
      if (g.act > 0 && maxAct > 0) {
        s.style.background = `rgba(47,111,223,${Math.min(1, g.act / maxAct).toFixed(3)})`;
        if (g.act / maxAct > 0.6) s.style.color = "#fff";
      }
      if (last < lo) { s.classList.add("out"); box.classList.add("cut-before"); hidden += 1; }
      if (first > hi) { s.classList.add("out"); box.classList.add("cut-after"); hidden += 1; }
      if (k) line.append(document.createElement("wbr"));  // lines break between tokens, never inside a short one
      line.append(s);
    });
    box.append(line);
    if (hidden) {
      box.classList.add("windowed");
      const b = ms.el("button", {type: "button", cls: "expand", text: `whole context (${tokens.length} tokens)`});
      b.addEventListener("click", () => {
        const full = box.classList.toggle("full");
        b.textContent = full ? "window around the peak" : `whole context (${tokens.length} tokens)`;
      });
      box.append(b);
    }
    return box;
  },
  latLink(id) { return ms.el("a", {cls: "lat", href: "/feature/" + id, text: "#" + id}); },
  nav(active) {
    const h = document.querySelector("header");
    for (const [href, label] of [["/", "features"], ["/inspect", "prompt inspector"], ["/steer", "steering"], ["/patching", "patching"], ["/circuit", "circuit"], ["/probe", "probes"], ["/graph", "graph"]]) {
      h.append(ms.el("a", {href, text: label, cls: href === active ? "on" : ""}));
    }
  },
  // an error response's detail as text: a string as it is; a FastAPI validation list as "field: message" lines
  errorText(detail, status) {
    if (typeof detail === "string" && detail) return detail;
    if (Array.isArray(detail) && detail.length) {
      return detail.map(d => {
        const field = (d.loc || []).filter((p, i) => !(i === 0 && ["body", "query", "path"].includes(p))).join(".");
        return `${field || "request"}: ${d.msg || "invalid"}`;
      }).join("\n");
    }
    return `the server answered HTTP ${status} without a message.`;
  },
};
