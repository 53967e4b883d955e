// The studio page: everything goes through the server's own /v1/t2l/ and /v1/chat/completions routes.
"use strict";
const $ = (id) => document.getElementById(id);
const state = { base: null, adapter: null, runs: {} };

function headers(json) {
  const h = json ? { "Content-Type": "application/json" } : {};
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function api(method, path, body) {
  const r = await fetch(path, { method, headers: headers(body !== undefined),
                                body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(errorText(r.status, data));
  return data;
}

function errorText(status, data) {
  let m = data && data.error;
  if (m && typeof m === "object") m = m.message;
  if (!m && data && data.detail) m = JSON.stringify(data.detail);
  return `${status}: ${m || "request failed"}`;
}

function say(text, error) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

// ---- descriptions -------------------------------------------------------------------------------
function addTerm(text, weight) {
  const node = $("term-template").content.firstElementChild.cloneNode(true);
  node.querySelector(".description").value = text || "";
  node.querySelector(".weight").value = weight === undefined ? 1 : weight;
  node.querySelector(".remove").onclick = () => { node.remove(); termsChanged(); };
  node.querySelector(".weight").oninput = () => schedule(askAdapter);
  $("terms").appendChild(node);
  termsChanged();
  return node;
}

function terms() { return [...document.querySelectorAll("#terms .term")]; }

function termsChanged() {
  const two = terms().length === 2;
  $("dial-row").hidden = !two;
  if (two) applyDial();
}

function applyDial() {
  const t = Number($("dial").value);
  $("dial-value").textContent = t.toFixed(2);
  const [a, b] = terms();
  a.querySelector(".weight").value = +(1 - t).toFixed(2);
  b.querySelector(".weight").value = +t.toFixed(2);
}

function recipe() {
  const rows = terms().map((n) => [n.querySelector(".description").value.trim(),
                                   Number(n.querySelector(".weight").value)]);
  const used = rows.filter(([d]) => d);
  if (!used.length) throw new Error("write a description first");
  return { descriptions: used.map(([d]) => d), weights: used.map(([, w]) => w), mode: "weight",
           strength: Number($("strength").value) };
}

function setRecipe(item) {
  $("terms").innerHTML = "";
  item.descriptions.forEach((d, i) => addTerm(d, item.weights[i]));
  $("strength").value = item.strength;
  $("strength-value").textContent = item.strength;
}

// ---- answers ------------------------------------------------------------------------------------
function messages(system) {
  const m = system ? [{ role: "system", content: system }] : [];
  return m.concat([{ role: "user", content: $("question").value }]);
}

async function stream(column, model, msgs) {
  if (state.runs[column]) state.runs[column].abort();
  const run = new AbortController();
  state.runs[column] = run;
  const out = $("answer-" + column);
  out.textContent = "";
  out.className = "answer busy";
  out.dataset.done = "0";
  out.dataset.model = model;
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(true), signal: run.signal,
      body: JSON.stringify({ model, messages: msgs, stream: true, temperature: 0, frequency_penalty: 0.5,
                             max_tokens: Number($("max-tokens").value) || 64 }) });
    if (!r.ok) throw new Error(errorText(r.status, await r.json().catch(() => ({}))));
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      const lines = buffer.split("\n");
      buffer = lines.pop();
      for (const line of lines) {
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const chunk = JSON.parse(line.slice(6));
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) out.textContent += delta.content;
      }
    }
    out.className = "answer";
    out.dataset.done = "1";
  } catch (e) {
    if (e.name === "AbortError") return;
    out.textContent = String(e.message || e);
    out.className = "answer error";
    out.dataset.done = "1";
  }
}

async function currentAdapter() {
  const info = await api("POST", "/v1/t2l/adapters", recipe());
  state.adapter = info;
  $("adapter-meta").textContent =
    `id ${info.id.slice(0, 12)} · rank ${info.rank} · ${info.parameters.toLocaleString()} parameters` +
    (info.cached ? " · cached" : " · generated now");
  return info;
}

