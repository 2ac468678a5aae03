// The kto-loop chat page. Public API only: GET /v1/me, POST /v1/chat/completions (stream: true)
// and POST /v1/feedback. No framework, no build step.
//
// Who the user is, is the server's to say (GET /v1/me): behind a trusted proxy, the proxy's
// header; on the server's own host, this browser's random id (X-User-Id); with KTO_AUTH=api-key
// or jwt, the key or token the user pastes in, sent as `Authorization: Bearer`.
"use strict";

const USER_KEY = "kto-loop-user";
const CREDENTIAL_KEY = "kto-loop-key";
const history = [];   // the conversation sent as `messages`: finished turns only
let busy = false;     // one answer streams at a time; Enter is ignored until it ends

const $ = (id) => document.getElementById(id);
const log = $("messages"), prompt = $("prompt"), send = $("send");

// A random id per browser, kept in localStorage. Read on every call, so a second tab agrees.
// randomUUID needs a secure context (https or localhost); plain http on a LAN host has only
// getRandomValues. Without storage (some private modes) the id lasts as long as the page.
let memoryId = null;
function userId() {
  try {
    let id = localStorage.getItem(USER_KEY);
    if (!id) localStorage.setItem(USER_KEY, (id = newId()));
    return id;
  } catch {
    return (memoryId ??= newId());
  }
}
function newId() {
  if (crypto.randomUUID) return crypto.randomUUID();
  return Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
}

// The pasted key or token, kept in localStorage like the id; null when there is none.
function credential() {
  try { return localStorage.getItem(CREDENTIAL_KEY); } catch { return memoryKey; }
}
let memoryKey = null;
function setCredential(value) {
  try {
    if (value) localStorage.setItem(CREDENTIAL_KEY, value); else localStorage.removeItem(CREDENTIAL_KEY);
  } catch { memoryKey = value; }
}
function authHeaders() {
  const key = credential();
  return key ? { Authorization: `Bearer ${key}` } : { "X-User-Id": userId() };
}

// Ask the server who we are; show the sign-in form when it wants a credential we do not have.
async function whoAmI() {
  let response;
  try {
    response = await fetch("/v1/me", { headers: authHeaders() });
  } catch {
    return;  // offline: the first message will say so
  }
  const signIn = $("sign-in"), who = $("who");
  if (response.status === 401) {
    const hadKey = Boolean(credential());
    setCredential(null);
    signIn.hidden = false;
    who.hidden = $("sign-out").hidden = true;
    $("sign-in-error").hidden = !hadKey;
    if (hadKey) $("sign-in-error").textContent = await errorOf(response);
    $("key").focus();
    return;
  }
  if (!response.ok) return;
  const me = await response.json();
  signIn.hidden = true;
  who.textContent = me.user ? `signed in as ${me.user}` : "anonymous: answers cannot be rated";
  who.hidden = false;
  $("sign-out").hidden = !credential();
  prompt.focus();
}

function scrollDown() { log.scrollTop = log.scrollHeight; }
// While an answer streams, follow it only if the reader is at the bottom (not reading above).
const atBottom = () => log.scrollHeight - log.scrollTop - log.clientHeight < 40;

function addUserMessage(text) {
  $("empty")?.remove();
  const el = document.createElement("article");
  el.className = "message user";
  el.dataset.testid = "question";
  const bubble = document.createElement("div");
  bubble.className = "bubble";
  bubble.textContent = text;
  el.append(bubble);
  log.append(el);
  scrollDown();
}

function addAnswer() {
  const el = $("answer-template").content.firstElementChild.cloneNode(true);
  log.append(el);
  scrollDown();
  return el;
}

function showError(el, message) {
  const box = el.querySelector(".error");
  box.textContent = message;
  box.hidden = false;
  scrollDown();
}

