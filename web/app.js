// minimm's page: chat with the served checkpoint (text, images, audio files, the microphone) and watch
// training runs. Plain JavaScript, no build step; serve.py documents the API it talks to.
"use strict";

const $ = (id) => document.getElementById(id);
const WAV_RATE = 16000; // the model's mel features are computed from 16 kHz audio (minimm/audio.py)
const POLL_MS = 3000; // how often the runs view asks for new log lines while it is open
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];

const state = {
  info: null,
  turns: [], // the conversation, sent whole with every message: the server keeps nothing between requests
  pending: { images: [], audio: [] }, // attachments of the message being written: {name, base64, url}
  controller: null, // aborts the answer being streamed (Send turns into Stop meanwhile)
  recorder: null,
};

async function getJson(url) {
  const response = await fetch(url);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text; // textContent, never innerHTML: answers are untrusted text
  return node;
}

function showError(message) {
  $("chat-error").textContent = message;
}

// ---- chat --------------------------------------------------------------------------------------------------

function addMessage(role, text, images = [], audio = []) {
  const node = element("div", `message ${role}`);
  for (const item of images) node.append(Object.assign(element("img"), { src: item.url, alt: item.name }));
  for (const item of audio) node.append(Object.assign(element("audio"), { src: item.url, controls: true }));
  node.append(element("div", "text", text), element("div", "meta"));
  $("messages").append(node);
  node.scrollIntoView({ block: "end" });
  return node;
}

async function send(event) {
  event.preventDefault();
  if (state.controller) return state.controller.abort();
  const text = $("prompt").value.trim();
  const { images, audio } = state.pending;
  if (!text && !images.length && !audio.length) return;
  showError("");
  const turn = { role: "user", text, images: images.map((f) => f.base64), audio: audio.map((f) => f.base64) };
  turn.node = addMessage("user", text, images, audio);
  state.turns.push(turn);
  $("prompt").value = "";
  state.pending = { images: [], audio: [] };
  renderAttachments();

  const sent = state.turns.filter((t) => !t.dropped);
  const body = JSON.stringify({
    task: $("task").value,
    temperature: Number($("temperature").value),
    max_new_tokens: Number($("max-tokens").value),
    turns: sent.map(({ role, text, images, audio }) => ({ role, text, images, audio })),
  });
  const answer = addMessage("assistant", "");
  const [answerText, meta] = answer.children;
  let streamed = false, failed = false;
  state.controller = new AbortController();
  $("send").textContent = "Stop";
  try {
    if (body.length > state.info.max_upload_bytes) {
      throw new Error("this conversation is larger than the server takes: start a new one");
    }
    const response = await fetch("/api/chat", {
      method: "POST", headers: { "Content-Type": "application/json" }, body, signal: state.controller.signal,
    });
    if (!response.ok) {
      const error = await response.json().catch(() => ({ error: response.statusText }));
      throw new Error(`${response.status}: ${error.error}`);
    }
    await readEvents(response, (e) => {
      if (e.text !== undefined) {
        streamed = true;
        answerText.textContent += e.text;
        answer.scrollIntoView({ block: "end" });
      } else if (e.dropped) {
        sent.slice(0, e.dropped).forEach((t) => { t.dropped = true; t.node.classList.add("dropped"); });
        meta.textContent = e.notice;
      } else if (e.done) {
        const stats = `${e.tokens} tokens in ${e.seconds} s` + (e.cut_short ? " (the context is full)" : "");
        meta.textContent = meta.textContent ? `${meta.textContent} · ${stats}` : stats; // after a drop notice
        answer.scrollIntoView({ block: "end" });
      } else if (e.error) {
        throw new Error(e.error);
      }
    });
  } catch (error) {
    const stopped = error.name === "AbortError";
    failed = !stopped && !streamed;
    meta.classList.add("error");
    meta.textContent = stopped ? "stopped" : error.message;
  } finally {
    state.controller = null;
    $("send").textContent = "Send";
  }
  if (failed) { // nothing came back: take the question out of the history so turns still alternate
    state.turns.pop();
    turn.node.classList.add("failed");
  } else { // a whole, stopped or broken-off answer: what the user saw is what the model said
    state.turns.push({ role: "assistant", text: answerText.textContent, node: answer });
    if (!answerText.textContent) answerText.textContent = "(empty answer)";
  }
}

// Server-sent events over a POST: EventSource can only GET, so read the body ourselves. Events are
// "data: {json}" blocks separated by a blank line, and a network chunk may end in the middle of one.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      onEvent(JSON.parse(buffer.slice(0, end).replace(/^data: /, "")));
      buffer = buffer.slice(end + 2);
    }
  }
}

