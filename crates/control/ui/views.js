// The dashboard's views. Each takes the main element and returns a function that stops its
// timers and streams when the user leaves it.
import { get, post, stream } from "./api.js";
import { el, clear, fmt, table, json, sparkline, errorBox } from "./render.js";
import { draw, HEALTHY } from "./graph.js";

const REFRESH_MS = 2000;

// Calls `tick` now and every `ms` until stopped; a tick's error shows in `status`.
function every(ms, tick, status) {
  let alive = true;
  let timer = null;
  const run = async () => {
    try {
      await tick(() => alive);
      if (alive) clear(status);
    } catch (e) {
      if (alive) clear(status, errorBox(e));
    }
    if (alive) timer = setTimeout(run, ms);
  };
  run();
  return () => {
    alive = false;
    clearTimeout(timer);
  };
}

const id = (ns, name) => `${ns}/${name}`;
const serviceOf = (identity) => {
  const m = /^spiffe:\/\/[^/]+\/ns\/([^/]+)\/sa\/([^/]+)$/.exec(identity || "");
  return m ? id(m[1], m[2]) : null;
};
// `namespace/name:port` → `namespace/name`.
const backendService = (b) => (b || "").split(":")[0];

function section(title, ...children) {
  return el("section", { class: "card" }, el("h2", { text: title }), ...children);
}

export function topology(main) {
  const status = el("div", { class: "status" });
  const graph = el("div", { class: "graph-wrap", id: "topology" });
  const legend = el("p", { class: "muted", text: `Edges: requests per second · success rate · p99 latency, over the last 30 s; a padlock: mutual TLS; red and dashed: success below ${HEALTHY * 100}%. Select a service to open it.` });
  clear(main, el("h2", { text: "Topology" }), legend, status, graph);
  return every(REFRESH_MS, async (alive) => {
    const [stats, workloads] = await Promise.all([get("/v1/stats?window=30s"), get("/v1/resources/workloads")]);
    if (!alive()) return;
    const nodes = new Map();
    const add = (key, extra = {}) => {
      if (!nodes.has(key)) nodes.set(key, { id: key, label: key.split("/")[1] || key, sub: "", ...extra });
      return nodes.get(key);
    };
    for (const w of workloads.items) add(id(w.namespace, w.service));
    for (const s of stats.services) {
      const n = add(id(s.namespace, s.name));
      n.sub = `${fmt.rps(s.rps)} · ${fmt.pct(s.successRate)}`;
      n.unhealthy = s.successRate !== null && s.successRate < HEALTHY;
    }
    const edges = stats.edges.map((e) => {
      const src = e.srcService ? id(e.srcNamespace, e.srcService) : "(no identity)";
      if (!e.srcService) add(src, { external: true });
      else add(src);
      return { src, dst: id(e.dstNamespace, e.dstService), rps: e.rps, successRate: e.successRate, p99Ms: e.p99Ms, mtls: e.mtls };
    });
    for (const n of nodes.values()) {
      if (n.label === "load-generator" || (!n.sub && !n.external)) n.sub ||= "client only";
    }
    const narrow = window.matchMedia("(max-width: 720px)").matches;
    clear(graph, draw([...nodes.values()], edges, (svc) => (location.hash = `#/service/${svc}`), narrow));
  }, status);
}

export function services(main) {
  const status = el("div", { class: "status" });
  const body = el("div");
  clear(main, el("h2", { text: "Services" }), status, body);
  return every(REFRESH_MS, async (alive) => {
    const [stats, workloads] = await Promise.all([get("/v1/stats?window=30s"), get("/v1/resources/workloads")]);
    if (!alive()) return;
    const rows = new Map();
    for (const w of workloads.items) rows.set(id(w.namespace, w.service), { namespace: w.namespace, name: w.service });
    for (const s of stats.services) rows.set(id(s.namespace, s.name), s);
    const link = (r) => el("a", { href: `#/service/${r.namespace}/${r.name}`, text: id(r.namespace, r.name) });
    clear(
      body,
      table(
        [
          { title: "service", value: link },
          { title: "instances", value: (r) => workloads.items.filter((w) => w.namespace === r.namespace && w.service === r.name).length },
          { title: "success", value: (r) => fmt.pct(r.successRate), cls: (r) => (r.successRate < HEALTHY ? "bad" : "") },
          { title: "rps", value: (r) => fmt.rps(r.rps) },
          { title: "p50", value: (r) => fmt.ms(r.p50Ms) },
          { title: "p99", value: (r) => fmt.ms(r.p99Ms) },
        ],
        [...rows.values()],
        { empty: "No services registered yet." },
      ),
    );
  }, status);
}

