// The dashboard in a real browser against a live demo mesh:
//   node tests/browser/dashboard.mjs CONTROL_URL ADMIN_TOKEN_FILE ARTIFACT_DIR CANARY_YAML
// BROWSER=chromium (Debian's chromium, CHROMIUM, default /usr/bin/chromium, over CDP) or
// BROWSER=firefox (Debian's firefox-esr, FIREFOX, default /usr/bin/firefox-esr, over WebDriver
// BiDi), both driven by puppeteer-core; no browser download. Any console error, page error,
// failed request or unexpected HTTP error fails it. Screenshots go to ARTIFACT_DIR. Bounded:
// it gives up after TOTAL_MS.
import puppeteer from "puppeteer-core";
import { request as httpsRequest } from "node:https";
import { mkdirSync, readFileSync } from "node:fs";
import { join } from "node:path";

const [url, tokenFile, artifacts, canaryFile] = process.argv.slice(2);
if (!url || !tokenFile || !artifacts || !canaryFile) {
  console.error("usage: dashboard.mjs CONTROL_URL ADMIN_TOKEN_FILE ARTIFACT_DIR CANARY_YAML");
  process.exit(2);
}
const KIND = process.env.BROWSER || "chromium";
if (KIND !== "chromium" && KIND !== "firefox") {
  console.error(`BROWSER must be chromium or firefox, not ${KIND}`);
  process.exit(2);
}
const TOTAL_MS = 110_000;
const admin = readFileSync(tokenFile, "utf8").trim();
mkdirSync(artifacts, { recursive: true });

const SERVICES = ["product-catalog", "order-processing", "inventory", "payment", "load-generator"];
const EDGES = [
  ["load-generator", "order-processing"],
  ["order-processing", "product-catalog"],
  ["order-processing", "inventory"],
  ["order-processing", "payment"],
];

// The step that logs in with a wrong token expects its 401.
let expect401 = false;
const expected = (u, status) => status === 401 && expect401;

const problems = [];
let step = "start";
let current = null; // the page a failure screenshot shows
const log = (m) => console.log(`[${((Date.now() - t0) / 1000).toFixed(1)}s] ${m}`);
const t0 = Date.now();
const timer = setTimeout(() => {
  console.error(`browser test: gave up after ${TOTAL_MS / 1000}s at step "${step}"`);
  process.exit(1);
}, TOTAL_MS);

function watch(page, name) {
  page.on("console", (m) => {
    if (m.type() !== "error") return;
    const where = m.location()?.url || "";
    if (expect401 && /401/.test(m.text())) return;
    problems.push(`${name}: console error at step "${step}": ${m.text()} (${where})`);
  });
  page.on("pageerror", (e) => problems.push(`${name}: page error at step "${step}": ${e?.message ?? e}`));
  page.on("requestfailed", (r) => {
    const why = r.failure()?.errorText || "";
    // The tap's stream is aborted on purpose when the user leaves or restarts it
    // (Chromium: net::ERR_ABORTED, Firefox: NS_BINDING_ABORTED).
    if (/ABORTED/.test(why) && new URL(r.url()).pathname === "/v1/tap") return;
    problems.push(`${name}: request failed at step "${step}": ${r.method()} ${r.url()}: ${why}`);
  });
  page.on("response", (r) => {
    if (r.status() < 400) return;
    if (expected(r.url(), r.status())) return;
    problems.push(`${name}: HTTP ${r.status()} at step "${step}": ${r.request().method()} ${r.url()}`);
  });
}

async function shot(page, name) {
  await page.screenshot({ path: join(artifacts, `${name}.png`), fullPage: true });
  log(`screenshot ${name}.png`);
}

// The API outside the page, as a script would call it. The demo's control plane has a
// certificate from the mesh's own CA, which the browser is told to accept too.
function api(method, path, token, body) {
  return new Promise((resolve, reject) => {
    const data = body === undefined ? undefined : JSON.stringify(body);
    const req = httpsRequest(
      `${url}${path}`,
      {
        method,
        rejectUnauthorized: false,
        timeout: 20_000,
        headers: { ...(token ? { Authorization: `Bearer ${token}` } : {}), ...(data ? { "Content-Type": "application/json" } : {}) },
      },
      (res) => {
        let text = "";
        res.setEncoding("utf8");
        res.on("data", (c) => (text += c));
        res.on("end", () => resolve({ status: res.statusCode, headers: res.headers, text }));
      },
    );
    req.on("timeout", () => req.destroy(new Error(`${method} ${path}: no answer in 20 s`)));
    req.on("error", reject);
    if (data) req.write(data);
    req.end();
  });
}

