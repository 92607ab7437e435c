// The dashboard in a real browser against a live demo mesh:
//   node tests/browser/dashboard.mjs CONTROL_URL ADMIN_TOKEN_FILE ARTIFACT_DIR CANARY_YAML
// Debian's chromium (CHROMIUM, default /usr/bin/chromium) driven by playwright-core; no
// browser download. Any console error, page error, failed request or unexpected HTTP error
// fails it. Screenshots go to ARTIFACT_DIR. Bounded: it gives up after TOTAL_MS.
import { chromium } from "playwright-core";
import { mkdirSync, readFileSync } from "node:fs";
import { join } from "node:path";

const [url, tokenFile, artifacts, canaryFile] = process.argv.slice(2);
if (!url || !tokenFile || !artifacts || !canaryFile) {
  console.error("usage: dashboard.mjs CONTROL_URL ADMIN_TOKEN_FILE ARTIFACT_DIR CANARY_YAML");
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

// The capacity endpoint belongs to another part of the same issue; until it is in this build
// its page shows the API's 404, which is expected and is all that's allowed. Explain has
// landed: its errors fail the test.
const PLACEHOLDERS = ["/v1/capacity"];
const placeholder = (u) => PLACEHOLDERS.some((p) => new URL(u).pathname === p);
// The step that logs in with a wrong token expects its 401.
let expect401 = false;
const expected = (u, status) => (status === 404 && placeholder(u)) || (status === 401 && expect401);

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
    const where = m.location().url || "";
    if (where && ((placeholder(where) && /404/.test(m.text())) || (expect401 && /401/.test(m.text())))) return;
    problems.push(`${name}: console error at step "${step}": ${m.text()} (${where})`);
  });
  page.on("pageerror", (e) => problems.push(`${name}: page error at step "${step}": ${e.message}`));
  page.on("requestfailed", (r) => {
    const why = r.failure()?.errorText || "";
    // The tap's stream is aborted on purpose when the user leaves or restarts it.
    if (why.includes("ERR_ABORTED") && new URL(r.url()).pathname === "/v1/tap") return;
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

async function login(page, token) {
  await page.goto(`${url}/ui/`);
  await page.locator("#login-form").waitFor();
  await page.fill("#token", token);
  await page.click("#login-form button[type=submit]");
  await page.locator("#nav").waitFor({ state: "visible" });
}

async function run() {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    // Root in CI: Chromium's sandbox needs an unprivileged user.
    args: ["--no-sandbox", "--disable-dev-shm-usage"],
  });
  try {
    // The demo's control plane has a certificate from the mesh's own CA.
    const context = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1280, height: 900 } });
    const page = await context.newPage();
    current = page;
    watch(page, "wide");

    step = "login";
    // A wrong token is refused with a message, and the page stays on the login form.
    await page.goto(`${url}/ui/`);
    expect401 = true;
    await page.fill("#token", "not-a-token");
    await page.click("#login-form button[type=submit]");
    await page.locator("#login-error", { hasText: "not accepted" }).waitFor();
    expect401 = false;
    await login(page, admin);
    await shot(page, "01-login-done");

    step = "topology";
    for (const s of SERVICES) {
      await page.locator(`#topology-graph g.node[data-service="default/${s}"]`).waitFor({ timeout: 60_000 });
    }
    for (const [a, b] of EDGES) {
      await page
        .locator(`#topology-graph g.edge[data-src="default/${a}"][data-dst="default/${b}"][data-mtls="true"]`)
        .waitFor({ timeout: 60_000 });
    }
    const edge = page.locator('#topology-graph g.edge[data-dst="default/product-catalog"]').first();
    const label = await edge.locator(".edge-label").textContent();
    // Live traffic: every figure is there and not zero.
    const figures = /([\d.]+) rps · ([\d.]+)%p99 ([\d.]+) ms/.exec(label);
    if (!figures || figures.slice(1).some((f) => !(Number(f) > 0)) || (await edge.locator(".lock").count()) !== 1) {
      throw new Error(`edge label lacks rps, success, p99 or the lock: ${label}`);
    }
    log(`topology: ${SERVICES.length} services, ${EDGES.length} edges; e.g. ${label}`);
    await shot(page, "02-topology");

    step = "service";
    await page.locator('#topology-graph g.node[data-service="default/product-catalog"]').click();
    await page.waitForURL(/#\/service\/default\/product-catalog$/);
    const requests = page.locator('[data-metric="requests"] .metric-value');
    const rps = page.locator('[data-metric="rps"] .metric-value');
    await page.waitForFunction(() => /\d/.test(document.querySelector('[data-metric="rps"] .metric-value')?.textContent || ""), null, { timeout: 30_000 });
    const first = `${await requests.textContent()} ${await rps.textContent()}`;
    await page.waitForFunction(
      (before) => {
        const r = document.querySelector('[data-metric="requests"] .metric-value')?.textContent;
        const s = document.querySelector('[data-metric="rps"] .metric-value')?.textContent;
        return `${r} ${s}` !== before;
      },
      first,
      { timeout: 30_000 },
    );
    log(`service numbers changed: ${first} → ${await requests.textContent()} ${await rps.textContent()}`);
    await page.locator("#instances tbody tr").nth(1).waitFor();
    // Outlier state per instance: a column with something in every row ("ok" when no
    // caller sees the instance as anything but healthy).
    const heads = await page.locator("#instances th").allTextContents();
    if (!heads.includes("outlier state")) throw new Error(`no outlier state column: ${heads}`);
    const states = await page.locator('#instances td[data-label="outlier state"]').allTextContents();
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
    const allowed = await page.request.post(`${url}/v1/apply`, {
      headers: { Authorization: `Bearer ${admin}` },
      data: { files: [{ name: "catalog-callers.yaml", text: policy }] },
    });
    if (!allowed.ok()) throw new Error(`applying the policy: ${allowed.status()} ${await allowed.text()}`);
    const decided = page.locator('#authz-decisions tr[data-policy="default/catalog-callers"]');
    await decided.waitFor({ timeout: 60_000 });
    const cells = await decided.locator("td").allTextContents();
    if (cells[1] !== "rule 0" || !(Number(cells[2]) > 0)) throw new Error(`authorization decisions row: ${cells}`);
    log(`authorization decisions: ${cells.join(" | ")}`);
    await shot(page, "03b-authorization");

    step = "canary";
    const applied = await page.request.post(`${url}/v1/apply`, {
      headers: { Authorization: `Bearer ${admin}` },
      data: { files: [{ name: "demo/canary.yaml", text: readFileSync(canaryFile, "utf8") }] },
    });
    if (!applied.ok()) throw new Error(`applying the canary: ${applied.status()} ${await applied.text()}`);
    for (const v of ["v1", "v2"]) {
      await page.locator(`#routes tr[data-backend^="default/product-catalog-${v}"]`).waitFor({ timeout: 60_000 });
    }
    log("canary split visible on the service page");
    await shot(page, "04-canary-split");

    step = "tap";
    await page.click('#nav a[data-view="tap"]');
    await page.locator("#tap-table tbody tr").nth(4).waitFor({ timeout: 30_000 });
    log(`tap shows ${await page.locator("#tap-table tbody tr").count()} requests`);
    // An outbound request: its explanation covers the route and the endpoint.
    await page
      .locator("#tap-table tbody tr", { has: page.locator('td[data-label="dir"]', { hasText: "outbound" }) })
      .first()
      .click();
    await page.waitForFunction(() => {
      const e = document.querySelector("#explain");
      return e && !e.textContent.includes("asking the control plane") && (e.querySelector(".json") || e.querySelector(".error"));
    }, null, { timeout: 20_000 });
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
    await page.locator('#resources tr[data-kind="HTTPRoute"][data-name="product-catalog-canary"]').waitFor({ timeout: 20_000 });
    await page.locator("#proxies tbody tr").nth(4).waitFor();
    await shot(page, "06-config");

    step = "certificates";
    await page.click('#nav a[data-view="certificates"]');
    await page.locator("#certificates tr.cert").nth(4).waitFor({ timeout: 20_000 });
    const certs = await page.locator("#certificates tr.cert").count();
    const ids = await page.locator("#certificates tr.cert td:first-child").allTextContents();
    for (const s of SERVICES) {
      if (!ids.some((i) => i.endsWith(`/sa/${s}`))) throw new Error(`no certificate for ${s}: ${ids}`);
    }
    log(`certificates: ${certs}`);
    await shot(page, "07-certificates");

    step = "capacity";
    await page.click('#nav a[data-view="capacity"]');
    await page.waitForFunction(() => document.querySelector("#capacity .json, #main .status .error"), null, { timeout: 20_000 });
    await shot(page, "08-capacity");

    step = "read-only";
    const created = await page.request.post(`${url}/v1/tokens`, {
      headers: { Authorization: `Bearer ${admin}` },
      data: { readOnly: true, ttl_seconds: 600 },
    });
    if (!created.ok()) throw new Error(`creating a read-only token: ${created.status()} ${await created.text()}`);
    const reader = (await created.json()).token;
    const denied = await page.request.post(`${url}/v1/apply`, {
      headers: { Authorization: `Bearer ${reader}` },
      data: { files: [] },
    });
    if (denied.status() !== 403) throw new Error(`a read-only token applied config: ${denied.status()}`);
    // The 403 above came from the API client, not the page: nothing to forgive.

    step = "narrow";
    const narrow = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true });
    const phone = await narrow.newPage();
    current = phone;
    watch(phone, "narrow");
    await login(phone, reader);
    await phone.locator('#topology-graph g.node[data-service="default/order-processing"]').waitFor({ timeout: 30_000 });
    await shot(phone, "09-narrow-topology");
    await phone.goto(`${url}/ui/#/service/default/order-processing`);
    await phone.locator("#instances tbody tr").first().waitFor({ timeout: 20_000 });
    const overflow = await phone.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    if (overflow > 2) throw new Error(`the narrow page scrolls sideways by ${overflow}px`);
    await shot(phone, "10-narrow-service");

    // A strict CSP: the page's own header says so.
    const res = await page.request.get(`${url}/ui/`);
    const csp = res.headers()["content-security-policy"] || "";
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
  problems.unshift(`step "${step}": ${e.message.split("\n")[0]}`);
}
clearTimeout(timer);
if (problems.length) {
  console.error(`browser test FAILED (${problems.length} problems; screenshots in ${artifacts}):`);
  for (const p of problems) console.error(`  - ${p}`);
  process.exit(1);
}
log(`browser test passed; screenshots in ${artifacts}`);
