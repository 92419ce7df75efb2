// The page at "/": transcribe a file (POST /v1/audio/transcriptions, streamed) or the microphone
// (WebSocket /v1/realtime), using only the server's public API. No build step, nothing fetched
// from elsewhere. The transcript list carries data-state ("idle", "transcribing", "recording",
// "done", "error") and data-partials (partial updates seen): the browser tests read them.
"use strict";

const LABELS = {
  en: {
    connecting: "Connecting…", ready: "Ready: model {model}", loading: "The models are loading…",
    unreachable: "Cannot reach the server", keyPrompt: "This server needs an API key.", keySave: "Use key",
    language: "Language", auto: "Auto", itn: "Numbers and punctuation (ITN)", hotwords: "Hotwords",
    hotwordsHint: "comma-separated, e.g. 通义, ModelScope", fileTitle: "File",
    dropHint: "Drop an audio or video file here, or click to pick one", format: "Output",
    transcribe: "Transcribe", cancel: "Cancel", micTitle: "Microphone", record: "Record", stop: "Stop",
    micHint: "Press Record and speak: partial text shows in grey, each finished segment in black.",
    recording: "Recording (WAV)", transcript: "Transcript", copy: "Copy text", copied: "Copied",
    download: "Download", transcribing: "Transcribing {name}…", done: "Done: {seconds} s of audio",
    listening: "Listening…", finishing: "Finishing the last segment…", stopped: "Stopped",
    noMic: "The microphone needs https or localhost, and a browser that supports it",
    tooLarge: "{name}: {size} MB is more than this server's upload limit of {limit} MB",
    micDenied: "No microphone: {reason}", serverGone: "The connection to the server was lost",
    footer: "Runs on this server: the page uses its public API (POST /v1/audio/transcriptions, WebSocket /v1/realtime).",
    noCtc: "{checkpoint} without a CTC head: no live partial text, times per segment only",
    speakers: "Speakers", speaker: "Speaker {n}",
  },
  zh: {
    connecting: "正在连接…", ready: "就绪：模型 {model}", loading: "模型加载中…",
    unreachable: "无法连接服务器", keyPrompt: "此服务器需要 API 密钥。", keySave: "使用密钥",
    language: "语言", auto: "自动", itn: "数字与标点规整（ITN）", hotwords: "热词",
    hotwordsHint: "用逗号分隔，例如 通义, ModelScope", fileTitle: "文件",
    dropHint: "将音频或视频文件拖到这里，或点击选择", format: "输出格式",
    transcribe: "转写", cancel: "取消", micTitle: "麦克风", record: "录音", stop: "停止",
    micHint: "点击录音后说话：未完成的文字显示为灰色，每段结束后显示为黑色。",
    recording: "录音（WAV）", transcript: "转写结果", copy: "复制文本", copied: "已复制",
    download: "下载", transcribing: "正在转写 {name}…", done: "完成：{seconds} 秒音频",
    listening: "正在听…", finishing: "正在完成最后一段…", stopped: "已停止",
    noMic: "麦克风需要 https 或 localhost，以及支持它的浏览器",
    tooLarge: "{name}：{size} MB 超过了服务器的上传上限 {limit} MB",
    micDenied: "无法使用麦克风：{reason}", serverGone: "与服务器的连接已断开",
    footer: "在本服务器上运行：页面只使用其公开 API（POST /v1/audio/transcriptions，WebSocket /v1/realtime）。",
    noCtc: "{checkpoint} 没有 CTC 头：无实时部分文字，时间只到分段",
    speakers: "区分说话人", speaker: "说话人 {n}",
  },
};
const KEY_STORAGE = "funasr-api-key";
const SAMPLE_RATE = 16000;
const SPEAKER_COLORS = 8; // page.css colours speakers 0-7, then again from the first