const count = (page, sel) => page.$$eval(sel, (els) => els.length);
// Waits until at least n + 1 elements match.
const waitNth = (page, sel, n, timeout = 30_000) =>
  page.waitForFunction((s, k) => document.querySelectorAll(s).length > k, { timeout }, sel, n);
const text = (page, sel) => page.$eval(sel, (e) => e.textContent);

async function login(page, token) {
  await page.goto(`${url}/ui/`);
  await page.waitForSelector("#login-form");
  await page.locator("#token").fill(token);
  await page.click("#login-form button[type=submit]");
  await page.waitForSelector("#nav", { visible: true });
}

async function launch() {
  if (KIND === "firefox") {
    return puppeteer.launch({
      browser: "firefox",
      executablePath: process.env.FIREFOX || "/usr/bin/firefox-esr",
      headless: true,
      acceptInsecureCerts: true,
    });
  }
  return puppeteer.launch({
    browser: "chrome",
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    acceptInsecureCerts: true,
    // Root in CI: Chromium's sandbox needs an unprivileged user.
    args: ["--no-sandbox", "--disable-dev-shm-usage"],
  });
}

async function run() {
  const browser = await launch();
  log(`${KIND}: ${await browser.version()}`);
  try {
    const context = await browser.createBrowserContext();
    const page = await context.newPage();
    await page.setViewport({ width: 1280, height: 900 });
    current = page;
    watch(page, "wide");

    step = "login";
    // A wrong token is refused with a message, and the page stays on the login form.
    await page.goto(`${url}/ui/`);
    expect401 = true;
    await page.locator("#token").fill("not-a-token");
    await page.click("#login-form button[type=submit]");
    await page.waitForFunction(() => document.querySelector("#login-error")?.textContent.includes("not accepted"), {
      timeout: 20_000,
    });
    expect401 = false;
    await login(page, admin);
    await shot(page, "01-login-done");

    step = "topology";
    for (const s of SERVICES) {
      await page.waitForSelector(`#topology-graph g.node[data-service="default/${s}"]`, { timeout: 60_000 });
    }
    for (const [a, b] of EDGES) {
      await page.waitForSelector(
        `#topology-graph g.edge[data-src="default/${a}"][data-dst="default/${b}"][data-mtls="true"]`,
        { timeout: 60_000 },
      );
    }
    const edgeSel = '#topology-graph g.edge[data-dst="default/product-catalog"]';
    const label = await text(page, `${edgeSel} .edge-label`);
    // Live traffic: every figure is there and not zero.
    const figures = /([\d.]+) rps · ([\d.]+)%p99 ([\d.]+) ms/.exec(label);
    const locks = await page.$eval(edgeSel, (e) => e.querySelectorAll(".lock").length);
    if (!figures || figures.slice(1).some((f) => !(Number(f) > 0)) || locks !== 1) {
      throw new Error(`edge label lacks rps, success, p99 or the lock: ${label}`);
    }
    log(`topology: ${SERVICES.length} services, ${EDGES.length} edges; e.g. ${label}`);
    await shot(page, "02-topology");

    step = "service";
    await page.click('#topology-graph g.node[data-service="default/product-catalog"]');
    await page.waitForFunction(() => /#\/service\/default\/product-catalog$/.test(location.href), { timeout: 10_000 });
    const figure = () =>
      page.evaluate(
        () =>
          `${document.querySelector('[data-metric="requests"] .metric-value')?.textContent} ${
            document.querySelector('[data-metric="rps"] .metric-value')?.textContent
          }`,
      );
    await page.waitForFunction(
      () => /\d/.test(document.querySelector('[data-metric="rps"] .metric-value')?.textContent || ""),
      { timeout: 30_000 },
    );
    const first = await figure();
    await page.waitForFunction(
      (before) =>
        `${document.querySelector('[data-metric="requests"] .metric-value')?.textContent} ${
          document.querySelector('[data-metric="rps"] .metric-value')?.textContent
        }` !== before,
      { timeout: 30_000 },
      first,
    );
    log(`service numbers changed: ${first} → ${await figure()}`);
    await waitNth(page, "#instances tbody tr", 1);
    // Outlier state per instance: a column with something in every row ("ok" when no
    // caller sees the instance as anything but healthy).
    const heads = await page.$$eval("#instances th", (ths) => ths.map((t) => t.textContent));
    if (!heads.includes("outlier state")) throw new Error(`no outlier state column: ${heads}`);
    const states = await page.$$eval('#instances td[data-label="outlier state"]', (tds) => tds.map((t) => t.textContent));
    if (!states.length || states.some((t) => !t.trim() || t.trim() === "–")) throw new Error(`empty outlier states: ${states}`);
    log(`outlier states: ${states.join(" | ")}`);
    await shot(page, "03-service");

    step = "authorization";
    // The demo has no AuthorizationPolicy: one that allows every caller in the mesh's
    // namespace (so nothing changes for the demo), whose decisions then show per rule.
    const policy = [
      "apiVersion: trellis.dev/v1alpha1",
      "kind: AuthorizationPolicy",
      "metadata: {name: catalog-callers}",
      "spec:",
      "  targetRef: {kind: Service, name: product-catalog}",
      "  action: Allow",
      "  rules: [{from: {namespaces: [default]}}]",
    ].join("\n");
    const allowed = await api("POST", "/v1/apply", admin, { files: [{ name: "catalog-callers.yaml", text: policy }] });
    if (allowed.status !== 200) throw new Error(`applying the policy: ${allowed.status} ${allowed.text}`);
    const decidedSel = '#authz-decisions tr[data-policy="default/catalog-callers"]';
    await page.waitForSelector(decidedSel, { timeout: 60_000 });
    const cells = await page.$$eval(`${decidedSel} td`, (tds) => tds.map((t) => t.textContent));
    if (cells[1] !== "rule 0" || !(Number(cells[2]) > 0)) throw new Error(`authorization decisions row: ${cells}`);
    log(`authorization decisions: ${cells.join(" | ")}`);
    await shot(page, "03b-authorization");

    step = "canary";
    const applied = await api("POST", "/v1/apply", admin, {
      files: [{ name: "demo/canary.yaml", text: readFileSync(canaryFile, "utf8") }],
    });
    if (applied.status !== 200) throw new Error(`applying the canary: ${applied.status} ${applied.text}`);
    for (const v of ["v1", "v2"]) {
      await page.waitForSelector(`#routes tr[data-backend^="default/product-catalog-${v}"]`, { timeout: 60_000 });
    }
    log("canary split visible on the service page");
    await shot(page, "04-canary-split");

    step = "tap";
    await page.click('#nav a[data-view="tap"]');
    await waitNth(page, "#tap-table tbody tr", 4);
    log(`tap shows ${await count(page, "#tap-table tbody tr")} requests`);
    // An outbound request: its explanation covers the route and the endpoint.
    const picked = await page.evaluate(() => {
      const row = [...document.querySelectorAll("#tap-table tbody tr")].find(
        (tr) => tr.querySelector('td[data-label="dir"]')?.textContent.includes("outbound"),
      );
      if (!row) return false;
      row.setAttribute("data-picked", "1");
      return true;
    });
    if (!picked) throw new Error("no outbound request in tap");
    await page.click('#tap-table tbody tr[data-picked="1"]');
    await page.waitForFunction(
      () => {
        const e = document.querySelector("#explain");
        return e && !e.textContent.includes("asking the control plane") && (e.querySelector(".json") || e.querySelector(".error"));
      },
      { timeout: 20_000 },
    );
    const explained = await page.evaluate(() => {
      const e = document.querySelector("#explain");
      const top = e.querySelector(".json > table.kv > tbody");
      const row = (k) => [...(top ? top.children : [])].find((tr) => tr.firstChild.textContent === k);
      return {
        error: e.querySelector(".error")?.textContent || "",
        route: row("route")?.lastChild.textContent || "",
        endpoint: row("endpoint")?.lastChild.textContent || "",
      };
    });
    if (explained.error) throw new Error(`explain answered an error: ${explained.error}`);
    if (!explained.route.trim() || !/\d+\.\d+\.\d+\.\d+:\d+/.test(explained.endpoint)) {
      throw new Error(`the explanation lacks the matched route or the chosen endpoint: ${JSON.stringify(explained)}`);
    }
    log(`explained: route ${explained.route.slice(0, 80)}; endpoint ${explained.endpoint.slice(0, 80)}`);
    await page.screenshot({ path: join(artifacts, "05-tap.png") });
    await page.click("#tap-stop");

    step = "config";
    await page.click('#nav a[data-view="config"]');
    await page.waitForSelector('#resources tr[data-kind="HTTPRoute"][data-name="product-catalog-canary"]', { timeout: 20_000 });
    await waitNth(page, "#proxies tbody tr", 4);
    await shot(page, "06-config");

    step = "certificates";
    await page.click('#nav a[data-view="certificates"]');
    await waitNth(page, "#certificates tr.cert", 4, 20_000);
    const ids = await page.$$eval("#certificates tr.cert td:first-child", (tds) => tds.map((t) => t.textContent));
    for (const s of SERVICES) {
      if (!ids.some((i) => i.endsWith(`/sa/${s}`))) throw new Error(`no certificate for ${s}: ${ids}`);
    }
    log(`certificates: ${ids.length}`);
    await shot(page, "07-certificates");

    step = "capacity";
    await page.click('#nav a[data-view="capacity"]');
    await page.waitForFunction(() => document.querySelector("#capacity .json, #main .status .error"), { timeout: 20_000 });
    await shot(page, "08-capacity");

    step = "read-only";
    const created = await api("POST", "/v1/tokens", admin, { readOnly: true, ttl_seconds: 600 });
    if (created.status !== 200) throw new Error(`creating a read-only token: ${created.status} ${created.text}`);
    const reader = JSON.parse(created.text).token;
    const denied = await api("POST", "/v1/apply", reader, { files: [] });
    if (denied.status !== 403) throw new Error(`a read-only token applied config: ${denied.status}`);

    step = "narrow";
    const narrow = await browser.createBrowserContext();
    const phone = await narrow.newPage();
    // Firefox over BiDi has no touch emulation; the width is what the layout answers to.
    await phone.setViewport(
      KIND === "firefox" ? { width: 390, height: 844 } : { width: 390, height: 844, isMobile: true, hasTouch: true },
    );
    current = phone;
    watch(phone, "narrow");
    await login(phone, reader);
    await phone.waitForSelector('#topology-graph g.node[data-service="default/order-processing"]', { timeout: 30_000 });
    await shot(phone, "09-narrow-topology");
    await phone.goto(`${url}/ui/#/service/default/order-processing`);
    await phone.waitForSelector("#instances tbody tr", { timeout: 20_000 });
    const overflow = await phone.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    if (overflow > 2) throw new Error(`the narrow page scrolls sideways by ${overflow}px`);
    await shot(phone, "10-narrow-service");

    // A strict CSP: the page's own header says so.
    const res = await api("GET", "/ui/");
    const csp = res.headers["content-security-policy"] || "";
    if (!csp.includes("script-src 'self'") || csp.includes("unsafe-inline")) throw new Error(`weak CSP: ${csp}`);
  } catch (e) {
    if (current) await current.screenshot({ path: join(artifacts, `failed-at-${step}.png`), fullPage: true }).catch(() => {});
    throw e;
  } finally {
    await browser.close();
  }
}

try {
  await run();
} catch (e) {
  problems.unshift(`step "${step}": ${String(e?.message ?? e).split("\n")[0]}`);
}
clearTimeout(timer);
if (problems.length) {
  console.error(`browser test FAILED in ${KIND} (${problems.length} problems; screenshots in ${artifacts}):`);
  for (const p of problems) console.error(`  - ${p}`);
  process.exit(1);
}
log(`browser test passed in ${KIND}; screenshots in ${artifacts}`);