// ---- attachments: images, audio files, the microphone ------------------------------------------------------

function renderAttachments() {
  const box = $("attachments");
  box.replaceChildren();
  for (const kind of ["images", "audio"]) {
    state.pending[kind].forEach((item, i) => {
      const chip = element("span", "attachment");
      if (kind === "images") chip.append(Object.assign(element("img"), { src: item.url, alt: item.name }));
      const remove = element("button", "", "×");
      remove.type = "button";
      remove.title = `remove ${item.name}`;
      remove.onclick = () => { state.pending[kind].splice(i, 1); renderAttachments(); };
      chip.append(element("span", "", item.name), remove);
      box.append(chip);
    });
  }
}

function toBase64(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result.slice(reader.result.indexOf(",") + 1)); // drop "data:...;base64,"
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

async function attach(kind, name, blob) {
  if (blob.size > state.info.max_upload_bytes) {
    throw new Error(`${name} is larger than the ${state.info.max_upload_bytes} bytes the server takes`);
  }
  state.pending[kind].push({ name, base64: await toBase64(blob), url: URL.createObjectURL(blob) });
  renderAttachments();
}

async function addFiles(files) {
  for (const file of files) {
    try {
      if (file.type.startsWith("image/")) await attach("images", file.name, file);
      else if (file.type.startsWith("audio/") || /\.wav$/i.test(file.name)) await attach("audio", file.name, await asWav(file));
      else throw new Error(`${file.name} is not an image or an audio file`);
    } catch (error) {
      showError(error.message);
    }
  }
}

// A WAV file goes as it is (the server reads any WAV); other formats (mp3, ogg, ...) are decoded here.
async function asWav(file) {
  const bytes = await file.arrayBuffer();
  if (new TextDecoder().decode(bytes.slice(0, 4)) === "RIFF") return file;
  return toWav16k(bytes);
}

// Encoded audio -> a 16 kHz mono 16-bit WAV. decodeAudioData resamples to its context's rate, so a
// 16 kHz context does the resampling with the browser's band-limited filter; we mix the channels (their
// mean, as minimm/wav.py does) and cut at the longest clip the audio encoder reads.
async function toWav16k(encoded) {
  let decoded;
  try {
    decoded = await new OfflineAudioContext(1, 1, WAV_RATE).decodeAudioData(encoded);
  } catch (error) {
    throw new Error(`cannot decode this audio: ${error.message}`);
  }
  const n = Math.min(decoded.length, Math.floor(state.info.max_audio_seconds * WAV_RATE));
  const mono = new Float32Array(n);
  for (let c = 0; c < decoded.numberOfChannels; c++) {
    const channel = decoded.getChannelData(c);
    for (let i = 0; i < n; i++) mono[i] += channel[i] / decoded.numberOfChannels;
  }
  return encodeWav(mono, WAV_RATE);
}

function encodeWav(samples, rate) {
  // RIFF header (12 bytes), "fmt " chunk (8 + 16: PCM, 1 channel, rate, 16 bits), "data" chunk (8 + 2 per sample)
  const view = new DataView(new ArrayBuffer(44 + 2 * samples.length));
  const ascii = (offset, text) => [...text].forEach((c, i) => view.setUint8(offset + i, c.charCodeAt(0)));
  ascii(0, "RIFF");
  view.setUint32(4, 36 + 2 * samples.length, true);
  ascii(8, "WAVE");
  ascii(12, "fmt ");
  view.setUint32(16, 16, true); // fmt chunk size
  view.setUint16(20, 1, true); // PCM
  view.setUint16(22, 1, true); // channels
  view.setUint32(24, rate, true);
  view.setUint32(28, 2 * rate, true); // bytes per second
  view.setUint16(32, 2, true); // bytes per frame
  view.setUint16(34, 16, true); // bits per sample
  ascii(36, "data");
  view.setUint32(40, 2 * samples.length, true);
  samples.forEach((x, i) => view.setInt16(44 + 2 * i, Math.round(Math.max(-1, Math.min(1, x)) * 32767), true));
  return new Blob([view], { type: "audio/wav" });
}

