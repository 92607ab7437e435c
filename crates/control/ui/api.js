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

export async function get(path) {
  const res = await fetch(path, { headers: headers() });
  if (!res.ok) throw await failure(res, path);
  return res.json();
}

export async function post(path, body) {
  const res = await fetch(path, {
    method: "POST",
    headers: headers({ "Content-Type": "application/json" }),
    body: JSON.stringify(body),
  });
  if (!res.ok) throw await failure(res, path);
  return res.json();
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