export function service(main, ns, name) {
  const status = el("div", { class: "status" });
  const golden = el("div", { class: "golden", id: "golden" });
  const instances = el("div", { id: "instances" });
  const routes = el("div", { id: "routes" });
  const authz = el("div", { id: "authz" });
  const decisions = el("div", { id: "authz-decisions" });
  clear(
    main,
    el("h2", {}, el("a", { href: "#/services", text: "Services" }), ` / ${ns}/${name}`),
    status,
    section("Golden metrics (last 30 s; sparklines: last 5 min in 10 s steps)", golden),
    section("Instances", instances),
    section("Routes to it (what callers' sidecars sent)", routes),
    section("Authorization decisions (last 30 s, at its sidecars)", decisions),
    section("Authorization policies", authz),
  );
  const q = `namespace=${encodeURIComponent(ns)}&service=${encodeURIComponent(name)}`;
  return every(REFRESH_MS, async (alive) => {
    const [stats, history, allRoutes, workloads, proxies, svcs, policies] = await Promise.all([
      get(`/v1/stats?window=30s&${q}`),
      get(`/v1/stats/history?window=5m&step=10s&${q}`),
      get("/v1/stats?window=30s"),
      get(`/v1/resources/workloads?namespace=${encodeURIComponent(ns)}`),
      get(`/v1/resources/proxies?namespace=${encodeURIComponent(ns)}`),
      get("/v1/resources/Service"),
      get(`/v1/resources/AuthorizationPolicy`),
    ]);
    if (!alive()) return;
    const row = stats.services.find((s) => s.namespace === ns && s.name === name) || {};
    const series = (f) => history.points.map((p) => {
      const s = p.services.find((s) => s.namespace === ns && s.name === name);
      return s ? f(s) : null;
    });
    const metric = (key, title, value, values, bad) =>
      el("div", { class: `metric${bad ? " bad" : ""}`, "data-metric": key }, el("span", { class: "metric-title", text: title }), el("span", { class: "metric-value", text: value }), sparkline(values, { label: title }));
    clear(
      golden,
      metric("rps", "requests/s", fmt.rps(row.rps), series((s) => s.rps)),
      metric("success", "success rate", fmt.pct(row.successRate), series((s) => s.successRate), row.successRate < HEALTHY),
      metric("p50", "p50 latency", fmt.ms(row.p50Ms), series((s) => s.p50Ms)),
      metric("p99", "p99 latency", fmt.ms(row.p99Ms), series((s) => s.p99Ms)),
      metric("requests", "requests in window", fmt.num(row.requests), series((s) => s.requests)),
    );
    const mine = workloads.items.filter((w) => w.service === name);
    const proxyOf = (w) => proxies.items.find((p) => p.node === w.node);
    // What callers' sidecars see of each instance: only those not plainly healthy are listed.
    const outlier = (w) => (stats.instances || []).find((i) => i.address === w.address);
    const outlierText = (w) => {
      const o = outlier(w);
      if (!o) return "ok";
      const until = o.ejectedUntilUnixMs ? ` until ${new Date(o.ejectedUntilUnixMs).toLocaleTimeString()}` : "";
      return o.ejectedBy ? o.summary.replace(/^(ejected by [^,;]+)/, `$1${until}`) : o.summary;
    };
    clear(
      instances,
      table(
        [
          { title: "instance", value: (w) => w.id },
          { title: "address", value: (w) => w.address },
          { title: "health", value: (w) => (w.healthy ? "healthy" : "unhealthy"), cls: (w) => (w.healthy ? "good" : "bad") },
          { title: "zone", value: (w) => [w.region, w.zone].filter(Boolean).join(" / ") || "–" },
          { title: "labels", value: (w) => Object.entries(w.labels || {}).map(([k, v]) => `${k}=${v}`).join(", ") },
          { title: "identity", value: (w) => w.identity || "–" },
          { title: "config acked", value: (w) => (proxyOf(w) ? proxyOf(w).ackedVersion || "pending" : "–") },
          { title: "outlier state", value: outlierText, cls: (w) => (outlier(w) && outlier(w).ejectedBy ? "bad" : "") },
        ],
        mine,
        { empty: "No registered instances.", rowAttrs: (w) => ({ "data-address": w.address }) },
      ),
    );
    // Routes whose backend is this service, or a Service selecting its instances (a canary's
    // version subsets), with each backend's share of the route's traffic: the split.
    const selects = new Set(
      svcs.items
        .filter((s) => s.metadata.namespace === ns && (s.metadata.name === name || (s.spec.selector && s.spec.selector.app === name)))
        .map((s) => id(s.metadata.namespace, s.metadata.name)),
    );
    selects.add(id(ns, name));
    const mineRoutes = allRoutes.routes.filter((r) => selects.has(backendService(r.backend)));
    const perRoute = new Map();
    for (const r of mineRoutes) perRoute.set(r.name, (perRoute.get(r.name) || 0) + r.rps);
    clear(
      routes,
      table(
        [
          { title: "route", value: (r) => r.name },
          { title: "backend", value: (r) => r.backend },
          { title: "share", value: (r) => (perRoute.get(r.name) ? fmt.pct(r.rps / perRoute.get(r.name)) : "–") },
          { title: "rps", value: (r) => fmt.rps(r.rps) },
          { title: "success", value: (r) => fmt.pct(r.successRate), cls: (r) => (r.successRate < HEALTHY ? "bad" : "") },
          { title: "p99", value: (r) => fmt.ms(r.p99Ms) },
        ],
        mineRoutes,
        { empty: "No traffic to it through a route in the window.", rowAttrs: (r) => ({ "data-backend": r.backend }) },
      ),
    );
    const rule = (r) => (r.rule === null || r.rule === undefined ? "–" : `rule ${r.rule}`);
    clear(
      decisions,
      table(
        [
          { title: "policy", value: (r) => r.policy },
          { title: "rule", value: rule },
          { title: "allowed", value: (r) => fmt.num(r.allow) },
          { title: "denied", value: (r) => fmt.num(r.deny), cls: (r) => (r.deny ? "bad" : "") },
          { title: "audit: would deny", value: (r) => fmt.num(r.auditDeny) },
          { title: "decisions/s", value: (r) => fmt.rps(r.rps) },
          { title: "denied/s", value: (r) => fmt.rps(r.denyRps) },
        ],
        stats.authz || [],
        { empty: "No authorization decisions in the window: no policy applies at its sidecars, or no requests came.", rowAttrs: (r) => ({ "data-policy": r.policy }) },
      ),
    );
    const applies = policies.items.filter((p) => p.metadata.namespace === ns);
    clear(
      authz,
      table(
        [
          { title: "policy", value: (p) => id(p.metadata.namespace, p.metadata.name) },
          { title: "version", value: (p) => p.metadata.resourceVersion },
          { title: "spec", value: (p) => json(p.spec) },
        ],
        applies,
        { empty: "No AuthorizationPolicy in this namespace: every authenticated caller is allowed unless the mesh default says otherwise." },
      ),
    );
  }, status);
}