// The microphone: MediaRecorder gives compressed audio (webm/opus, ogg, mp4 by browser); toWav16k turns
// it into what the model reads. Recording stops by itself at the longest clip the encoder takes.
async function toggleRecording() {
  if (state.recorder) return state.recorder.stop();
  if (!navigator.mediaDevices) return showError("recording needs the page on localhost or https");
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (error) {
    return showError(`microphone: ${error.message}`);
  }
  const chunks = [];
  const recorder = new MediaRecorder(stream);
  recorder.ondataavailable = (e) => chunks.push(e.data);
  recorder.onstop = async () => {
    stream.getTracks().forEach((track) => track.stop());
    state.recorder = null;
    $("record").textContent = "Record";
    $("record").classList.remove("recording");
    try {
      await attach("audio", "recording.wav", await toWav16k(await new Blob(chunks).arrayBuffer()));
    } catch (error) {
      showError(error.message);
    }
  };
  recorder.start();
  state.recorder = recorder;
  $("record").textContent = "Stop recording";
  $("record").classList.add("recording");
  setTimeout(() => recorder.state === "recording" && recorder.stop(), state.info.max_audio_seconds * 1000);
}

// ---- runs ------------------------------------------------------------------------------------------------

const runs = { selected: null, records: [], next: 0 };

async function refreshRuns() {
  const { runs: list } = await getJson("/api/runs");
  if (!runs.selected && list.length) runs.selected = list.some((r) => r.name === state.info.run) ? state.info.run : list[0].name;
  $("run-list").replaceChildren(...list.map((run) => {
    const live = !run.finished && run.idle_seconds < 60; // written to in the last minute
    const item = element("li", run.name === runs.selected ? "selected" : "");
    item.append(element("div", "", run.name), element("div", "muted",
      `step ${run.step ?? "-"} · ${run.finished ? "finished" : live ? "training" : "stopped"}`));
    item.onclick = () => { Object.assign(runs, { selected: run.name, records: [], next: 0 }); refreshRuns(); };
    return item;
  }));
  if (runs.selected) await refreshRun();
}

async function refreshRun() {
  // only the log lines we have not seen: a long run's log is not sent again every few seconds
  const run = await getJson(`/api/run?name=${encodeURIComponent(runs.selected)}&since=${runs.next}`);
  if (run.reset) runs.records = [];
  runs.records.push(...run.log);
  runs.next = run.next;
  $("run-title").textContent = run.name;
  const last = runs.records[runs.records.length - 1];
  $("run-status").textContent = last ? `${runs.records.length} log records, last at step ${last.step}` : "no log yet";
  drawChart(lossCurves(runs.records));
  fillTable($("eval-table"), run.eval);
  fillTable($("config-table"), run.config && Object.fromEntries(Object.entries(run.config).map(([k, v]) => [k, { value: v }])));
}

// {name: {column: value}} -> a table with one row per name and a column per key seen
function fillTable(table, rows) {
  const names = Object.keys(rows || {});
  const columns = [...new Set(names.flatMap((n) => Object.keys(rows[n] || {})))];
  const head = element("tr");
  head.append(element("th"), ...columns.map((c) => element("th", "", c)));
  table.replaceChildren(...(names.length ? [head] : []), ...names.map((name) => {
    const row = element("tr");
    row.append(element("th", "", name), ...columns.map((c) => {
      const v = rows[name]?.[c];
      if (typeof v === "number") return element("td", "number", String(+v.toPrecision(4)));
      return element("td", "", v === undefined ? "" : typeof v === "string" ? v : JSON.stringify(v));
    }));
    return row;
  }));
}

// {"train all": [[step, loss], ...], "val code": ...}, as minimm/plot.py reads log.jsonl
function lossCurves(records) {
  const curves = {};
  for (const record of records) {
    for (const split of ["train", "val"]) {
      for (const [task, loss] of Object.entries(record[split] || {})) {
        if (loss > 0 && Number.isFinite(loss)) (curves[`${split} ${task}`] ||= []).push([record.step, loss]);
      }
    }
  }
  return curves;
}