const $ = (id) => document.getElementById(id);
let lang = (localStorage.getItem("funasr-page-lang") || navigator.language || "en").startsWith("zh") ? "zh" : "en";
let apiKey = sessionStorage.getItem(KEY_STORAGE) || "";
let modelName = "fun-asr-nano";
let maxUploadBytes = Infinity; // the server's --max-upload-mb, from /health
let result = null; // {name, text, documents, segments} of the last file
let upload = null; // AbortController of the request in flight
let mic = null; // the recording in progress

function t(key, values = {}) {
  const text = LABELS[lang][key] || LABELS.en[key] || key;
  return text.replace(/\{(\w+)\}/g, (_, name) => String(values[name] ?? ""));
}

function applyLabels() {
  document.documentElement.lang = lang === "zh" ? "zh-CN" : "en";
  for (const el of document.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  for (const el of document.querySelectorAll("[data-i18n-placeholder]")) el.placeholder = t(el.dataset.i18nPlaceholder);
  for (const el of document.querySelectorAll("#transcript .speaker")) {
    el.textContent = t("speaker", { n: Number(el.closest("li").dataset.speaker) + 1 });
  }
  $("lang-toggle").textContent = lang === "zh" ? "English" : "中文";
}

function setStatus(key, values) {
  $("status").dataset.i18n = key;
  $("status").textContent = t(key, values);
}

function showError(message) {
  const line = String(message || "").split("\n")[0];
  $("error").textContent = line;
  $("error").hidden = !line;
  if (line) $("transcript").dataset.state = "error";
}

function authHeaders() {
  return apiKey ? { Authorization: `Bearer ${apiKey}` } : {};
}

// One readable line from an API error response (OpenAI's {"error": {"message"}} shape).
async function errorLine(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return `${response.status}: ${body.error.message}`;
  } catch (_) { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}

function askForKey() {
  sessionStorage.removeItem(KEY_STORAGE);
  apiKey = "";
  $("key-form").hidden = false;
  $("key-input").focus();
}

// The loaded checkpoint (from /health): its languages fill the language menu (named in their own
// language by the browser), and what a checkpoint without CTC weights cannot do is said under the header.
function showCheckpoint(info) {
  const select = $("language");
  const chosen = select.value;
  for (const option of [...select.options]) if (option.value) option.remove();
  for (const code of info.languages || []) {
    let name = code;
    try { name = new Intl.DisplayNames([code], { type: "language" }).of(code) || code; } catch (err) { /* unknown tag */ }
    select.add(new Option(`${name} (${code})`, code));
  }
  select.value = [...select.options].some((o) => o.value === chosen) ? chosen : "";
  const capabilities = info.capabilities || {};
  const note = $("capabilities");
  note.dataset.livePartials = String(Boolean(capabilities.live_partials));
  note.textContent = capabilities.live_partials ? "" : t("noCtc", { checkpoint: info.checkpoint });
  note.hidden = Boolean(capabilities.live_partials);
}

async function connect() {
  try {
    const health = await fetch("/health");
    if (health.status === 503) {
      const line = await errorLine(health);
      if (line.includes("loading")) {
        setStatus("loading");
        setTimeout(connect, 2000);
        return;
      }
      showError(line);
      return;
    }
    if (health.ok) {
      const info = await health.json();
      maxUploadBytes = (info.limits || {}).max_upload_bytes || Infinity;
      if (info.checkpoint) showCheckpoint(info.checkpoint);
      $("speakers-option").hidden = !info.diarization; // the server has CAM++ (campplus.onnx)
    }
    const models = await fetch("/v1/models", { headers: authHeaders() });
    if (models.status === 401) {
      askForKey();
      return;
    }
    if (!models.ok) {
      showError(await errorLine(models));
      return;
    }
    const body = await models.json();
    modelName = (body.data && body.data[0] && body.data[0].id) || modelName;
    $("key-form").hidden = true;
    setStatus("ready", { model: modelName });
  } catch (err) {
    setStatus("unreachable");
    showError(`${t("unreachable")}: ${err.message}`);
  }
}

// ------------------------------------------------------------------ transcript list

function clock(seconds) {
  const m = Math.floor(seconds / 60);
  const s = seconds - 60 * m;
  return `${String(m).padStart(2, "0")}:${s.toFixed(1).padStart(4, "0")}`;
}

function clearTranscript(state) {
  $("transcript").replaceChildren();
  $("transcript").dataset.state = state;
  $("transcript").dataset.partials = "0";
  $("copy").disabled = true;
  $("download").hidden = true;
  showError("");
}

function segmentRow(id, final) {
  let row = document.querySelector(`#transcript li[data-id="${CSS.escape(id)}"]`);
  if (!row) {
    row = document.createElement("li");
    row.dataset.id = id;
    const time = document.createElement("span");
    time.className = "time";
    const text = document.createElement("span");
    text.className = "text";
    row.append(time, text);
    $("transcript").append(row);
  }
  row.className = final ? "final" : "partial";
  return row;
}

function setRow(id, start, end, text, final) {
  const row = segmentRow(id, final);
  if (start !== null) row.querySelector(".time").textContent = `${clock(start)} – ${end === null ? "" : clock(end)}`;
  row.querySelector(".text").textContent = text;
  row.scrollIntoView({ block: "nearest" });
}

// A speaker (0 for the first voice heard) on a row: its label and colour. Speakers are found once the whole
// file is read, so they arrive with the done event, after the rows.
function setSpeaker(id, speaker) {
  const row = document.querySelector(`#transcript li[data-id="${CSS.escape(id)}"]`);
  if (!row || !Number.isInteger(speaker) || speaker < 0) return;
  row.dataset.speaker = String(speaker);
  row.dataset.color = String(speaker % SPEAKER_COLORS);
  let label = row.querySelector(".speaker");
  if (!label) {
    label = document.createElement("span");
    label.className = "speaker";
    row.querySelector(".time").after(label);
  }
  label.textContent = t("speaker", { n: speaker + 1 });
}

function transcriptText() {
  return [...document.querySelectorAll("#transcript li.final .text")].map((el) => el.textContent).join("\n");
}

// ------------------------------------------------------------------ file

function fileChosen(file) {
  if (!file) return;
  $("drop").querySelector("span").textContent = file.name;
  $("drop").file = file;
  $("transcribe").disabled = false;
}

function formOptions(form) {
  if ($("language").value) form.append("language", $("language").value);
  form.append("itn", $("itn").checked ? "true" : "false");
  const hotwords = $("hotwords").value.trim();
  if (hotwords) form.append("hotwords", hotwords);
}

async function transcribeFile() {
  const file = $("drop").file;
  if (!file || upload) return;
  clearTranscript("transcribing");
  result = null;
  if (file.size > maxUploadBytes) { // refused before a byte is sent (a browser may not read an early 413)
    showError(t("tooLarge", { name: file.name, size: (file.size / 2 ** 20).toFixed(1),
      limit: +(maxUploadBytes / 2 ** 20).toFixed(2) }));
    return;
  }
  setStatus("transcribing", { name: file.name });
  const form = new FormData();
  form.append("file", file, file.name);
  form.append("model", modelName);
  form.append("response_format", "verbose_json"); // timestamped: the done event brings srt, vtt and json
  form.append("stream", "true");
  // speakers: verbose_json with our diarize field (the done event then brings the speakers, and srt, vtt and
  // json that name them), rather than diarized_json, whose stream has no srt or vtt to download
  if (!$("speakers-option").hidden && $("speakers").checked) form.append("diarize", "true");
  formOptions(form);
  upload = new AbortController();
  $("transcribe").disabled = true;
  $("cancel").hidden = false;
  try {
    const response = await fetch("/v1/audio/transcriptions",
      { method: "POST", body: form, headers: authHeaders(), signal: upload.signal });
    if (response.status === 401) askForKey();
    if (!response.ok) throw new Error(await errorLine(response));
    await readEvents(response, file.name);
  } catch (err) {
    showError(err.name === "AbortError" ? t("stopped") : (err.message === "Failed to fetch" ? t("serverGone") : err.message));
    setStatus("stopped");
  } finally {
    upload = null;
    $("transcribe").disabled = false;
    $("cancel").hidden = true;
  }
}

// Server-sent events: "data: {json}" blocks separated by a blank line.
async function readEvents(response, name) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let finished = false;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("");
      if (data) finished = onStreamEvent(JSON.parse(data), name) || finished;
    }
  }
  if (!finished && $("transcript").dataset.state === "transcribing") throw new Error(t("serverGone"));
}

