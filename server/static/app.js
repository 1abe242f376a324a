// gla-serve chat page: streams replies from /v1/chat/completions (fetch + ReadableStream, SSE framing),
// keeps the conversation client-side and resends it each turn, as OpenAI clients do. The server
// resumes from its cached recurrent state when the history matches; usage.prompt_tokens_details
// .cached_tokens tells us whether it did, and each reply shows it next to TTFT and tokens/s.
"use strict";

const API = "v1/chat/completions"; // relative, so the page also works behind a path prefix

const el = {
  form: document.getElementById("composer"),
  prompt: document.getElementById("prompt"),
  send: document.getElementById("send"),
  stop: document.getElementById("stop"),
  newChat: document.getElementById("new-chat"),
  messages: document.getElementById("messages"),
  status: document.getElementById("status"),
  modelInfo: document.getElementById("model-info"),
  emptyHint: document.getElementById("empty-hint"),
  maxTokens: document.getElementById("max-tokens"),
  temperature: document.getElementById("temperature"),
  topP: document.getElementById("top-p"),
  systemPrompt: document.getElementById("system-prompt"),
  apiKey: document.getElementById("api-key"),
};

const chat = {
  history: [], // [{role, content}] of completed turns only
  model: null,
  controller: null, // AbortController of the turn in flight
};

// Incremental SSE decoder: chunks may split lines (and CRLF pairs) anywhere; an event is complete
// only at its blank line, so a cut stream never yields half an event.
class SSEDecoder {
  constructor() {
    this.buffer = "";
    this.skipLF = false;
    this.data = [];
    this.event = "";
  }

  feed(text) {
    if (!text) return [];
    // A "\r" that ended the previous chunk already ended its line; a "\n" right after is its pair.
    if (this.skipLF && text[0] === "\n") text = text.slice(1);
    this.skipLF = text.endsWith("\r");
    const lines = (this.buffer + text).split(/\r\n|\r|\n/);
    this.buffer = lines.pop();
    const events = [];
    for (const line of lines) {
      const event = this.line(line);
      if (event) events.push(event);
    }
    return events;
  }

  line(line) {
    if (line === "") {
      if (this.data.length === 0) {
        this.event = "";
        return null;
      }
      const event = { event: this.event || "message", data: this.data.join("\n") };
      this.data = [];
      this.event = "";
      return event;
    }
    if (line.startsWith(":")) return null;
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") this.data.push(value);
    else if (field === "event") this.event = value;
    return null;
  }
}

function setStatus(text) {
  el.status.textContent = text;
}