// Steps on a linear axis, loss on a log axis (losses fall by orders of magnitude early, by hundredths late).
function drawChart(curves) {
  const canvas = $("loss-chart");
  const ratio = window.devicePixelRatio || 1; // draw at the screen's resolution so lines stay sharp
  canvas.width = canvas.clientWidth * ratio;
  canvas.height = 360 * ratio;
  const ctx = canvas.getContext("2d");
  ctx.scale(ratio, ratio);
  const width = canvas.clientWidth, height = 360, margin = { left: 56, right: 16, top: 16, bottom: 32 };
  const points = Object.values(curves).flat();
  ctx.font = "12px system-ui, sans-serif";
  ctx.fillStyle = "#6b7280";
  if (!points.length) return ctx.fillText("no losses logged yet", margin.left, margin.top + 20);
  const maxStep = Math.max(...points.map((p) => p[0])) || 1;
  const lo = Math.log10(Math.min(...points.map((p) => p[1])));
  const hi = Math.max(Math.log10(Math.max(...points.map((p) => p[1]))), lo + 0.1);
  const x = (step) => margin.left + (width - margin.left - margin.right) * step / maxStep;
  const y = (loss) => height - margin.bottom - (height - margin.top - margin.bottom) * (Math.log10(loss) - lo) / (hi - lo);
  ctx.strokeStyle = "#dde1e7";
  for (let i = 0; i <= 4; i++) { // grid and ticks: five evenly spaced on each axis
    const loss = 10 ** (lo + (hi - lo) * i / 4), step = Math.round(maxStep * i / 4);
    ctx.beginPath(); ctx.moveTo(margin.left, y(loss)); ctx.lineTo(width - margin.right, y(loss)); ctx.stroke();
    ctx.fillText(loss.toPrecision(3), 4, y(loss) + 4);
    ctx.fillText(String(step), x(step) - 8, height - 10);
  }
  const tasks = [...new Set(Object.keys(curves).map((name) => name.split(" ")[1]))].sort();
  const legend = [];
  for (const [name, curve] of Object.entries(curves).sort()) {
    const [split, task] = name.split(" ");
    const color = COLORS[tasks.indexOf(task) % COLORS.length];
    ctx.strokeStyle = ctx.fillStyle = color;
    ctx.lineWidth = split === "train" ? 1.5 : 2;
    ctx.setLineDash(split === "train" ? [] : [5, 4]);
    ctx.beginPath();
    curve.forEach(([step, loss], i) => (i ? ctx.lineTo(x(step), y(loss)) : ctx.moveTo(x(step), y(loss))));
    ctx.stroke();
    if (split === "val") curve.forEach(([step, loss]) => ctx.fillRect(x(step) - 2, y(loss) - 2, 4, 4));
    const key = element("span", split, name);
    key.style.setProperty("--swatch", color);
    legend.push(key);
  }
  ctx.setLineDash([]);
  $("legend").replaceChildren(...legend);
}

// ---- start -----------------------------------------------------------------------------------------------

function showView(name) {
  document.querySelectorAll(".view").forEach((view) => { view.hidden = view.id !== `${name}-view`; });
  document.querySelectorAll(".tab").forEach((tab) => tab.classList.toggle("active", tab.dataset.view === name));
  if (name === "runs") refreshRuns().catch((e) => { $("run-status").textContent = e.message; });
}

function setTaskDefaults() {
  $("temperature").value = state.info.temperature[$("task").value];
}

async function start() {
  state.info = await getJson("/api/info");
  const info = state.info;
  $("model-info").textContent = `${info.out_dir} · step ${info.step} · context ${info.block_size} tokens`;
  $("task").replaceChildren(...info.tasks.map((t) => Object.assign(element("option", "", t), { value: t })));
  $("task").onchange = setTaskDefaults;
  setTaskDefaults();
  $("max-tokens").max = info.max_new_tokens;
  $("max-tokens").value = info.max_new_tokens;
  $("record").disabled = !info.audio;
  $("composer").onsubmit = send;
  $("prompt").onkeydown = (e) => { // Enter sends; it never stops an answer (only the Stop button does)
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      if (!state.controller) $("composer").requestSubmit();
    }
  };
  $("new-chat").onclick = () => { state.turns = []; $("messages").replaceChildren(); showError(""); };
  $("image-input").onchange = (e) => { addFiles(e.target.files); e.target.value = ""; };
  $("audio-input").onchange = (e) => { addFiles(e.target.files); e.target.value = ""; };
  $("record").onclick = toggleRecording;
  const drop = $("chat-view");
  drop.ondragover = (e) => { e.preventDefault(); drop.classList.add("dragging"); };
  drop.ondragleave = () => drop.classList.remove("dragging");
  drop.ondrop = (e) => { e.preventDefault(); drop.classList.remove("dragging"); addFiles(e.dataTransfer.files); };
  document.querySelectorAll(".tab").forEach((tab) => { tab.onclick = () => { location.hash = tab.dataset.view; }; });
  window.onhashchange = () => showView(location.hash === "#runs" ? "runs" : "chat");
  window.onhashchange();
  setInterval(() => { if (!$("runs-view").hidden) refreshRuns().catch(() => {}); }, POLL_MS);
}

start().catch((error) => showError(`cannot reach the server: ${error.message}`));