function onStreamEvent(event, name) {
  if (event.type === "transcript.text.delta" && event.segment) {
    const s = event.segment;
    setRow(`file-${s.id}`, s.start, s.end, s.text, true);
  } else if (event.type === "transcript.text.done") {
    result = { name, text: event.text, documents: event.documents || {}, segments: event.segments || [] };
    for (const s of result.segments) if (s.speaker !== undefined) setSpeaker(`file-${s.id}`, s.speaker);
    $("transcript").dataset.state = "done";
    $("copy").disabled = false;
    setStatus("done", { seconds: event.usage ? event.usage.seconds : "?" });
    updateDownload();
    return true;
  } else if (event.type === "error") {
    throw new Error(event.error && event.error.message ? event.error.message : "error");
  }
  return false;
}

function documentFor(format) {
  if (!result) return null;
  const docs = result.documents;
  if (format === "txt") return { body: `${speakerTurns() || result.text}\n`, type: "text/plain" };
  if (format === "json") return { body: JSON.stringify(docs.verbose_json || { text: result.text, segments: result.segments }, null, 2),
    type: "application/json" };
  if (format === "srt" && docs.srt) return { body: docs.srt, type: "application/x-subrip" };
  if (format === "vtt" && docs.vtt) return { body: docs.vtt, type: "text/vtt" };
  return null;
}