function authHeaders() {
  const key = el.apiKey.value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function numberFrom(input, fallback) {
  const value = Number(input.value);
  return Number.isFinite(value) && input.value !== "" ? value : fallback;
}

async function errorMessage(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    if (body && body.error) return body.error.message || JSON.stringify(body.error);
    if (body && body.detail) return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch (_) {
    // not JSON: fall through to the raw text
  }
  return text.slice(0, 300) || response.statusText;
}

async function loadModel() {
  try {
    const response = await fetch("v1/models", { headers: authHeaders() });
    if (!response.ok) throw new Error(await errorMessage(response));
    const body = await response.json();
    chat.model = body.data && body.data.length ? body.data[0].id : null;
    el.modelInfo.textContent = chat.model ? `Model: ${chat.model}` : "No model listed";
  } catch (err) {
    el.modelInfo.textContent = `Server not reachable: ${err.message}`;
  }
}

function addMessage(role, text) {
  el.emptyHint.hidden = true;
  const item = document.createElement("li");
  item.className = `msg ${role}`;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role === "user" ? "You" : "Assistant";
  const content = document.createElement("p");
  content.className = "content";
  content.textContent = text;
  item.append(label, content);
  el.messages.append(item);
  item.scrollIntoView({ block: "end" });
  return item;
}

function cachedTokensOf(usage) {
  if (!usage) return null;
  const details = usage.prompt_tokens_details;
  if (details && details.cached_tokens != null) return details.cached_tokens;
  return usage.cached_tokens != null ? usage.cached_tokens : null;
}

// The stats line under a reply. data-cached is "true", "false" or "unknown" (no usage reported).
function showStats(item, turn) {
  const stats = document.createElement("p");
  stats.className = "turn-stats";
  const cached = cachedTokensOf(turn.usage);
  const badge = document.createElement("span");
  if (cached == null) {
    stats.dataset.cached = "unknown";
    badge.className = "badge fresh";
    badge.textContent = "cache: not reported";
  } else if (cached > 0) {
    stats.dataset.cached = "true";
    badge.className = "badge cached";
    badge.textContent = `resumed from cached state (${cached} of ${turn.usage.prompt_tokens} prompt tokens)`;
  } else {
    stats.dataset.cached = "false";
    badge.className = "badge fresh";
    badge.textContent = `fresh state (${turn.usage.prompt_tokens} prompt tokens)`;
  }
  const tokens = turn.usage && turn.usage.completion_tokens != null ? turn.usage.completion_tokens : turn.chunks;
  // Decode speed after the first token, what a reader feels; TTFT covers the wait before it.
  const decodeSeconds = (turn.end - turn.firstToken) / 1000;
  const rate = tokens > 1 && decodeSeconds > 0 ? (tokens - 1) / decodeSeconds : null;
  const parts = [
    ["tokens", `${tokens} tokens`],
    ["tps", rate == null ? "– tok/s" : `${rate.toFixed(1)} tok/s`],
    ["ttft", turn.firstToken == null ? "no tokens" : `TTFT ${Math.round(turn.firstToken - turn.start)} ms`],
  ];
  if (turn.finishReason) parts.push(["finish", `finish: ${turn.finishReason}`]);
  stats.append(badge);
  for (const [name, text] of parts) {
    const span = document.createElement("span");
    span.className = `stat-${name}`;
    span.textContent = text;
    stats.append(span);
  }
  if (rate != null) stats.dataset.tokensPerSecond = rate.toFixed(1);
  item.append(stats);
}

function showError(item, message) {
  item.classList.add("error");
  const p = document.createElement("p");
  p.className = "error-text";
  p.setAttribute("role", "alert");
  p.textContent = message;
  item.append(p);
}

function setBusy(busy) {
  el.send.disabled = busy;
  el.stop.disabled = !busy;
  el.messages.setAttribute("aria-busy", busy ? "true" : "false");
}

function requestMessages(userText) {
  const system = el.systemPrompt.value.trim();
  const messages = system ? [{ role: "system", content: system }] : [];
  return messages.concat(chat.history, [{ role: "user", content: userText }]);
}

// One turn: POST, read the stream, update the reply as tokens arrive. Returns the turn record.
async function streamTurn(userText, item, signal) {
  const content = item.querySelector(".content");
  const body = {
    messages: requestMessages(userText),
    stream: true,
    stream_options: { include_usage: true },
    max_tokens: Math.round(numberFrom(el.maxTokens, 256)),
    temperature: numberFrom(el.temperature, 0.7),
    top_p: numberFrom(el.topP, 0.9),
  };
  if (chat.model) body.model = chat.model;
  const turn = { start: performance.now(), firstToken: null, end: null, text: "", chunks: 0,
                 usage: null, finishReason: null, done: false };
  const response = await fetch(API, {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "text/event-stream", ...authHeaders() },
    body: JSON.stringify(body),
    signal,
  });
  if (!response.ok) throw new Error(`${response.status}: ${await errorMessage(response)}`);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  const decoder = new SSEDecoder();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    for (const event of decoder.feed(value)) {
      if (event.data.trim() === "[DONE]") {
        turn.done = true;
        continue;
      }
      const payload = JSON.parse(event.data);
      if (event.event === "error" || payload.error) {
        const err = payload.error;
        throw new Error(typeof err === "string" ? err : (err && err.message) || "the server reported an error");
      }
      for (const choice of payload.choices || []) {
        const delta = (choice.delta && choice.delta.content) || "";
        if (delta) {
          if (turn.firstToken == null) turn.firstToken = performance.now();
          turn.chunks += 1;
          turn.text += delta;
          content.textContent = turn.text;
        }
        if (choice.finish_reason) turn.finishReason = choice.finish_reason;
      }
      if (payload.usage) turn.usage = payload.usage;
    }
  }
  turn.end = performance.now();
  if (!turn.done) throw new Error("the stream ended early (no [DONE])");
  return turn;
}

async function send(userText) {
  addMessage("user", userText);
  const item = addMessage("assistant", "");
  item.dataset.state = "streaming";
  chat.controller = new AbortController();
  setBusy(true);
  setStatus("Generating…");
  try {
    const turn = await streamTurn(userText, item, chat.controller.signal);
    chat.history.push({ role: "user", content: userText }, { role: "assistant", content: turn.text });
    item.dataset.state = "done";
    showStats(item, turn);
    setStatus("");
  } catch (err) {
    const aborted = err.name === "AbortError";
    const partial = item.querySelector(".content").textContent;
    if (aborted && partial) {
      // Keep what was shown: the next turn continues from the text the user saw.
      chat.history.push({ role: "user", content: userText }, { role: "assistant", content: partial });
    } else {
      el.prompt.value = el.prompt.value || userText; // let the user retry a failed turn
    }
    item.dataset.state = aborted ? "stopped" : "error";
    showError(item, aborted ? "Stopped." : `Error: ${err.message}`);
    setStatus(aborted ? "Stopped." : "The turn failed; the conversation is unchanged.");
  } finally {
    chat.controller = null;
    setBusy(false);
    el.prompt.focus();
  }
}

el.form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = el.prompt.value.trim();
  if (!text || chat.controller) return;
  el.prompt.value = "";
  send(text);
});

el.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    el.form.requestSubmit();
  }
});

el.stop.addEventListener("click", () => {
  if (chat.controller) chat.controller.abort();
});

el.newChat.addEventListener("click", () => {
  if (chat.controller) chat.controller.abort();
  chat.history = [];
  el.messages.replaceChildren();
  el.emptyHint.hidden = false;
  setStatus("New conversation.");
  el.prompt.focus();
});

loadModel();
el.prompt.focus();