async function askAdapter() {
  try {
    const info = await currentAdapter();
    await stream("adapter", info.model, messages(null));
  } catch (e) {
    $("answer-adapter").textContent = e.message;
    $("answer-adapter").className = "answer error";
    $("answer-adapter").dataset.done = "1";
  }
}

async function askAll() {
  say("");
  let r;
  try { r = recipe(); } catch (e) { say(e.message, true); return; }
  const system = r.descriptions.filter((d, i) => r.weights[i] > 0).join("\n");
  stream("base", state.base, messages(null));
  stream("system", state.base, messages(system));
  askAdapter();
}

let timer = null;
function schedule(fn) { clearTimeout(timer); timer = setTimeout(fn, 350); }

// ---- catalog and export -------------------------------------------------------------------------
async function refreshCatalog() {
  const { data } = await api("GET", "/v1/t2l/catalog");
  const sel = $("catalog");
  sel.length = 1;
  for (const item of data) sel.add(new Option(`${item.name}: ${item.descriptions.join(" + ").slice(0, 60)}`, item.name));
}

async function save() {
  const name = $("save-name").value.trim();
  try {
    const item = await api("PUT", "/v1/t2l/catalog/" + encodeURIComponent(name), recipe());
    say(`saved: use model "${item.model}"`);
    await refreshCatalog();
  } catch (e) { say(e.message, true); }
}

async function loadName() {
  const name = $("catalog").value;
  if (!name) return;
  try {
    setRecipe(await api("GET", "/v1/t2l/catalog/" + encodeURIComponent(name)));
    $("save-name").value = name;
  } catch (e) { say(e.message, true); }
}

async function deleteName() {
  const name = $("catalog").value;
  if (!name) { say("pick a catalog name to delete", true); return; }
  try { await api("DELETE", "/v1/t2l/catalog/" + encodeURIComponent(name)); say(`deleted ${name}`); await refreshCatalog(); }
  catch (e) { say(e.message, true); }
}

async function download() {
  try {
    const info = await currentAdapter();
    const fmt = $("format").value;
    const r = await fetch(`/v1/t2l/adapters/${info.id}/export?format=${fmt}`, { headers: headers(false) });
    if (!r.ok) throw new Error(errorText(r.status, await r.json().catch(() => ({}))));
    const blob = await r.blob();
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    const name = $("save-name").value.trim() || "t2l-" + info.id;
    a.download = `${name}.${fmt === "zip" ? "zip" : "tar.gz"}`;
    document.body.appendChild(a);
    a.click();
    a.remove();
    say(`downloaded ${a.download} (${blob.size.toLocaleString()} bytes)`);
  } catch (e) { say(e.message, true); }
}

async function connect() {
  try {
    const info = await api("GET", "/v1/t2l/info");
    state.base = info.base_model;
    $("strength").max = info.max_strength;
    $("strength").value = info.recommended_strength;
    $("strength-value").textContent = $("strength").value;
    $("info").textContent = `base ${info.base_model} · checkpoint ${info.checkpoint.slice(0, 12)}` +
      (info.trained ? "" : " (UNTRAINED)") + ` · rank ${info.rank}`;
    $("info").dataset.ready = "1";
    await refreshCatalog();
  } catch (e) { $("info").textContent = e.message + (e.message.startsWith("401") ? " (enter the API key)" : ""); }
}

window.addEventListener("DOMContentLoaded", () => {
  $("api-key").value = localStorage.getItem("t2l-api-key") || "";
  $("api-key").onchange = () => { localStorage.setItem("t2l-api-key", $("api-key").value); connect(); };
  addTerm("");
  $("add-term").onclick = () => addTerm("", 1).querySelector(".description").focus();
  $("ask").onclick = askAll;
  $("strength").oninput = () => { $("strength-value").textContent = $("strength").value; schedule(askAdapter); };
  $("dial").oninput = () => { applyDial(); schedule(askAdapter); };
  $("catalog").onchange = loadName;
  $("delete-name").onclick = deleteName;
  $("save").onclick = save;
  $("download").onclick = download;
  connect();
});
