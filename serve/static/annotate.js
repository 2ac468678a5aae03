// The kto-loop annotation page. Public API only: GET /v1/me, GET /v1/annotations/next,
// POST /v1/annotations and POST /v1/annotations/skip. No framework, no build step.
//
// Who the annotator is, is the server's to say (GET /v1/me): behind a trusted proxy, the proxy's
// headers; on the server's own host (header mode), the name typed here once, sent as X-User-Id
// with X-User-Role: annotator; with KTO_AUTH=api-key or jwt, the key or token pasted in, sent as
// `Authorization: Bearer`. Whether that credential may annotate is the API's answer too: a 403
// from /v1/annotations/next is shown as it comes.
"use strict";

// Not the chat page's keys: an annotator's credential is not their chat one, and signing out
// here must not sign them out there.
const NAME_KEY = "kto-loop-annotator";
const CREDENTIAL_KEY = "kto-loop-annotator-key";
// j/k and 1/2 sit under the fingers; s/0 skips. Shown on the buttons and in aria-keyshortcuts.
const SHORTCUTS = { j: "up", 1: "up", k: "down", 2: "down", s: "skip", 0: "skip" };

const $ = (id) => document.getElementById(id);
const region = $("item");
let mode = null;      // KTO_AUTH as /v1/me says: header, api-key or jwt
let current = null;   // the item shown, as GET /v1/annotations/next gave it
let busy = false;     // one request at a time: a second key press waits for the next answer
let labeled = 0;      // labels sent from this page, shown as progress

// localStorage, or memory where there is none (some private modes): then it lasts as long as the page.
const memory = {};
function stored(key) {
  try { return localStorage.getItem(key); } catch { return memory[key] ?? null; }
}
function store(key, value) {
  try {
    if (value) localStorage.setItem(key, value); else localStorage.removeItem(key);
  } catch { memory[key] = value || null; }
}
function authHeaders() {
  const key = stored(CREDENTIAL_KEY);
  if (key) return { Authorization: `Bearer ${key}` };
  const name = stored(NAME_KEY);
  return name ? { "X-User-Id": name, "X-User-Role": "annotator" } : {};
}

// The status line and the API's message of a non-2xx answer ({"error": {"message", "code"}}).
async function problem(response) {
  let message = `${response.status} ${response.statusText}`.trim(), code = null;
  try {
    const body = await response.json();
    if (body?.error?.message) message = `${message}: ${body.error.message}`;
    code = body?.error?.code ?? null;
  } catch { /* not JSON (a proxy's page): the status line says enough */ }
  return { message, code };
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}
function clearError() { $("error").hidden = true; }

function setBusy(value) {
  busy = value;
  region.setAttribute("aria-busy", String(value));
  for (const b of region.querySelectorAll("button")) b.disabled = value;
}

// Which part of the page shows: a form to sign in, the answer to judge, or the idle line.
function view(part) {
  $("name-form").hidden = part !== "name";
  $("sign-in").hidden = part !== "key";
  $("guidelines-box").hidden = part === "name" || part === "key";
  $("task").hidden = part !== "task";
  $("idle").hidden = part !== "idle";
  if (part !== "task") current = null;
}

// Something went wrong with no answer to show: the error, and a button to try again.
function fail(message) {
  view("idle");
  $("nothing").hidden = true;
  $("again").textContent = "Try again";
  showError(message);
  setBusy(false);
}

async function call(url, options = {}) {
  try {
    return await fetch(url, { ...options, headers: { ...options.headers, ...authHeaders() } });
  } catch (err) {
    return { network: `Could not reach the server (${err.message}).` };
  }
}

// Ask the server who we are; then ask for a name or a key, or fetch the next answer.
async function whoAmI() {
  setBusy(true);
  const response = await call("/v1/me");
  if (response.network) return fail(response.network);
  if (response.status === 401) return askForKey((await problem(response)).message);
  if (!response.ok) return fail((await problem(response)).message);
  const me = await response.json();
  mode = me.auth;
  const who = $("who");
  who.textContent = me.user ? `annotating as ${me.user}` : "anonymous";
  who.hidden = false;
  // A proxy may have made them an annotator already; else, on the server's own host, their name.
  if (mode === "header" && me.role !== "annotator" && !stored(NAME_KEY)) return askForName();
  const own = stored(CREDENTIAL_KEY) ? "Sign out" : stored(NAME_KEY) ? "Change name" : null;
  $("sign-out").textContent = own ?? "";
  $("sign-out").hidden = !own;
  clearError();
  return next();
}