const SENSITIVE = /^(authorization|proxy-authorization|cookie|set-cookie|x-api-key)$/i;

export function tap(main) {
  const status = el("div", { class: "status" });
  const field = (key, label, placeholder) =>
    el("label", {}, label, el("input", { name: key, placeholder: placeholder || "", autocomplete: "off" }));
  const form = el(
    "form",
    { class: "filters", id: "tap-form" },
    field("namespace", "namespace"),
    field("service", "service"),
    field("method", "method", "GET"),
    field("path", "path prefix", "/"),
    field("status", "status", "5xx"),
    el("label", {}, "direction", el("select", { name: "direction" }, el("option", { value: "", text: "both" }), el("option", { value: "inbound", text: "inbound" }), el("option", { value: "outbound", text: "outbound" }))),
    el("button", { type: "submit", id: "tap-start", text: "Start" }),
    el("button", { type: "button", id: "tap-stop", text: "Stop" }),
  );
  const info = el("p", { class: "muted", id: "tap-info", text: "Sensitive headers (authorization, cookies, API keys and those your Telemetry names) are redacted by the sidecars before they leave them." });
  const rows = el("tbody");
  const explain = el("section", { class: "card", id: "explain" }, el("h2", { text: "Explanation" }), el("p", { class: "muted", text: "Pick a request to explain it." }));
  clear(
    main,
    el("h2", { text: "Live tap" }),
    form,
    info,
    status,
    el("div", { class: "tap-layout" },
      el("div", { class: "scroll tap-scroll" }, el("table", { class: "grid", id: "tap-table" }, el("thead", {}, el("tr", {}, ["time", "proxy", "dir", "method", "authority", "path", "status", "latency", "route", "mTLS"].map((t) => el("th", { text: t })))), rows)),
      explain,
    ),
  );
  let controller = null;
  const stop = () => {
    if (controller) controller.abort();
    controller = null;
  };
  const pick = async (ev, tr) => {
    for (const r of rows.querySelectorAll(".picked")) r.classList.remove("picked");
    tr.classList.add("picked");
    const body = ev.requestId
      ? { requestId: ev.requestId }
      : {
          service: ev.proxy,
          request: {
            source: ev.srcIdentity || ev.proxy,
            method: ev.method,
            authority: ev.authority,
            path: ev.path,
            headers: Object.fromEntries(Object.entries(ev.headers || {}).filter(([k]) => !SENSITIVE.test(k))),
          },
        };
    clear(explain, el("h2", { text: "Explanation" }), el("p", { class: "muted", text: `${ev.method} ${ev.authority}${ev.path} → ${ev.status}` }), el("p", { class: "muted", text: "asking the control plane…" }));
    try {
      const answer = await post("/v1/explain", body);
      clear(explain, el("h2", { text: "Explanation" }), json(answer));
    } catch (e) {
      clear(explain, el("h2", { text: "Explanation" }), errorBox(e));
    }
  };
  const start = async () => {
    stop();
    const mine = new AbortController();
    controller = mine;
    const params = new URLSearchParams({ headers: "true", max: "500", duration: "60s" });
    for (const [k, v] of new FormData(form).entries()) if (v) params.set(k, v);
    clear(status);
    info.textContent = "starting…";
    try {
      await stream(`/v1/tap?${params}`, (line) => {
        if (line.started) info.textContent = `tapping ${line.started.proxies} proxies…`;
        else if (line.event) {
          const ev = line.event;
          const tr = el(
            "tr",
            { class: ev.status >= 500 ? "bad" : "", "data-status": ev.status, tabindex: 0 },
            [
              new Date(ev.timeUnixMs).toLocaleTimeString(),
              ev.proxy,
              ev.direction,
              ev.method,
              ev.authority,
              ev.path,
              ev.grpcStatus ? `${ev.status} (grpc ${ev.grpcStatus})` : ev.status,
              fmt.ms(ev.latencyMs),
              ev.route || "–",
              ev.tls ? "yes" : "no",
            ].map((v, i) => el("td", { "data-label": ["time", "proxy", "dir", "method", "authority", "path", "status", "latency", "route", "mTLS"][i], text: v })),
          );
          tr.addEventListener("click", () => pick(ev, tr));
          rows.prepend(tr);
          while (rows.children.length > 100) rows.lastChild.remove();
        } else if (line.end) {
          info.textContent = `tap ended (${line.end.reason}): ${line.end.events} events, ${line.end.dropped} dropped`;
        }
      }, mine.signal);
    } catch (e) {
      if (e.name !== "AbortError") clear(status, errorBox(e));
      else info.textContent = "stopped";
    }
    if (controller === mine) controller = null;
  };
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    start();
  });
  form.querySelector("#tap-stop").addEventListener("click", stop);
  start();
  return stop;
}

