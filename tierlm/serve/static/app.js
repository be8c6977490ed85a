// The chat page: sends the conversation to /v1/chat/completions with stream: true, reads the server-sent
// events as they arrive, and shows reasoning (reasoning_content) apart from the answer.
// URL parameters: ?q=TEXT sends TEXT at once; max_tokens, temperature preset those fields.
"use strict";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
let history = [];
let modelId = null;
let controller = null;

function setState(state) { document.body.dataset.state = state; }

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function bubble(role) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  $("log").appendChild(div);
  return div;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    modelId = body.data[0].id;
    $("model").textContent = modelId + " · context " + body.data[0].max_model_len;
  } catch (e) {
    $("model").textContent = "model unavailable: " + e.message;
  }
}

// Yields the JSON of each "data:" event of an SSE body; comments (": keep-alive") are skipped.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function send(text) {
  if (!text.trim() || controller) return;
  if (!modelId) await loadModel();
  history.push({ role: "user", content: text });
  bubble("user").textContent = text;
  const out = bubble("assistant");
  const thinking = document.createElement("details");
  thinking.className = "reasoning";
  thinking.open = true;
  thinking.hidden = true;
  thinking.innerHTML = "<summary>reasoning</summary>";
  const reasoning = document.createElement("div");
  thinking.appendChild(reasoning);
  const answer = document.createElement("div");
  answer.className = "answer";
  const stats = document.createElement("div");
  stats.className = "stats";
  out.append(thinking, answer, stats);

  const body = { model: modelId, stream: true, stream_options: { include_usage: true },
                 messages: ($("system").value ? [{ role: "system", content: $("system").value }] : []).concat(history) };
  if ($("max_tokens").value) body.max_tokens = parseInt($("max_tokens").value, 10);
  if ($("temperature").value) body.temperature = parseFloat($("temperature").value);

  controller = new AbortController();
  $("send").hidden = true; $("stop").hidden = false;
  setState("streaming");
  const t0 = performance.now();
  let content = "", finish = null, usage = null;
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body),
                                                    signal: controller.signal });
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      throw new Error(err.error ? err.error.message : r.status + " " + r.statusText);
    }
    for await (const chunk of events(r)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const d = choice.delta || {};
        if (d.reasoning_content) { thinking.hidden = false; reasoning.textContent += d.reasoning_content; }
        if (d.content) { content += d.content; answer.textContent = content; }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      $("log").scrollTop = $("log").scrollHeight;
    }
    history.push({ role: "assistant", content });
    const secs = (performance.now() - t0) / 1000;
    stats.textContent = (usage ? usage.completion_tokens + " tokens, " : "") + secs.toFixed(1) + " s" +
                        (finish ? " · " + finish : "");
    setState("done");
  } catch (e) {
    const err = document.createElement("div");
    err.className = "error";
    err.textContent = e.name === "AbortError" ? "(stopped)" : "error: " + e.message;
    out.appendChild(err);
    history.pop();
    setState(e.name === "AbortError" ? "done" : "error");
  } finally {
    controller = null;
    $("send").hidden = false; $("stop").hidden = true;
  }
}

$("form").addEventListener("submit", (e) => { e.preventDefault(); const t = $("input").value; $("input").value = ""; send(t); });
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("form").requestSubmit(); }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("reset").addEventListener("click", () => { history = []; $("log").innerHTML = ""; setState("idle"); });
$("key").value = localStorage.getItem("tierlm-key") || "";
$("key").addEventListener("change", () => { localStorage.setItem("tierlm-key", $("key").value); loadModel(); });
for (const name of ["max_tokens", "temperature"]) if (params.has(name)) $(name).value = params.get(name);

loadModel().then(() => { if (params.has("q")) send(params.get("q")); });
