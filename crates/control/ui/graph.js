// The topology graph, drawn as SVG: services in columns by their depth from the callers that
// nobody calls, edges labelled with rps, success rate, p99 and a lock for mutual TLS.
import { svg, fmt } from "./render.js";

// Wide screens: callers left, callees right. Narrow screens: top to bottom, smaller boxes.
const WIDE = { nodeW: 170, nodeH: 44, depthGap: 380, siblingGap: 100, vertical: false };
const NARROW = { nodeW: 112, nodeH: 44, depthGap: 130, siblingGap: 124, vertical: true };

// An edge is unhealthy below this success rate.
export const HEALTHY = 0.95;

export function layout(nodes, edges, g = WIDE) {
  const depth = new Map(nodes.map((n) => [n, 0]));
  // Longest path from a root, bounded by the node count (cycles stop there).
  for (let i = 0; i < nodes.length; i++) {
    let moved = false;
    for (const e of edges) {
      if (e.src === e.dst) continue;
      const d = (depth.get(e.src) ?? 0) + 1;
      if (d > (depth.get(e.dst) ?? 0) && d < nodes.length) {
        depth.set(e.dst, d);
        moved = true;
      }
    }
    if (!moved) break;
  }
  const columns = [];
  for (const n of [...nodes].sort()) {
    const d = depth.get(n);
    (columns[d] ||= []).push(n);
  }
  const widest = Math.max(1, ...columns.map((c) => (c ? c.length : 0)));
  const pos = new Map();
  columns.forEach((col, d) => {
    if (!col) return;
    const offset = ((widest - col.length) * g.siblingGap) / 2;
    col.forEach((n, i) => {
      const along = 20 + d * g.depthGap;
      const across = 20 + offset + i * g.siblingGap;
      pos.set(n, g.vertical ? { x: across, y: along } : { x: along, y: across });
    });
  });
  const long = 40 + (columns.length - 1) * g.depthGap + (g.vertical ? g.nodeH : g.nodeW);
  const short = 40 + (widest - 1) * g.siblingGap + (g.vertical ? g.nodeW : g.nodeH);
  return g.vertical ? { pos, width: short, height: long } : { pos, width: long, height: short };
}

// A padlock, drawn (no emoji font needed), for mutual TLS.
function lock(x, y) {
  return svg(
    "g",
    { class: "lock", transform: `translate(${x} ${y})` },
    svg("title", { text: "mutual TLS" }),
    svg("path", { d: "M 2 5 V 3 a 3 3 0 0 1 6 0 V 5", class: "lock-shackle" }),
    svg("rect", { x: 0, y: 5, width: 10, height: 7, rx: 1.5, class: "lock-body" }),
  );
}

// `nodes`: [{ id, label, sub, unhealthy, external }]; `edges`: [{ src, dst, rps,
// successRate, p99Ms, mtls }]. `narrow` lays it out top to bottom.
export function draw(nodes, edges, onOpen, narrow = false) {
  const g = narrow ? NARROW : WIDE;
  const { pos, width, height } = layout(nodes.map((n) => n.id), edges, g);
  const root = svg("svg", {
    id: "topology-graph",
    class: narrow ? "narrow" : "wide",
    viewBox: `0 0 ${width} ${height}`,
    width,
    height,
    role: "img",
    "aria-label": "service graph",
  });
  root.append(
    svg("defs", {}, svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" }, svg("path", { d: "M 0 0 L 10 5 L 0 10 z", class: "arrowhead" }))),
  );
  const incoming = new Map();
  for (const e of edges) {
    const a = pos.get(e.src);
    const b = pos.get(e.dst);
    if (!a || !b) continue;
    // Several callers of one service: their labels stack instead of overlapping.
    const k = incoming.get(e.dst) || 0;
    incoming.set(e.dst, k + 1);
    const bad = e.successRate !== null && e.successRate !== undefined && e.successRate < HEALTHY;
    let d, lx, ly, anchor;
    if (g.vertical) {
      const [x1, y1, x2, y2] = [a.x + g.nodeW / 2, a.y + g.nodeH, b.x + g.nodeW / 2, b.y];
      const mid = (y1 + y2) / 2;
      d = `M ${x1} ${y1} C ${x1} ${mid}, ${x2} ${mid}, ${x2} ${y2 - 2}`;
      [lx, ly, anchor] = [x2, y2 - 34 - k * 30, "middle"];
    } else {
      const [x1, y1, x2, y2] = [a.x + g.nodeW, a.y + g.nodeH / 2, b.x, b.y + g.nodeH / 2];
      const mid = (x1 + x2) / 2;
      d = `M ${x1} ${y1} C ${mid} ${y1}, ${mid} ${y2}, ${x2 - 2} ${y2}`;
      [lx, ly, anchor] = [x2 - 12, y2 - 22 - k * 30, "end"];
    }
    const first = `${fmt.rps(e.rps)} · ${fmt.pct(e.successRate)}`;
    const second = `p99 ${fmt.ms(e.p99Ms)}`;
    const edge = svg(
      "g",
      { class: `edge${bad ? " unhealthy" : ""}`, "data-src": e.src, "data-dst": e.dst, "data-mtls": e.mtls ? "true" : "false" },
      svg("title", { text: `${e.src} → ${e.dst}: ${first} · ${second}${e.mtls ? " · mutual TLS" : " · no mutual TLS"}` }),
      svg("path", { d, "marker-end": "url(#arrow)" }),
      svg("text", { x: lx, y: ly, "text-anchor": anchor, class: "edge-label" }, svg("tspan", { x: lx, text: first }), svg("tspan", { x: lx, dy: 13, text: second })),
    );
    if (e.mtls) edge.append(lock(anchor === "end" ? lx + 2 : lx + 36, ly + 3));
    root.append(edge);
  }
  for (const n of nodes) {
    const p = pos.get(n.id);
    const node = svg(
      "g",
      {
        class: `node${n.unhealthy ? " unhealthy" : ""}${n.external ? " external" : ""}`,
        "data-service": n.id,
        transform: `translate(${p.x} ${p.y})`,
        tabindex: n.external ? undefined : 0,
        role: n.external ? undefined : "link",
      },
      svg("title", { text: n.id }),
      svg("rect", { width: g.nodeW, height: g.nodeH, rx: 8 }),
      svg("text", { x: 8, y: 18, class: "node-name", text: n.label }),
      svg("text", { x: 8, y: 35, class: "node-sub", text: n.sub || "" }),
    );
    if (!n.external) {
      node.addEventListener("click", () => onOpen(n.id));
      node.addEventListener("keydown", (ev) => {
        if (ev.key === "Enter") onOpen(n.id);
      });
    }
    root.append(node);
  }
  return root;
}