const KINDS = ["Service", "HTTPRoute", "GRPCRoute", "BackendPolicy", "MeshConfig", "AuthorizationPolicy", "RequestAuthentication", "FaultInjection", "Telemetry", "RateLimitPolicy", "OverloadPolicy"];

function conditions(r) {
  if (!r.status || !r.status.parents) return "–";
  return el(
    "ul",
    { class: "conditions" },
    r.status.parents.flatMap((p) =>
      p.conditions.map((c) => el("li", { class: c.status === "True" ? "good" : "bad", text: `${c.type}=${c.status} (${c.reason}) ${c.message || ""}` })),
    ),
  );
}

export function config(main) {
  const status = el("div", { class: "status" });
  const proxies = el("div", { id: "proxies" });
  const resources = el("div", { id: "resources" });
  clear(main, el("h2", { text: "Config" }), status, section("Proxies: acknowledged versions and refusals", proxies), section("Resources", resources));
  return every(5000, async (alive) => {
    const [px, ...lists] = await Promise.all([get("/v1/resources/proxies"), ...KINDS.map((k) => get(`/v1/resources/${k}`))]);
    if (!alive()) return;
    clear(
      proxies,
      el("p", { class: "muted", text: `store revision ${px.revision}` }),
      table(
        [
          { title: "proxy", value: (p) => p.node },
          { title: "service", value: (p) => (p.service ? id(p.namespace, p.service) : `${p.namespace} (client)`) },
          { title: "acked", value: (p) => p.ackedVersion || "none yet" },
          { title: "state", value: (p) => (p.nack ? "NACK" : p.pending ? "pending" : "in sync"), cls: (p) => (p.nack ? "bad" : p.pending ? "warn" : "good") },
          { title: "refused", value: (p) => (p.nack ? `${p.nackVersion}: ${p.nack}` : "–") },
          { title: "resources", value: (p) => p.resources },
          { title: "version", value: (p) => p.proxyVersion },
        ],
        px.items,
        { empty: "No proxy is connected." },
      ),
    );
    const all = lists.flatMap((l, i) => l.items.map((r) => ({ kind: KINDS[i], r })));
    clear(
      resources,
      table(
        [
          { title: "kind", value: (x) => x.kind },
          { title: "name", value: (x) => id(x.r.metadata.namespace, x.r.metadata.name) },
          { title: "version", value: (x) => x.r.metadata.resourceVersion },
          { title: "status", value: (x) => conditions(x.r) },
        ],
        all,
        { empty: "No config resources: the mesh runs on its defaults.", rowAttrs: (x) => ({ "data-kind": x.kind, "data-name": x.r.metadata.name }) },
      ),
    );
  }, status);
}