function askForName() {
  view("name");
  $("who").hidden = $("sign-out").hidden = true;
  clearError();
  setBusy(false);
  $("name").focus();
}

// The server wants a key (or refused the one we sent: then say why).
function askForKey(message) {
  const hadKey = Boolean(stored(CREDENTIAL_KEY));
  store(CREDENTIAL_KEY, null);
  view("key");
  $("who").hidden = $("sign-out").hidden = true;
  if (hadKey) showError(message); else clearError();
  setBusy(false);
  $("key").focus();
}

// The answer this annotator holds, else the next one leased to them; `notice` says why we moved on.
async function next(notice = null) {
  setBusy(true);
  const response = await call("/v1/annotations/next", { cache: "no-store" });
  if (response.network) return fail(response.network);
  if (response.status === 401 && mode !== "header") return askForKey((await problem(response)).message);
  if (!response.ok) return fail((await problem(response)).message);
  const task = await response.json();
  $("guidelines").textContent = task.guidelines;
  if (notice) showError(notice); else clearError();
  show(task.item);
}

function show(item) {
  if (!item) {
    view("idle");
    $("nothing").hidden = false;
    $("again").textContent = "Check again";
    region.removeAttribute("data-response-id");
    setBusy(false);
    return;
  }
  const messages = item.messages.map((m) => {
    const el = $("message-template").content.firstElementChild.cloneNode(true);
    el.classList.add(m.role);
    el.querySelector(".role").textContent = m.role;
    el.querySelector(".bubble").textContent = m.content;
    return el;
  });
  $("conversation").replaceChildren(...messages);
  $("completion").textContent = item.completion;
  region.dataset.responseId = item.response_id;
  view("task");
  current = item;
  setBusy(false);
  // Keys work from anywhere but a text box: focus must leave the sign-in form just hidden.
  if (!region.contains(document.activeElement)) region.focus({ preventScroll: true });
  window.scrollTo(0, 0);
}

// 👍, 👎 or skip on the answer shown, then the next one.
async function act(action) {
  if (busy || !current) return;
  const id = current.response_id;
  const [url, body] = action === "skip"
    ? ["/v1/annotations/skip", { response_id: id }]
    : ["/v1/annotations", { response_id: id, label: action }];
  setBusy(true);
  const response = await call(url, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  if (response.network) {
    showError(`Not saved: ${response.network}`);
    return setBusy(false);
  }
  if (response.ok) {
    if (action !== "skip") {
      labeled += 1;
      $("done").textContent = `${labeled} labeled`;
      $("done").hidden = false;
    }
    return next();
  }
  const { message, code } = await problem(response);
  if (response.status === 401 && mode !== "header") return askForKey(message);
  // Gone from the queue (its user erased, or expired), or the lease ran out and it went to
  // someone else: nothing to retry, so say so and move on.
  if (response.status === 404 || code === "not_assigned") return next(`Not saved: ${message}`);
  showError(`Not saved: ${message}`);
  setBusy(false);
}

region.addEventListener("click", (e) => {
  const button = e.target.closest(".act");
  if (button) act(button.dataset.action);
});
document.addEventListener("keydown", (e) => {
  if (e.ctrlKey || e.metaKey || e.altKey || e.repeat || e.isComposing) return;
  if (e.target.closest?.("input, textarea, select, [contenteditable]")) return;  // typing, not judging
  const action = SHORTCUTS[e.key.toLowerCase()];
  if (!action || $("task").hidden) return;
  e.preventDefault();
  act(action);
});
$("again").addEventListener("click", () => (mode ? next() : whoAmI()));
$("name-form").addEventListener("submit", (e) => {
  e.preventDefault();
  store(NAME_KEY, $("name").value.trim());
  $("name").value = "";
  whoAmI();
});
$("sign-in").addEventListener("submit", (e) => {
  e.preventDefault();
  store(CREDENTIAL_KEY, $("key").value.trim());
  $("key").value = "";
  whoAmI();
});
$("sign-out").addEventListener("click", () => {
  store(CREDENTIAL_KEY, null);
  store(NAME_KEY, null);
  whoAmI();
});
whoAmI();
