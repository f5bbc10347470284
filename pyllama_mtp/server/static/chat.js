// The chat page of pyllama-mtp-server: streams from this server's /v1/chat/completions and
// shows what speculative decoding does for each message (tokens from accepted drafts
// tinted, acceptance per draft position, tok/s as it streams).
//
// State lives in the browser: the conversation and settings in localStorage, the API key
// (when the server wants one) in sessionStorage. body[data-state] is "loading", "locked"
// (waiting for a key), "idle" or "generating".
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const CONVERSATION = "pmtp.conversation";
  const SETTINGS = "pmtp.settings";
  const API_KEY = "pmtp.apiKey";
  const MAX_SAMPLES = 400;

  let modelId = null;
  let controller = null;
  let conversation = loadJson(CONVERSATION, []);
  const elements = new Map();      // message -> its DOM nodes
  let pending = new Set();         // messages to redraw at the next animation frame

  function loadJson(key, fallback) {
    try {
      const v = JSON.parse(localStorage.getItem(key));
      return v === null || v === undefined ? fallback : v;
    } catch (e) {
      return fallback;
    }
  }

  function save() {
    try {
      localStorage.setItem(CONVERSATION, JSON.stringify(conversation));
    } catch (e) { /* storage full or disabled: the page works without it */ }
  }

  function setState(state) {
    document.body.dataset.state = state;
    const busy = state === "generating";
    $("send").disabled = busy || state !== "idle";
    $("stop").disabled = !busy;
    const last = conversation[conversation.length - 1];
    $("regenerate").disabled = busy || state !== "idle" || !last || last.role !== "assistant";
  }

  function setStatus(text, isError) {
    $("status").textContent = text;
    $("status").classList.toggle("error", !!isError);
  }

  function authHeaders() {
    const key = sessionStorage.getItem(API_KEY);
    return key ? { Authorization: "Bearer " + key } : {};
  }

  // ------------------------------------------------------------------ settings

  function settings() {
    const draft = $("draft").value;
    return {
      system: $("system").value,
      temperature: parseFloat($("temperature").value),
      maxTokens: Math.max(1, parseInt($("max-tokens").value, 10) || 256),
      mtp: $("mtp").checked,
      draft: draft === "auto" ? "auto" : parseInt(draft, 10),
    };
  }

  function restoreSettings() {
    const s = loadJson(SETTINGS, {});
    if (typeof s.system === "string") $("system").value = s.system;
    if (typeof s.temperature === "number") $("temperature").value = s.temperature;
    if (typeof s.maxTokens === "number") $("max-tokens").value = s.maxTokens;
    if (typeof s.mtp === "boolean") $("mtp").checked = s.mtp;
    $("temperature-value").textContent = $("temperature").value;
    return s;
  }

  function saveSettings() {
    $("temperature-value").textContent = $("temperature").value;
    try {
      localStorage.setItem(SETTINGS, JSON.stringify(settings()));
    } catch (e) { /* ignore */ }
  }

  function fillDraftChoices(info, wanted) {
    const select = $("draft");
    select.textContent = "";
    const add = (value, label) => {
      const o = document.createElement("option");
      o.value = String(value);
      o.textContent = label;
      select.appendChild(o);
    };
    add("auto", "auto");
    for (let k = 0; k <= (info.draft_max || 0); k++) add(k, String(k));
    const preferred = wanted !== undefined ? String(wanted) : String(info.draft_default ?? "auto");
    select.value = [...select.options].some((o) => o.value === preferred) ? preferred : "auto";
    $("mtp").disabled = !info.mtp;
    if (!info.mtp) $("mtp").checked = false;
    select.disabled = !info.mtp;
  }

  // ------------------------------------------------------------------ rendering

  function draftFlags(msg) {
    const flags = new Uint8Array(msg.content.length);
    let i = 0;
    for (const [n, drafted] of msg.runs || []) {
      if (drafted) flags.fill(1, i, Math.min(i + n, flags.length));
      i += n;
    }
    return flags;
  }

  function messageNodes(msg) {
    let nodes = elements.get(msg);
    if (nodes) return nodes;
    const root = document.createElement("div");
    root.className = "msg " + msg.role;
    const role = document.createElement("div");
    role.className = "role";
    role.textContent = msg.role === "user" ? "You" : "Assistant";
    const content = document.createElement("div");
    content.className = "content";
    root.append(role, content);
    nodes = { root, content };
    if (msg.role === "assistant") {
      nodes.panel = document.createElement("div");
      nodes.panel.className = "panel";
      nodes.note = document.createElement("div");
      nodes.note.className = "note";
      root.append(nodes.note, nodes.panel);
    }
    elements.set(msg, nodes);
    $("messages").appendChild(root);
    return nodes;
  }

  function figure(parent, cls, label, value, title) {
    const span = document.createElement("span");
    span.className = cls;
    if (title) span.title = title;
    span.append(label + " ");
    const b = document.createElement("b");
    b.textContent = value;
    span.appendChild(b);
    parent.appendChild(span);
    return span;
  }

  function plot(canvas, samples) {
    const ratio = window.devicePixelRatio || 1;
    canvas.width = 200 * ratio;
    canvas.height = 40 * ratio;
    const g = canvas.getContext("2d");
    g.scale(ratio, ratio);
    if (samples.length < 2) return;
    // tok/s over a sliding window of about 0.4 s
    const points = [];
    let j = 0;
    for (let i = 1; i < samples.length; i++) {
      while (j < i - 1 && samples[i][0] - samples[j][0] > 400) j++;
      const dt = samples[i][0] - samples[j][0];
      if (dt > 0) points.push([samples[i][0], (samples[i][1] - samples[j][1]) * 1000 / dt]);
    }
    if (!points.length) return;
    const t0 = samples[0][0], t1 = Math.max(samples[samples.length - 1][0], t0 + 1);
    const top = Math.max(...points.map((p) => p[1])) * 1.1 || 1;
    g.strokeStyle = "#2f6f4f";
    g.lineWidth = 1.5;
    g.beginPath();
    points.forEach(([t, v], k) => {
      const x = 2 + (196 * (t - t0)) / (t1 - t0), y = 38 - (36 * v) / top;
      if (k === 0) g.moveTo(x, y); else g.lineTo(x, y);
    });
    g.stroke();
    g.fillStyle = "#6b6b66";
    g.font = "10px sans-serif";
    g.fillText(top.toFixed(0) + " tok/s", 4, 10);
  }

  function drawPanel(msg, nodes) {
    const panel = nodes.panel;
    panel.textContent = "";
    const s = msg.stats;
    const live = msg.tokens > 0 && msg.tFirstMs !== undefined && msg.tLastMs > msg.tFirstMs
      ? ((msg.tokens - msg.firstChunkTokens) * 1000) / (msg.tLastMs - msg.tFirstMs) : null;
    const tps = s ? s.tokens_per_second : live;
    figure(panel, "tps", "tok/s", tps === null || tps === undefined ? "…" : tps.toFixed(1),
      s ? "decode rate measured by the server (after the first token)" : "decode rate as received");
    figure(panel, "tokens", "tokens", String(s ? s.completion_tokens : msg.tokens || 0));
    figure(panel, "from-draft", "from drafts", String(msg.fromDraft || 0),
      "tokens that came from MTP drafts the model accepted");
    if (s) {
      figure(panel, "reused", "prompt reused", `${s.prompt_tokens_reused} / ${s.prompt_tokens}`,
        "prompt tokens found in the server's KV cache");
      figure(panel, "acceptance", "acceptance",
        s.acceptance === null ? "–" : (100 * s.acceptance).toFixed(0) + "%",
        `${s.accepted} of ${s.drafted} drafted tokens accepted`);
      figure(panel, "mean-accepted", "mean accepted",
        s.mean_accepted === null ? "–" : s.mean_accepted.toFixed(2), "accepted drafts per verify step");
      if (s.acceptance_per_position.length) {
        const wrap = document.createElement("span");
        wrap.className = "per-position";
        wrap.append("per position ");
        const bars = document.createElement("span");
        bars.className = "positions";
        s.acceptance_per_position.forEach((rate, k) => {
          const bar = document.createElement("span");
          bar.style.height = Math.max(1, Math.round(28 * rate)) + "px";
          bar.dataset.pos = String(k + 1);
          bar.title = `draft position ${k + 1}: ${(100 * rate).toFixed(0)}% accepted`;
          bars.appendChild(bar);
        });
        wrap.appendChild(bars);
        panel.appendChild(wrap);
      }
    }
    const canvas = document.createElement("canvas");
    canvas.className = "plot";
    canvas.title = "tok/s over the message";
    panel.appendChild(canvas);
    plot(canvas, msg.samples || []);
  }

  function draw(msg) {
    const nodes = messageNodes(msg);
    if (msg.role === "user") {
      nodes.content.textContent = msg.content;
      return;
    }
    const flags = draftFlags(msg);
    PmtpMarkdown.render(nodes.content, msg.content, (i) => flags[i] === 1);
    nodes.note.textContent = "";
    if (msg.error) {
      const e = document.createElement("div");
      e.className = "error";
      e.textContent = msg.error;
      nodes.note.appendChild(e);
    } else if (msg.stopped) {
      nodes.note.textContent = "stopped";
    } else if (msg.finish === "length") {
      nodes.note.textContent = "stopped at the token limit";
    }
    drawPanel(msg, nodes);
  }

  function redrawAll() {
    $("messages").textContent = "";
    elements.clear();
    conversation.forEach(draw);
  }

  function scheduleDraw(msg) {
    if (!pending.size) {
      requestAnimationFrame(() => {
        const batch = pending;
        pending = new Set();
        batch.forEach(draw);
        const box = $("messages");
        box.scrollTop = box.scrollHeight;
      });
    }
    pending.add(msg);
  }

  // ------------------------------------------------------------------ talking to the server

  async function loadModel() {
    setState("loading");
    let r;
    try {
      r = await fetch("/v1/models", { headers: authHeaders() });
    } catch (e) {
      setStatus("server unreachable: " + e, true);
      return;
    }
    if (r.status === 401) {
      setState("locked");
      setStatus("this server needs an API key", true);
      askKey();
      return;
    }
    if (!r.ok) {
      setStatus("GET /v1/models: HTTP " + r.status, true);
      return;
    }
    const m = (await r.json()).data[0];
    modelId = m.id;
    $("model").textContent = m.id;
    fillDraftChoices(m.x_pmtp || {}, loadJson(SETTINGS, {}).draft);
    setStatus("");
    setState("idle");
  }

  function askKey() {
    $("key-button").hidden = false;
    $("key-dialog").hidden = false;
    $("key-input").focus();
  }

  function requestMessages(upTo) {
    const s = settings();
    const out = [];
    if (s.system.trim()) out.push({ role: "system", content: s.system });
    for (const m of conversation.slice(0, upTo)) {
      if (m.role === "assistant" && (m.error || !m.content)) continue;
      out.push({ role: m.role, content: m.content });
    }
    return out;
  }

  function handleEvent(data, msg) {
    if (data === "[DONE]") return;
    const c = JSON.parse(data);
    const x = c.x_pmtp || {};
    const choice = c.choices && c.choices[0];
    const text = choice && choice.delta && typeof choice.delta.content === "string" ? choice.delta.content : "";
    if (text) {
      msg.content += text;
      const spans = Array.isArray(x.spans) ? x.spans : [[text.length, false]];
      for (const [n, drafted] of spans) {
        const last = msg.runs[msg.runs.length - 1];
        if (last && last[1] === drafted) last[0] += n; else msg.runs.push([n, drafted]);
      }
    }
    if (Array.isArray(x.from_draft) && x.from_draft.length) {
      const now = performance.now() - msg.t0;
      if (msg.tFirstMs === undefined) {
        msg.tFirstMs = now;
        msg.firstChunkTokens = x.from_draft.length;
      }
      msg.tLastMs = now;
      msg.tokens += x.from_draft.length;
      msg.fromDraft += x.from_draft.filter(Boolean).length;
      if (msg.samples.length < MAX_SAMPLES) msg.samples.push([Math.round(now), msg.tokens]);
    }
    if (x.stats) msg.stats = x.stats;
    if (choice && choice.finish_reason) msg.finish = choice.finish_reason;
    if (c.error) msg.error = c.error.message || String(c.error);
    scheduleDraw(msg);
  }

  async function readStream(response, msg) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (line.startsWith("data: ")) handleEvent(line.slice(6), msg);
        }
      }
    }
  }

  async function generate() {
    const s = settings();
    const body = {
      model: modelId,
      messages: requestMessages(conversation.length),
      stream: true,
      stream_options: { include_usage: true },
      temperature: s.temperature,
      max_tokens: s.maxTokens,
      mtp: s.mtp,
    };
    if (s.mtp) body.draft = s.draft;
    const msg = { role: "assistant", content: "", runs: [], samples: [], tokens: 0, fromDraft: 0,
                  settings: { mtp: s.mtp, draft: s.mtp ? s.draft : 0 } };
    conversation.push(msg);
    draw(msg);
    controller = new AbortController();
    setState("generating");
    setStatus("generating…");
    msg.t0 = performance.now();
    try {
      const r = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: { "Content-Type": "application/json", ...authHeaders() },
        body: JSON.stringify(body),
        signal: controller.signal,
      });
      if (r.status === 401) {
        msg.error = "The server wants an API key.";
        askKey();
      } else if (!r.ok) {
        const j = await r.json().catch(() => null);
        msg.error = (j && j.error && j.error.message) || "HTTP " + r.status;
      } else {
        await readStream(r, msg);
      }
    } catch (e) {
      if (e.name === "AbortError") msg.stopped = true;
      else msg.error = String(e);
    } finally {
      controller = null;
      delete msg.t0;
      save();
      draw(msg);
      setStatus("");
      setState(modelId ? "idle" : "locked");
    }
  }

  // ------------------------------------------------------------------ wiring

  function send() {
    const text = $("input").value;
    if (!text.trim() || document.body.dataset.state !== "idle") return;
    $("input").value = "";
    const msg = { role: "user", content: text };
    conversation.push(msg);
    draw(msg);
    save();
    generate();
  }

  function init() {
    const stored = restoreSettings();
    fillDraftChoices({ mtp: true, draft_max: 0 }, stored.draft);
    redrawAll();
    $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
    $("input").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
    });
    $("stop").addEventListener("click", () => { if (controller) controller.abort(); });
    $("regenerate").addEventListener("click", () => {
      const last = conversation[conversation.length - 1];
      if (!last || last.role !== "assistant" || document.body.dataset.state !== "idle") return;
      conversation.pop();
      const nodes = elements.get(last);
      if (nodes) nodes.root.remove();
      elements.delete(last);
      generate();
    });
    $("new-chat").addEventListener("click", () => {
      if (controller) controller.abort();
      conversation = [];
      save();
      redrawAll();
      setState(modelId ? "idle" : document.body.dataset.state);
    });
    for (const id of ["system", "temperature", "max-tokens", "mtp", "draft"]) {
      $(id).addEventListener("change", saveSettings);
      $(id).addEventListener("input", saveSettings);
    }
    $("key-button").addEventListener("click", askKey);
    $("key-form").addEventListener("submit", (e) => {
      e.preventDefault();
      sessionStorage.setItem(API_KEY, $("key-input").value);
      $("key-input").value = "";
      $("key-dialog").hidden = true;
      loadModel();
    });
    loadModel();
  }

  document.addEventListener("DOMContentLoaded", init);
})();
