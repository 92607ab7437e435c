// The dashboard's shell: login, navigation (the URL's hash names the view) and the view's
// lifetime.
import { get, token, setToken } from "./api.js";
import { clear } from "./render.js";
import * as views from "./views.js";

const $ = (s) => document.querySelector(s);
let leave = () => {};

function route() {
  leave();
  leave = () => {};
  const main = $("#main");
  if (!token()) {
    showLogin("");
    return;
  }
  $("#login").hidden = true;
  $("#nav").hidden = false;
  $("#logout").hidden = false;
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  const name = parts[0] || "topology";
  for (const a of document.querySelectorAll("#nav a")) {
    a.classList.toggle("active", a.dataset.view === name || (name === "service" && a.dataset.view === "services"));
  }
  const view =
    name === "service" && parts.length >= 3
      ? (m) => views.service(m, parts[1], parts[2])
      : Object.hasOwn(views, name) && name !== "service"
        ? views[name]
        : views.topology;
  leave = view(main) || (() => {});
}

function showLogin(message) {
  leave();
  leave = () => {};
  clear($("#main"));
  $("#nav").hidden = true;
  $("#logout").hidden = true;
  $("#login").hidden = false;
  $("#login-error").textContent = message;
  $("#token").focus();
}

$("#login-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const t = $("#token").value.trim();
  if (!t) return;
  setToken(t);
  try {
    // Any read proves the token; the stats view is small.
    await get("/v1/stats?window=10s");
    $("#token").value = "";
    route();
  } catch (err) {
    setToken(null);
    showLogin(err.status === 401 ? "That token was not accepted: wrong, expired, or for another control plane." : err.message);
  }
});

$("#logout").addEventListener("click", () => {
  setToken(null);
  showLogin("Logged out.");
});

window.addEventListener("trellis-unauthorized", () => {
  setToken(null);
  showLogin("The token is no longer accepted (expired or revoked): log in again.");
});

window.addEventListener("hashchange", route);
route();