// With speakers, txt is a paragraph per turn, "Speaker N: ...", as the command line writes it (from segments here).
function speakerTurns() {
  const turns = [];
  for (const s of result.segments) {
    const text = String(s.text || "").trim();
    if (s.speaker === undefined || !text) continue;
    const last = turns[turns.length - 1];
    if (last && last.speaker === s.speaker) last.parts.push(text);
    else turns.push({ speaker: s.speaker, parts: [text] });
  }
  return turns.map((turn) => `${LABELS.en.speaker.replace("{n}", turn.speaker + 1)}: ${joinTexts(turn.parts)}`)
    .join("\n\n");
}

// The server's join_texts: a space between Latin words (and after Latin punctuation), none between CJK characters.
function joinTexts(parts) {
  const word = (ch) => /^[A-Za-z0-9]$/.test(ch);
  let out = "";
  for (const part of parts) {
    if (out && ((word(out.slice(-1)) && word(part[0])) || (".,!?;:".includes(out.slice(-1)) && part.charCodeAt(0) < 128))) {
      out += " ";
    }
    out += part;
  }
  return out;
}

function updateDownload() {
  const link = $("download");
  const format = $("format").value;
  const doc = documentFor(format);
  if (link.href.startsWith("blob:")) URL.revokeObjectURL(link.href);
  if (!doc) {
    link.hidden = true;
    link.removeAttribute("href");
    return;
  }
  link.href = URL.createObjectURL(new Blob([doc.body], { type: `${doc.type};charset=utf-8` }));
  link.download = `${result.name.replace(/\.[^.]*$/, "") || "transcript"}.${format}`;
  link.textContent = `${t("download")} .${format}`;
  link.hidden = false;
}

