// The API client: the token lives in this tab's sessionStorage and goes out as the
// Authorization header (no cookie, so no cross-site request can carry it).
const KEY = "trellis.token";

export function token() {
  return sessionStorage.getItem(KEY);
}

export function setToken(t) {
  if (t) sessionStorage.setItem(KEY, t);
  else sessionStorage.removeItem(KEY);
}

export class ApiError extends Error {
  constructor(status, path, lines) {
    super(`${path}: ${status}: ${lines.join("; ")}`);
    this.status = status;
    this.lines = lines;
  }
}

async function failure(res, path) {
  let lines = [res.statusText || "error"];
  try {
    const body = await res.json();
    if (Array.isArray(body.errors)) lines = body.errors;
  } catch {
    // not JSON: keep the status text
  }
  if (res.status === 401) window.dispatchEvent(new CustomEvent("trellis-unauthorized"));
  return new ApiError(res.status, path, lines);
}

function headers(extra) {
  return { Authorization: `Bearer ${token() || ""}`, ...extra };
}

// The answer's JSON. A path the control plane does not serve falls through to its gRPC
// router, which answers 200 with an empty body and a grpc-status: say so plainly.
async function body(res, path) {
  if (!(res.headers.get("content-type") || "").includes("json")) {
    // Read it to the end, so the browser does not count the request as aborted.
    await res.arrayBuffer().catch(() => {});
    throw new ApiError(404, path, ["this control plane does not serve it (an older version?)"]);
  }
  return res.json();
}

export async function get(path) {
  const res = await fetch(path, { headers: headers() });
  if (!res.ok) throw await failure(res, path);
  return body(res, path);
}

export async function post(path, data) {
  const res = await fetch(path, {
    method: "POST",
    headers: headers({ "Content-Type": "application/json" }),
    body: JSON.stringify(data),
  });
  if (!res.ok) throw await failure(res, path);
  return body(res, path);
}

// Streams newline-delimited JSON from `path`, calling `onLine` per object, until the server
// ends it or `signal` aborts.
export async function stream(path, onLine, signal) {
  const res = await fetch(path, { headers: headers(), signal });
  if (!res.ok) throw await failure(res, path);
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffered += decoder.decode(value, { stream: true });
    let nl;
    while ((nl = buffered.indexOf("\n")) >= 0) {
      const line = buffered.slice(0, nl).trim();
      buffered = buffered.slice(nl + 1);
      if (line) onLine(JSON.parse(line));
    }
  }
}
