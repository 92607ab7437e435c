// DOM helpers. Text always goes in as textContent, never as HTML: nothing the API returns
// can become markup.
const SVG = "http://www.w3.org/2000/svg";

export function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  return fill(e, attrs, children);
}

export function svg(tag, attrs = {}, ...children) {
  const e = document.createElementNS(SVG, tag);
  return fill(e, attrs, children);
}

function fill(e, attrs, children) {
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "text") e.textContent = String(v);
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

export function clear(node, ...children) {
  node.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined));
  return node;
}

export const fmt = {
  pct: (v) => (v === null || v === undefined ? "–" : `${(v * 100).toFixed(v >= 0.9995 ? 0 : 1)}%`),
  ms: (v) => (v === null || v === undefined ? "–" : `${v < 10 ? v.toFixed(1) : Math.round(v)} ms`),
  rps: (v) => (v === null || v === undefined ? "–" : `${v < 10 ? v.toFixed(1) : Math.round(v)} rps`),
  num: (v) => (v === null || v === undefined ? "–" : String(v)),
  age: (secs) => {
    if (secs === null || secs === undefined) return "–";
    const neg = secs < 0;
    let s = Math.abs(secs);
    const d = Math.floor(s / 86400);
    s -= d * 86400;
    const h = Math.floor(s / 3600);
    const m = Math.floor((s - h * 3600) / 60);
    const text = d ? `${d}d ${h}h` : h ? `${h}h ${m}m` : `${m}m`;
    return neg ? `expired ${text} ago` : text;
  },
};

// A table from column specs: [{ title, value: (row) => text or Node, cls: (row) => class }].
export function table(columns, rows, opts = {}) {
  const head = el("tr", {}, columns.map((c) => el("th", { text: c.title })));
  const body = rows.map((r) =>
    el(
      "tr",
      opts.rowAttrs ? opts.rowAttrs(r) : {},
      columns.map((c) => {
        const v = c.value(r);
        return el("td", { class: c.cls ? c.cls(r) : undefined, "data-label": c.title }, v instanceof Node ? v : String(v ?? "–"));
      }),
    ),
  );
  const t = el("table", { class: opts.class || "grid" }, el("thead", {}, head), el("tbody", {}, body));
  if (!rows.length && opts.empty) return el("div", {}, t, el("p", { class: "muted", text: opts.empty }));
  return t;
}

// Any JSON value as nested key/value tables, so a new field of the API shows up without a
// change here. Lines named in `prominent` (summary, arithmetic) come first, large.
export function json(value, prominent = ["summary", "arithmetic", "why"]) {
  if (value === null || value === undefined) return el("span", { class: "muted", text: "–" });
  if (Array.isArray(value)) {
    if (!value.length) return el("span", { class: "muted", text: "none" });
    return el("ol", { class: "json-list" }, value.map((v) => el("li", {}, json(v, prominent))));
  }
  if (typeof value === "object") {
    const keys = Object.keys(value);
    const lead = keys.filter((k) => prominent.includes(k) && typeof value[k] === "string");
    const rest = keys.filter((k) => !lead.includes(k));
    return el(
      "div",
      { class: "json" },
      lead.map((k) => el("p", { class: `json-${k} prominent`, text: value[k] })),
      rest.length
        ? el(
            "table",
            { class: "kv" },
            el("tbody", {}, rest.map((k) => el("tr", {}, el("th", { text: k }), el("td", {}, json(value[k], prominent))))),
          )
        : null,
    );
  }
  return el("span", { class: typeof value, text: String(value) });
}

// A sparkline of `values` (nulls are gaps) as an inline SVG polyline.
export function sparkline(values, opts = {}) {
  const w = opts.width || 160;
  const h = opts.height || 32;
  const nums = values.filter((v) => typeof v === "number");
  const max = Math.max(opts.min ?? 0, ...nums, 1e-9);
  const min = opts.floor ?? Math.min(0, ...nums);
  const step = values.length > 1 ? w / (values.length - 1) : w;
  const points = values
    .map((v, i) => (typeof v === "number" ? `${(i * step).toFixed(1)},${(h - 2 - ((v - min) / (max - min || 1)) * (h - 4)).toFixed(1)}` : null))
    .filter(Boolean)
    .join(" ");
  return svg(
    "svg",
    { class: "spark", viewBox: `0 0 ${w} ${h}`, width: w, height: h, role: "img", "aria-label": opts.label || "sparkline" },
    svg("polyline", { points }),
  );
}

export function errorBox(err) {
  return el("p", { class: "error", role: "alert", text: err && err.message ? err.message : String(err) });
}
