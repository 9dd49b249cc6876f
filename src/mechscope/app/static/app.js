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
  vis(t) { return String(t).replace(/\n/g, "\\n").replace(/\t/g, "\\t").replace(/\r/g, "\\r"); },
  async api(path, body) {
    const opts = body === undefined ? {} : {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
    const r = await fetch(path, opts);
    const data = await r.json().catch(() => ({detail: r.statusText}));
    if (!r.ok) throw new Error(typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail));
    return data;
  },
  fail(where, e) { where.replaceChildren(ms.el("p", {cls: "err", text: "error: " + e.message})); },
  // one context: tokens with a background whose opacity follows the activation (max = full colour)
  context(tokens, acts, maxAct, cls) {
    const p = ms.el("div", {cls: "ctx " + (cls || "")});
    tokens.forEach((t, j) => {
      const a = acts ? acts[j] : 0;
      const s = ms.el("span", {cls: "tok", text: ms.vis(t), title: "activation " + (a || 0).toFixed(3)});
      if (a > 0 && maxAct > 0) s.style.background = `rgba(47,111,223,${Math.min(1, a / maxAct).toFixed(3)})`;
      if (a > 0 && maxAct > 0 && a / maxAct > 0.6) s.style.color = "#fff";
      p.append(s);
    });
    return p;
  },
  latLink(id) { return ms.el("a", {cls: "lat", href: "/feature/" + id, text: "#" + id}); },
  nav(active) {
    const h = document.querySelector("header");
    for (const [href, label] of [["/", "features"], ["/inspect", "prompt inspector"], ["/steer", "steering"], ["/patching", "patching"]]) {
      h.append(ms.el("a", {href, text: label, cls: href === active ? "on" : ""}));
    }
  },
};
