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
    let r;
    try { r = await fetch(path, opts); } catch (e) {
      throw new Error(`the server did not answer (${e.message}); is \`mechscope serve\` still running?`);
    }
    const data = await r.json().catch(() => ({detail: `HTTP ${r.status} ${r.statusText}`.trim()}));
    if (!r.ok) throw new Error(ms.errorText(data.detail, r.status));
    return data;
  },
  fail(where, e) { where.replaceChildren(ms.el("p", {cls: "err", text: "error: " + (e && e.message ? e.message : String(e))})); },
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
