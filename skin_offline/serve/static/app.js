// SkinVL offline: the page. Talks to this server's OpenAI-compatible API only (same origin, no CDN, no build).
// Every text from the model or the user is shown with textContent, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  model: null,          // /v1/models card
  imageUrl: null,       // data URL of the chosen image (sent in the first user message)
  messages: [],         // the OpenAI messages of this conversation so far
  controller: null,     // AbortController of the running request
  key: sessionStorage.getItem("skin-offline-key") || "",
};

function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.key) h["Authorization"] = "Bearer " + state.key;
  return h;
}

function setStatus(s, text) { const el = $("status"); el.dataset.state = s; el.textContent = text || ""; }
function showError(msg) { const el = $("error"); el.hidden = !msg; el.textContent = msg || ""; }

async function errorMessage(resp) {
  try { const j = await resp.json(); if (j && j.error && j.error.message) return j.error.message; } catch (e) { /* not JSON */ }
  return "HTTP " + resp.status;
}

async function loadModel() {
  let resp;
  try { resp = await fetch("/v1/models", { headers: headers() }); }
  catch (e) { $("model-info").textContent = "The server is not reachable."; return; }
  if (resp.status === 401) { $("key-box").hidden = false; $("model-info").textContent = "Enter the API key to continue."; return; }
  if (!resp.ok) { $("model-info").textContent = await errorMessage(resp); return; }
  $("key-box").hidden = true;
  const m = (await resp.json()).data[0];
  state.model = m;
  const info = $("model-info");
  info.dataset.state = "ready";
  info.textContent = `Model: ${m.id} (${m.precision}), ${m.provenance}.`;
  const w = $("warning");
  if (m.random_weights) {
    w.hidden = false;
    w.textContent = "Demo bundle exported from RANDOM weights: its answers are meaningless text, not medical information.";
  } else { w.hidden = true; }
}

function chooseFile(file) {
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    state.imageUrl = reader.result;
    newConversation();
    $("file-name").textContent = `${file.name} (${Math.round(file.size / 1024)} KB)`;
    const img = $("preview"), none = $("no-preview");
    img.hidden = true; none.hidden = true;
    img.onload = () => { img.hidden = false; };
    img.onerror = () => { none.hidden = false; };
    img.src = state.imageUrl;
  };
  reader.onerror = () => showError("The file could not be read.");
  reader.readAsDataURL(file);
}

function addTurn(role, text) {
  const div = document.createElement("div");
  div.className = "turn " + role;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "SkinVL";
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  div.append(who, body);
  const conv = $("conversation");
  conv.append(div);
  conv.scrollTop = conv.scrollHeight;  // the box, not the page (see the streaming loop)
  return body;
}

function newConversation() {
  if (state.controller) state.controller.abort();
  state.messages = [];
  $("conversation").textContent = "";
  $("timings").textContent = "";
  $("notice").hidden = true; $("notice").textContent = "";
  showError("");
  setStatus("idle", "");
}

// Server-Sent Events from fetch: "data: {json}" blocks separated by a blank line; ":" lines are keep-alives.
async function* sseEvents(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut); buf = buf.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (line.startsWith("data: ")) yield line.slice(6);
      }
    }
  }
}

async function ask(ev) {
  ev.preventDefault();
  const q = $("question").value.trim();
  showError("");
  if (!state.imageUrl) { showError("Choose an image first."); return; }
  if (!q) { showError("Type a question."); return; }
  if (state.controller) return;
  const userMsg = state.messages.length === 0
    ? { role: "user", content: [{ type: "image_url", image_url: { url: state.imageUrl } }, { type: "text", text: q }] }
    : { role: "user", content: q };
  const body = {
    messages: [...state.messages, userMsg], stream: true, stream_options: { include_usage: true },
    max_tokens: parseInt($("max-tokens").value, 10) || 256, temperature: parseFloat($("temperature").value) || 0,
  };
  if (state.model) body.model = state.model.id;
  addTurn("user", q);
  const out = addTurn("assistant", "");
  $("question").value = "";
  const controller = new AbortController();
  state.controller = controller;
  $("ask").disabled = true; $("stop").disabled = false;
  setStatus("streaming", "Answering\u2026");
  const t0 = performance.now();
  let ttft = null, answer = "", finish = null, timings = null, usage = null;
  try {
    const resp = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal });
    if (resp.status === 401) { $("key-box").hidden = false; throw new Error("The API key is missing or wrong."); }
    if (!resp.ok) throw new Error(await errorMessage(resp));
    for await (const data of sseEvents(resp)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.warnings) { $("notice").hidden = false; $("notice").textContent = chunk.warnings.join(" "); }
      if (chunk.usage) usage = chunk.usage;
      if (chunk.timings) timings = chunk.timings;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      if (choice.delta && choice.delta.content) {
        if (ttft === null) ttft = (performance.now() - t0) / 1000;
        answer += choice.delta.content;
        // scroll the conversation box only (scrollIntoView would also scroll the page, so the Stop
        // button would move under the pointer while tokens stream), and only if the reader is at its end
        const conv = $("conversation");
        const atEnd = conv.scrollHeight - conv.scrollTop - conv.clientHeight < 40;
        out.textContent = answer;
        if (atEnd) conv.scrollTop = conv.scrollHeight;
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    setStatus("done", finish === "length" ? "Done (stopped at the token limit)." : "Done.");
  } catch (e) {
    if (e.name === "AbortError") { setStatus("stopped", "Stopped."); }
    else { setStatus("error", ""); showError(e.message); }
  } finally {
    state.controller = null;
    $("ask").disabled = false; $("stop").disabled = true;
  }
  if (answer || finish) {  // keep what the user saw, so a follow-up continues this conversation
    state.messages.push(userMsg, { role: "assistant", content: answer });
  } else {
    out.parentElement.remove(); $("conversation").lastChild && $("conversation").lastChild.remove();
  }
  const parts = [];
  if (ttft !== null) parts.push(`first token ${ttft.toFixed(2)} s`);
  if (timings) parts.push(`${timings.decode_tokens_per_s.toFixed(1)} tokens/s`, `server TTFT ${timings.ttft_s.toFixed(2)} s`);
  if (usage) parts.push(`${usage.completion_tokens} tokens, prompt ${usage.prompt_tokens}`);
  $("timings").textContent = parts.join(" \u00b7 ");
  $("conversation").dataset.turns = String(state.messages.length / 2);
}

function init() {
  $("file").addEventListener("change", (e) => chooseFile(e.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); chooseFile(e.dataTransfer.files[0]); });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("file").click(); });
  $("ask-form").addEventListener("submit", ask);
  $("question").addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("ask-form").requestSubmit(); } });
  $("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
  $("new").addEventListener("click", newConversation);
  $("save-key").addEventListener("click", () => {
    state.key = $("api-key").value.trim();
    sessionStorage.setItem("skin-offline-key", state.key);
    loadModel();
  });
  loadModel();
}

init();