export function certificates(main) {
  const status = el("div", { class: "status" });
  const body = el("div", { id: "certificates" });
  clear(main, el("h2", { text: "Certificates" }), status, body);
  return every(5000, async (alive) => {
    const c = await get("/v1/certificates");
    if (!alive()) return;
    const soon = (x) => (x.secondsLeft < 0 ? "bad" : x.secondsLeft < 3600 ? "warn" : "good");
    clear(
      body,
      c.ca ? section("Certificate authority", el("p", { class: soon(c.ca) }, `trust domain ${c.ca.trustDomain}; expires ${c.ca.notAfter} (in ${fmt.age(c.ca.secondsLeft)})`)) : null,
      section(
        "Workloads (the certificate each connected sidecar holds)",
        table(
          [
            { title: "identity", value: (w) => w.identity },
            { title: "service", value: (w) => (w.service ? id(w.namespace, w.service) : `${w.namespace} (client)`) },
            { title: "proxy", value: (w) => w.node },
            { title: "expires", value: (w) => w.notAfter },
            { title: "left", value: (w) => fmt.age(w.secondsLeft), cls: soon },
          ],
          c.workloads,
          { empty: "No sidecar holds a certificate (they connect with mutual TLS once they have one).", rowAttrs: () => ({ class: "cert" }) },
        ),
      ),
    );
  }, status);
}

export function capacity(main) {
  const status = el("div", { class: "status" });
  const form = el(
    "form",
    { class: "filters", id: "capacity-form" },
    el("label", {}, "latency objective (ms)", el("input", { name: "latencyObjectiveMs", type: "number", min: "1", value: "100" })),
    el("label", {}, "target utilization", el("input", { name: "targetUtilization", type: "number", min: "0.05", max: "1", step: "0.05", value: "0.6" })),
    el("button", { type: "submit", text: "Compute" }),
  );
  const body = el("div", { id: "capacity" });
  clear(main, el("h2", { text: "Capacity" }), form, status, body);
  const load = async () => {
    const params = new URLSearchParams();
    for (const [k, v] of new FormData(form).entries()) if (v) params.set(k, v);
    try {
      const c = await get(`/v1/capacity?${params}`);
      clear(status);
      const services = Array.isArray(c.services) ? c.services : [];
      clear(
        body,
        c.objective ? section("Objective", json(c.objective)) : null,
        services.map((s) => section(s.service || "service", json(s, ["arithmetic", "summary"]))),
        json(Object.fromEntries(Object.entries(c).filter(([k]) => k !== "objective" && k !== "services"))),
      );
    } catch (e) {
      clear(status, errorBox(e));
      clear(body);
    }
  };
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    load();
  });
  load();
  return () => {};
}