async function copyText() {
  const text = result && $("transcript").dataset.state === "done" ? result.text : transcriptText();
  try {
    await navigator.clipboard.writeText(text);
  } catch (_) { // not a secure context: the old way
    const area = document.createElement("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  $("copy").textContent = t("copied");
  setTimeout(() => { $("copy").textContent = t("copy"); }, 1500);
}

// ------------------------------------------------------------------ microphone

function realtimeUrl() {
  return `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/v1/realtime?intent=transcription`;
}

function base64(bytes) {
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(binary);
}

function wavFile(chunks, rate) {
  const length = chunks.reduce((n, c) => n + c.byteLength, 0);
  const view = new DataView(new ArrayBuffer(44));
  const text = (at, s) => [...s].forEach((ch, i) => view.setUint8(at + i, ch.charCodeAt(0)));
  text(0, "RIFF"); view.setUint32(4, 36 + length, true); text(8, "WAVE"); text(12, "fmt ");
  view.setUint32(16, 16, true); view.setUint16(20, 1, true); view.setUint16(22, 1, true);
  view.setUint32(24, rate, true); view.setUint32(28, rate * 2, true); view.setUint16(32, 2, true);
  view.setUint16(34, 16, true); text(36, "data"); view.setUint32(40, length, true);
  return new Blob([view, ...chunks], { type: "audio/wav" });
}

async function startRecording() {
  if (mic) return;
  if (!navigator.mediaDevices || !window.AudioWorkletNode) {
    showError(t("noMic"));
    return;
  }
  clearTranscript("recording");
  result = null;
  $("recording").hidden = true;
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia(
      { audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false } });
  } catch (err) {
    showError(t("micDenied", { reason: err.message || err.name }));
    return;
  }
  let context;
  try {
    context = new AudioContext({ sampleRate: SAMPLE_RATE }); // the browser resamples the microphone
  } catch (_) {
    context = new AudioContext(); // the server resamples whatever rate this is
  }
  const session = { stream, context, chunks: [], pending: new Set(), closing: false, socket: null };
  mic = session;
  $("record").disabled = true;
  $("stop").disabled = false;
  const protocols = ["realtime"];
  if (apiKey) protocols.push(`openai-insecure-api-key.${apiKey}`);
  const socket = new WebSocket(realtimeUrl(), protocols);
  session.socket = socket;
  socket.onopen = () => {
    const transcription = { language: $("language").value, prompt: $("hotwords").value.trim() };
    socket.send(JSON.stringify({ type: "session.update", session: { type: "transcription", audio: { input: {
      format: { type: "audio/pcm", rate: context.sampleRate }, transcription, turn_detection: { type: "server_vad" },
    } } } }));
  };
  socket.onmessage = (message) => onRealtimeEvent(session, JSON.parse(message.data));
  socket.onerror = () => {};
  socket.onclose = () => {
    if (!session.closing) showError(t("serverGone"));
    endRecording(session);
  };
  try {
    const source = context.createMediaStreamSource(stream);
    await context.audioWorklet.addModule("/ui/pcm-worklet.js");
    const node = new AudioWorkletNode(context, "pcm-chunker");
    node.port.onmessage = ({ data }) => {
      const pcm = new Uint8Array(data.pcm);
      if (session.closing) return;
      session.chunks.push(pcm);
      const decibels = 20 * Math.log10(data.rms + 1e-9); // -60 dB (silence) .. 0 dB (full scale)
      $("level").style.width = `${Math.min(100, Math.max(0, (decibels + 60) / 60 * 100))}%`;
      if (socket.readyState === WebSocket.OPEN) {
        socket.send(JSON.stringify({ type: "input_audio_buffer.append", audio: base64(pcm) }));
      }
    };
    source.connect(node);
    const mute = context.createGain(); // a path to the speakers, silent: the graph is then pulled
    mute.gain.value = 0;
    node.connect(mute).connect(context.destination);
    await context.resume(); // a context made after an await may start suspended
    session.node = node;
    setStatus("listening");
  } catch (err) {
    showError(t("micDenied", { reason: err.message }));
    stopRecording();
  }
}

