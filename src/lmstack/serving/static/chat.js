// lmstack's chat page: plain JavaScript, no build step. Streams replies from /v1/chat/completions.
"use strict";
const $ = (id) => document.getElementById(id);
let models = [];
let history = [];

function headers() {
  const key = $("api_key").value || localStorage.getItem("lmstack_api_key") || "";
  const h = { "Content-Type": "application/json" };
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function showCard() {
  const m = models.find((x) => x.id === $("model").value) || {};
  $("description").textContent = m.parent ? (m.description || "") : "base model";
  $("system").textContent = m.system || "(none)";
}

async function loadModels() {
  const r = await fetch("/v1/models", { headers: headers() });
  const body = await r.json();
  if (!r.ok) { $("status").textContent = body.error ? body.error.message : r.statusText; return; }
  models = body.data;
  const chosen = $("model").value;
  $("model").innerHTML = "";
  for (const m of models) {
    const o = document.createElement("option");
    o.value = m.id;
    o.textContent = m.parent ? m.id : m.id + " (base)";
    $("model").appendChild(o);
  }
  if (models.some((m) => m.id === chosen)) $("model").value = chosen;
  showCard();
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("log").appendChild(div);
  return div;
}

function stopList() {
  const s = $("stop").value.replace(/\\n/g, "\n");
  return s ? [s] : undefined;
}

async function send(text) {
  $("status").textContent = "";
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const out = addMessage("assistant", "");
  const body = {
    model: $("model").value, messages: history, stream: true,
    temperature: parseFloat($("temperature").value), top_p: parseFloat($("top_p").value),
    max_tokens: parseInt($("max_tokens").value, 10), stop: stopList(),
  };
  $("go").disabled = true;
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body) });
    if (!r.ok) {
      const e = await r.json();
      throw new Error(e.error ? e.error.message : r.statusText);
    }
    await readStream(r.body, (delta) => { out.textContent += delta; });
    history.push({ role: "assistant", content: out.textContent });
    loadModels();  // cards loaded meanwhile appear in the picker
  } catch (e) {
    history.pop();
    $("status").textContent = e.message;
  } finally {
    $("go").disabled = false;
  }
}

// Server-sent events: "data: {json}" lines separated by blank lines, ending with "data: [DONE]".
async function readStream(stream, onDelta) {
  const reader = stream.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, cut).trim();
      buffer = buffer.slice(cut + 2);
      if (!line.startsWith("data: ")) continue;
      const data = line.slice(6);
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      for (const c of chunk.choices) if (c.delta && c.delta.content) onDelta(c.delta.content);
    }
  }
}

$("send").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("input").value;
  if (!text.trim()) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("send").requestSubmit(); }
});
$("model").addEventListener("change", () => { history = []; $("log").innerHTML = ""; showCard(); });
$("reset").addEventListener("click", () => { history = []; $("log").innerHTML = ""; });
$("api_key").addEventListener("change", () => { localStorage.setItem("lmstack_api_key", $("api_key").value); loadModels(); });
loadModels();