// The message of a non-2xx answer: the API's {"error": {"message"}} body, or the status line.
async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`.trim();
  try {
    const body = await response.json();
    if (body?.error?.message) message = `${message}: ${body.error.message}`;
  } catch { /* not JSON (a proxy's page): the status line says enough */ }
  return message;
}

// POST JSON as this browser's user; the response if 2xx, else an Error saying plainly what went wrong.
async function post(url, body) {
  let response;
  try {
    response = await fetch(url, {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(body),
    });
  } catch (err) {
    throw new Error(`Could not reach the server (${err.message}).`);
  }
  if (!response.ok) {
    const error = new Error(await errorOf(response));
    if (response.status === 401) whoAmI();  // a key revoked meanwhile: ask for another
    throw error;
  }
  return response;
}

// Reads an SSE body, calling onData(parsedJson) per `data:` event; resolves true at [DONE],
// false if the stream ended without it.
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    let value, done;
    try {
      ({ value, done } = await reader.read());
    } catch {
      throw new Error("The connection was lost before the answer was complete.");
    }
    if (done) return false;
    buffer += decoder.decode(value, { stream: true });
    const events = buffer.split(/\r?\n\r?\n/);
    buffer = events.pop();  // an incomplete event waits for the next read
    for (const event of events) {
      const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return true;
      onData(JSON.parse(data));
    }
  }
}

async function ask(text) {
  busy = true;
  send.disabled = true;
  addUserMessage(text);
  const turn = { role: "user", content: text };
  const answer = addAnswer();
  const bubble = answer.querySelector(".bubble");
  let id = null, model = null, content = "";
  try {
    const response = await post("/v1/chat/completions", { messages: [...history, turn], stream: true });
    const finished = await readEvents(response, (chunk) => {
      if (chunk.error) throw new Error(`The answer failed: ${chunk.error.message}`);
      id ??= chunk.id;
      model ??= chunk.model;
      const delta = chunk.choices?.[0]?.delta?.content;
      if (delta) {
        const follow = atBottom();
        content += delta;
        bubble.textContent = content;
        if (follow) scrollDown();
      }
    });
    if (!finished) throw new Error("The connection closed before the answer was complete.");
    // Only a complete answer joins the history and can be rated: the server records it only then.
    history.push(turn, { role: "assistant", content });
    answer.querySelector("[data-testid=version]").textContent = model;
    answer.querySelector("[data-testid=response-id]").textContent = id;
    answer.dataset.responseId = id;
    answer.querySelector("footer").hidden = false;
  } catch (err) {
    answer.classList.add("failed");
    if (!content) bubble.remove();
    showError(answer, err.message);
    // The failed turn is not in the history; give its text back to edit or retry.
    if (!prompt.value) prompt.value = text;
  } finally {
    answer.setAttribute("aria-busy", "false");
    busy = false;
    send.disabled = false;
    scrollDown();
  }
}

// A vote: POST it, then show it pressed. Choosing the other one later records a change.
async function vote(button) {
  const answer = button.closest("[data-testid=answer]");
  const buttons = answer.querySelectorAll(".vote");
  if (button.getAttribute("aria-pressed") === "true") return;  // repeating a vote changes nothing
  buttons.forEach((b) => (b.disabled = true));
  const box = answer.querySelector(".error");
  box.hidden = true;
  try {
    await post("/v1/feedback", { response_id: answer.dataset.responseId, label: button.dataset.label });
    buttons.forEach((b) => b.setAttribute("aria-pressed", String(b === button)));
  } catch (err) {
    showError(answer, `Your rating was not saved: ${err.message}`);
  } finally {
    buttons.forEach((b) => (b.disabled = false));
  }
}

function submit() {
  const text = prompt.value.trim();
  if (busy || !text) return;
  prompt.value = "";
  ask(text);
}

$("composer").addEventListener("submit", (e) => { e.preventDefault(); submit(); });
prompt.addEventListener("keydown", (e) => {
  // Enter sends; Shift+Enter is a new line; Enter that confirms an IME composition is not a send.
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); submit(); }
});
log.addEventListener("click", (e) => {
  const button = e.target.closest(".vote");
  if (button) vote(button);
});
$("new-chat").addEventListener("click", () => {
  if (busy) return;
  history.length = 0;
  log.replaceChildren();
  prompt.focus();
});
$("sign-in").addEventListener("submit", (e) => {
  e.preventDefault();
  setCredential($("key").value.trim());
  $("key").value = "";
  whoAmI();
});
$("sign-out").addEventListener("click", () => {
  setCredential(null);
  whoAmI();
});
userId();  // create the id on first visit, before anything is sent
whoAmI();