function onRealtimeEvent(session, event) {
  const list = $("transcript");
  switch (event.type) {
    case "input_audio_buffer.speech_started":
      session.pending.add(event.item_id);
      setRow(event.item_id, event.audio_start_ms / 1000, null, "…", false);
      break;
    case "conversation.item.input_audio_transcription.delta":
      session.pending.add(event.item_id);
      list.dataset.partials = String(Number(list.dataset.partials) + 1);
      setRow(event.item_id, null, null, event.partial ?? event.delta, false);
      break;
    case "conversation.item.input_audio_transcription.completed":
      session.pending.delete(event.item_id);
      setRow(event.item_id, event.audio_start_ms / 1000, event.audio_end_ms / 1000, event.transcript, true);
      $("copy").disabled = false;
      break;
    case "conversation.item.input_audio_transcription.failed":
      session.pending.delete(event.item_id);
      showError(event.error ? event.error.message : "transcription failed");
      break;
    case "error": {
      const error = event.error || {};
      if (error.code === "input_audio_buffer_commit_empty") break; // Stop between two segments
      if (error.code === "invalid_api_key") askForKey();
      showError(error.message || error.code);
      break;
    }
    default:
      break;
  }
  if (session.closing && session.pending.size === 0) session.socket.close(1000);
}

function stopRecording() {
  const session = mic;
  if (!session || session.closing) return;
  session.closing = true;
  $("stop").disabled = true;
  session.stream.getTracks().forEach((track) => track.stop());
  if (session.node) session.node.port.onmessage = null;
  session.context.close();
  $("level").style.width = "0";
  const socket = session.socket;
  if (socket.readyState === WebSocket.OPEN) {
    setStatus("finishing");
    socket.send(JSON.stringify({ type: "input_audio_buffer.commit" })); // the segment in progress ends now
    if (session.pending.size === 0) setTimeout(() => socket.close(1000), 1000);
    setTimeout(() => socket.close(1000), 30000); // never wait forever for the last final
  } else {
    socket.close();
  }
}

function endRecording(session) {
  if (mic !== session) return;
  if (!session.closing) {
    session.closing = true;
    session.stream.getTracks().forEach((track) => track.stop());
    session.context.close();
  }
  mic = null;
  for (const row of document.querySelectorAll("#transcript li.partial")) if (row.querySelector(".text").textContent === "…") row.remove();
  if (session.chunks.length) {
    const link = $("recording");
    if (link.href.startsWith("blob:")) URL.revokeObjectURL(link.href);
    link.href = URL.createObjectURL(wavFile(session.chunks, session.context.sampleRate));
    link.download = "recording.wav";
    link.hidden = false;
  }
  $("record").disabled = false;
  $("stop").disabled = true;
  $("level").style.width = "0";
  if ($("transcript").dataset.state === "recording") $("transcript").dataset.state = "done";
  setStatus("stopped");
}

// ------------------------------------------------------------------ wiring

function init() {
  applyLabels();
  $("lang-toggle").onclick = () => {
    lang = lang === "zh" ? "en" : "zh";
    localStorage.setItem("funasr-page-lang", lang);
    applyLabels();
    if (result) updateDownload();
  };
  $("key-form").onsubmit = (e) => {
    e.preventDefault();
    apiKey = $("key-input").value.trim();
    sessionStorage.setItem(KEY_STORAGE, apiKey);
    $("key-input").value = "";
    showError("");
    connect();
  };
  const drop = $("drop");
  drop.ondragover = (e) => { e.preventDefault(); drop.classList.add("over"); };
  drop.ondragleave = () => drop.classList.remove("over");
  drop.ondrop = (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    fileChosen(e.dataTransfer.files[0]);
  };
  $("file").onchange = (e) => fileChosen(e.target.files[0]);
  $("transcribe").onclick = transcribeFile;
  $("cancel").onclick = () => upload && upload.abort();
  $("format").onchange = updateDownload;
  $("copy").onclick = copyText;
  $("record").onclick = startRecording;
  $("stop").onclick = stopRecording;
  connect();
}

init();
