// The chat page: talks to this server's /v1/chat/completions, streaming each answer as it comes.
// Everything the model or the user wrote is shown with textContent, never parsed as HTML.
"use strict";

const KEY = "llama-api-key"; // in sessionStorage: kept for this tab only
const $ = (id) => document.getElementById(id);
const chat = { model: null, messages: [], controller: null, busy: false };

function headers() {
  const result = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem(KEY);
  if (key) result.Authorization = `Bearer ${key}`;
  return result;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error?.message || JSON.stringify(body);
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

function bubble(kind, text) {
  const element = document.createElement("div");
  element.className = `message ${kind}`;
  element.textContent = text;
  $("conversation").append(element);
  element.scrollIntoView({ block: "end" });
  return element;
}

function showError(text) {
  bubble("error", `Error: ${text}`).setAttribute("role", "alert");
}

async function loadConfig() {
  let response;
  try {
    response = await fetch("/v1/llama/config", { headers: headers() });
  } catch (err) {
    showError(`the server is gone (${err.message})`);
    return;
  }
  if (response.status === 401) {
    $("key-form").hidden = false;
    $("api-key").focus();
    return;
  }
  if (response.status === 503) { // still loading the model
    $("model").textContent = "loading…";
    setTimeout(loadConfig, 1000);
    return;
  }
  if (!response.ok) {
    showError(await errorText(response));
    return;
  }
  const config = await response.json();
  chat.model = config.model;
  $("model").textContent = config.model;
  $("temperature").value = config.temperature;
  $("top-p").value = config.top_p;
  $("max-tokens").placeholder = `up to ${config.max_seq_len}`;
  $("key-form").hidden = true;
}

function request(messages) {
  const body = { model: chat.model, messages, stream: true, stream_options: { include_usage: true } };
  const temperature = parseFloat($("temperature").value);
  const topP = parseFloat($("top-p").value);
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (!Number.isNaN(temperature)) body.temperature = temperature;
  if (!Number.isNaN(topP)) body.top_p = topP;
  if (!Number.isNaN(maxTokens)) body.max_tokens = maxTokens;
  return body;
}

// The server-sent events of one answer: each parsed chunk, until [DONE].
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, end).trim();
      buffer = buffer.slice(end + 2);
      if (!line.startsWith("data: ")) continue;
      if (line === "data: [DONE]") return;
      yield JSON.parse(line.slice(6));
    }
  }
}

function setBusy(busy) {
  chat.busy = busy;
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

async function send(text) {
  const user = { role: "user", content: text };
  const system = $("system").value.trim();
  const messages = [...(system ? [{ role: "system", content: system }] : []), ...chat.messages, user];
  bubble("user", text);
  const answer = bubble("assistant", "");
  const controller = new AbortController();
  chat.controller = controller;
  setBusy(true);
  let content = "", pieces = 0, tokens = null, first = null, stopped = false, failed = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(request(messages)), signal: controller.signal,
    });
    if (!response.ok) {
      failed = await errorText(response);
      if (response.status === 401) $("key-form").hidden = false;
    } else {
      for await (const chunk of events(response)) {
        if (chunk.error) { failed = chunk.error.message; break; }
        if (chunk.usage) tokens = chunk.usage.completion_tokens;
        const delta = chunk.choices?.[0]?.delta?.content;
        if (delta) {
          first ??= performance.now();
          content += delta;
          pieces += 1;
          answer.textContent = content;
          answer.scrollIntoView({ block: "end" });
        }
      }
    }
  } catch (err) {
    if (err.name === "AbortError") stopped = true;
    else failed = `the server is gone (${err.message})`;
  }
  setBusy(false);
  chat.controller = null;
  if (failed !== null && !content) { // nothing came: the message goes back in the box, nothing is lost
    answer.remove();
    $("conversation").lastElementChild?.remove();
    $("message").value = text;
    showError(failed);
    return;
  }
  chat.messages.push(user, { role: "assistant", content }); // a stopped answer stays as far as it got
  const seconds = first === null ? 0 : (performance.now() - first) / 1000;
  const count = tokens ?? pieces;
  const stats = document.createElement("span");
  stats.className = "stats";
  stats.textContent = `${stopped ? "stopped · " : ""}${tokens === null ? "≈" : ""}${count} tokens` +
    (seconds > 0 ? ` · ${(count / seconds).toFixed(1)} tokens/s` : "");
  answer.append(stats);
  if (failed !== null) showError(failed);
}

function newChat() {
  chat.controller?.abort();
  chat.messages = [];
  $("conversation").replaceChildren();
  $("message").focus();
}

document.addEventListener("DOMContentLoaded", () => {
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("message").value;
    if (!text.trim() || chat.busy || !chat.model) return;
    $("message").value = "";
    send(text);
  });
  $("message").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    } else if (event.key === "Escape") {
      chat.controller?.abort();
    }
  });
  $("stop").addEventListener("click", () => chat.controller?.abort());
  $("new-chat").addEventListener("click", newChat);
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, $("api-key").value);
    $("api-key").value = "";
    loadConfig();
  });
  loadConfig();
});
