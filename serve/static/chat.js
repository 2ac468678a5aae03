// The kto-loop chat page. Public API only: GET /v1/me, POST /v1/chat/completions (stream: true)
// and POST /v1/feedback. No framework, no build step.
//
// Besides the thumbs, what the user does with an answer is sent as an implicit signal
// (ingest/signals.py): ↻ regenerate on the latest answer, copying an answer (its button or Ctrl+C
// on a selection inside it), and editing a question that was answered, then sending it again.
//
// Who the user is, is the server's to say (GET /v1/me): behind a trusted proxy, the proxy's
// header; on the server's own host, this browser's random id (X-User-Id); with KTO_AUTH=api-key
// or jwt, the key or token the user pastes in, sent as `Authorization: Bearer`.
"use strict";

const USER_KEY = "kto-loop-user";
const CREDENTIAL_KEY = "kto-loop-key";
const history = [];   // the conversation sent as `messages`: finished turns only
let busy = false;     // one answer streams at a time; Enter is ignored until it ends
let editing = null;   // the question being rewritten in the composer, or null

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
let anonymous = false;  // the server takes this browser for nobody (GET /v1/me): no signals then

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
  anonymous = !me.user;
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
  const el = $("question-template").content.firstElementChild.cloneNode(true);
  el.querySelector(".bubble").textContent = text;
  log.append(el);
  scrollDown();
  return el;
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

// Asks `text` after the finished turns in `history`. `question` is its bubble when it is on the
// page already (a regenerate asks the same question again); otherwise one is added.
async function ask(text, question = null) {
  busy = true;
  send.disabled = true;
  question ??= addUserMessage(text);
  const edit = question.querySelector("[data-act=edit]");
  edit.hidden = true;  // only a question with a finished answer can be edited
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
    question.dataset.turn = history.length;  // where the turn starts: an edit or a regenerate cuts there
    history.push(turn, { role: "assistant", content });
    edit.hidden = false;
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

// An implicit signal about an answer. Best effort: the act it records (copying, asking again) goes
// ahead whether or not it is saved, and a failure goes to the console only: an error box about
// something the user did not ask for would only puzzle them. Resolves whether it was saved.
function signal(answer, name) {
  if (anonymous) return Promise.resolve(false);  // nobody's answer: there is no one to count it for
  const body = { response_id: answer.dataset.responseId, source: "implicit", signal: name };
  return post("/v1/feedback", body).then(
    () => true,
    (err) => { console.warn(`The ${name} signal was not saved: ${err.message}`); return false; },
  );
}

const textOf = (message) => message.querySelector(".bubble").textContent;
const answerOf = (button) => button.closest("[data-testid=answer]");

// Forgets the turn that `question` starts and all after it, in `history` and on the page.
function forget(question, { keepQuestion = false } = {}) {
  history.length = Number(question.dataset.turn);
  while (question.nextElementSibling) question.nextElementSibling.remove();
  if (!keepQuestion) question.remove();
}

// ↻ (shown on the latest answer only, by chat.css): that answer was not wanted; ask its question
// again, without it. A failed answer has no ↻: its question is back in the composer instead.
function regenerate(button) {
  if (busy) return;
  const answer = answerOf(button), question = answer.previousElementSibling;
  signal(answer, "regenerate");
  endEdit();
  forget(question, { keepQuestion: true });
  ask(textOf(question), question);
}

// Copying an answer counts once, however often it is copied; a signal that was lost may be sent
// by the next copy.
function copied(answer) {
  if (answer.dataset.copied) return;
  answer.dataset.copied = "true";
  signal(answer, "copy").then((saved) => { if (!saved) delete answer.dataset.copied; });
}

// The copy button. Where the clipboard API is missing (plain http off localhost) or refused (the
// page has no focus, no permission), the text is selected and copied the old way; if even that is
// refused, it stays selected for the user's Ctrl+C. A ✓ shows when it is on the clipboard.
async function copy(button) {
  const answer = answerOf(button), bubble = answer.querySelector(".bubble");
  copied(answer);
  try {
    await navigator.clipboard.writeText(bubble.textContent);
  } catch {
    getSelection().selectAllChildren(bubble);
    if (!document.execCommand("copy")) return;
  }
  button.classList.add("done");
  setTimeout(() => button.classList.remove("done"), 1500);
}

// Ctrl+C (or the context menu's Copy) on a selection within a finished answer's text.
function copiedSelection() {
  const selection = getSelection();
  if (selection.isCollapsed) return;
  const range = selection.getRangeAt(0);
  let node = range.commonAncestorContainer;
  if (node.nodeType !== Node.ELEMENT_NODE) node = node.parentElement;
  const answer = node?.closest("[data-testid=answer]");
  if (answer?.dataset.responseId && range.intersectsNode(answer.querySelector(".bubble"))) copied(answer);
}

// Edit: the question goes back into the composer; sending it replaces that turn and all after it.
function startEdit(button) {
  if (busy) return;
  endEdit();
  editing = button.closest("[data-testid=question]");
  editing.classList.add("editing");
  prompt.value = textOf(editing);
  $("editing").hidden = false;
  prompt.focus();
}
function endEdit() {
  editing?.classList.remove("editing");
  editing = null;
  $("editing").hidden = true;
}
function cancelEdit() {
  if (!editing) return;
  endEdit();
  prompt.value = "";  // it held the old question
}

function submit() {
  const text = prompt.value.trim();
  if (busy || !text) return;
  prompt.value = "";
  if (editing) {
    const question = editing;
    endEdit();
    // Sent unchanged, it is another try at the same question: a regenerate, not an edit.
    signal(question.nextElementSibling, text === textOf(question) ? "regenerate" : "edit");
    forget(question);
  }
  ask(text);
}

$("composer").addEventListener("submit", (e) => { e.preventDefault(); submit(); });
prompt.addEventListener("keydown", (e) => {
  // Enter sends; Shift+Enter is a new line; Enter that confirms an IME composition is not a send.
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); submit(); }
});
document.addEventListener("keydown", (e) => { if (e.key === "Escape") cancelEdit(); });
$("cancel-edit").addEventListener("click", cancelEdit);
const ACTS = { vote, copy, regenerate, edit: startEdit };
log.addEventListener("click", (e) => {
  const button = e.target.closest("button[data-act]");
  if (button) ACTS[button.dataset.act](button);
});
document.addEventListener("copy", copiedSelection);
$("new-chat").addEventListener("click", () => {
  if (busy) return;
  cancelEdit();
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
