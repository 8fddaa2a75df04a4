// dreamserve playground: plain browser JavaScript, no build step. It uses only the public API
// (Run, Task/List, Task/Detail, Task/Cancel, Task/Kill, the /v1 socket), signed here like Wiro's clients.
"use strict";

// The server's vocabulary and limits (dreamserve/status.py, params.py), inlined into the page by api/web.py.
const CONFIG = JSON.parse(document.getElementById("dreamserve-config").textContent);
const { model: MODEL, maxReferences: MAX_REFERENCES, maxImages: MAX_IMAGES } = CONFIG;
const S = CONFIG.status; // TaskStatus of status.py by name: S.POSTPROCESS_END, S.CANCEL, ...
const F = CONFIG.frame; // its Frame: F.INFO, F.OUTPUT, F.ERROR, ...
const P = CONFIG.pexit; // P.OK === "0", P.KILLED === "137", ...
const TERMINAL = new Set(CONFIG.terminal);
const RUNNING = new Set(CONFIG.running);
const STATUS_TEXT = CONFIG.statusText;
const STORE = { key: "dreamserve.apiKey", secret: "dreamserve.apiSecret" };

const $ = (selector, root = document) => root.querySelector(selector);
const state = { key: "", secret: "", lastNonce: 0, references: [], listTimer: null };

// -- signing: hex(HMAC-SHA256(key = API key, message = secret + nonce)), Wiro's scheme -------------

const utf8 = (text) => new TextEncoder().encode(text);
const toHex = (bytes) => Array.from(new Uint8Array(bytes), (b) => b.toString(16).padStart(2, "0")).join("");

async function hmacHex(key, message) {
  // WebCrypto exists only in secure contexts (https, localhost): a server opened by its LAN address
  // over plain http gets the small implementation below instead.
  if (window.crypto && window.crypto.subtle) {
    const cryptoKey = await crypto.subtle.importKey("raw", utf8(key), { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
    return toHex(await crypto.subtle.sign("HMAC", cryptoKey, utf8(message)));
  }
  return hmacSha256Hex(key, message);
}

const SHA_K = new Uint32Array(64);
const SHA_H = new Uint32Array(8);
(function shaConstants() {
  // Fractional parts of the square and cube roots of the first primes (FIPS 180-4, section 4.2.2).
  const primes = [];
  for (let n = 2; primes.length < 64; n++) if (primes.every((p) => n % p)) primes.push(n);
  const frac = (x) => ((x - Math.floor(x)) * 2 ** 32) >>> 0;
  primes.forEach((p, i) => {
    SHA_K[i] = frac(Math.cbrt(p));
    if (i < 8) SHA_H[i] = frac(Math.sqrt(p));
  });
})();

function sha256(data) {
  const rotr = (x, n) => (x >>> n) | (x << (32 - n));
  const length = ((data.length + 9 + 63) >> 6) << 6;
  const padded = new Uint8Array(length);
  padded.set(data);
  padded[data.length] = 0x80;
  const view = new DataView(padded.buffer);
  view.setUint32(length - 8, Math.floor((data.length * 8) / 2 ** 32));
  view.setUint32(length - 4, (data.length * 8) >>> 0);
  const hash = SHA_H.slice();
  const w = new Uint32Array(64);
  for (let offset = 0; offset < length; offset += 64) {
    for (let t = 0; t < 16; t++) w[t] = view.getUint32(offset + 4 * t);
    for (let t = 16; t < 64; t++) {
      const s0 = rotr(w[t - 15], 7) ^ rotr(w[t - 15], 18) ^ (w[t - 15] >>> 3);
      const s1 = rotr(w[t - 2], 17) ^ rotr(w[t - 2], 19) ^ (w[t - 2] >>> 10);
      w[t] = (w[t - 16] + s0 + w[t - 7] + s1) | 0;
    }
    let [a, b, c, d, e, f, g, h] = hash;
    for (let t = 0; t < 64; t++) {
      const t1 = (h + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + SHA_K[t] + w[t]) | 0;
      const t2 = ((rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c))) | 0;
      [h, g, f, e, d, c, b, a] = [g, f, e, (d + t1) | 0, c, b, a, (t1 + t2) | 0];
    }
    [a, b, c, d, e, f, g, h].forEach((value, i) => { hash[i] += value; });
  }
  const out = new Uint8Array(32);
  hash.forEach((value, i) => new DataView(out.buffer).setUint32(4 * i, value));
  return out;
}

function hmacSha256Hex(key, message) {
  let block = utf8(key);
  if (block.length > 64) block = sha256(block);
  const inner = new Uint8Array(64 + utf8(message).length);
  const outer = new Uint8Array(64 + 32);
  for (let i = 0; i < 64; i++) {
    inner[i] = (block[i] || 0) ^ 0x36;
    outer[i] = (block[i] || 0) ^ 0x5c;
  }
  inner.set(utf8(message), 64);
  outer.set(sha256(inner), 64);
  return toHex(sha256(outer));
}

async function authHeaders() {
  if (!state.key) throw new Error("Enter the API key (and secret) under Credentials first.");
  if (!state.secret) return { "x-api-key": state.key };
  // Milliseconds, strictly increasing: a server that takes each nonce once must never see one twice.
  state.lastNonce = Math.max(Date.now(), state.lastNonce + 1);
  const nonce = String(state.lastNonce);
  return { "x-api-key": state.key, "x-nonce": nonce, "x-signature": await hmacHex(state.key, state.secret + nonce) };
}

async function api(path, body) {
  const headers = await authHeaders();
  const init = { method: "POST", headers };
  if (body instanceof FormData) {
    init.body = body;
  } else {
    headers["content-type"] = "application/json";
    init.body = JSON.stringify(body || {});
  }
  const response = await fetch(path, init);
  let data = null;
  try {
    data = await response.json();
  } catch (_) {
    throw new Error(`${path} answered HTTP ${response.status}.`);
  }
  if (!data.result) {
    const error = (data.errors && data.errors[0] && data.errors[0].message) || `HTTP ${response.status}`;
    throw new Error(error);
  }
  return data;
}

// -- messages and credentials ----------------------------------------------------------------------

function say(text, kind = "error") {
  const box = $("#message");
  box.textContent = text;
  box.className = kind === "info" ? "info" : "";
  box.hidden = !text;
}

function loadCredentials() {
  state.key = localStorage.getItem(STORE.key) || "";
  state.secret = localStorage.getItem(STORE.secret) || "";
  $("#api-key").value = state.key;
  $("#api-secret").value = state.secret;
  $("#credentials").open = !state.key;
  $("#credentials").dataset.set = state.key ? "yes" : "no";
}

function saveCredentials(event) {
  event.preventDefault();
  state.key = $("#api-key").value.trim();
  state.secret = $("#api-secret").value.trim();
  localStorage.setItem(STORE.key, state.key);
  localStorage.setItem(STORE.secret, state.secret);
  $("#credentials").dataset.set = state.key ? "yes" : "no";
  $("#credentials").open = false;
  say("");
  refreshTasks();
}

function forgetCredentials() {
  localStorage.removeItem(STORE.key);
  localStorage.removeItem(STORE.secret);
  loadCredentials();
  $("#tasks").replaceChildren();
}

// -- reference images ------------------------------------------------------------------------------

function addReferences(files) {
  const images = Array.from(files).filter((file) => file.type.startsWith("image/"));
  const room = MAX_REFERENCES - state.references.length;
  if (images.length > room) say(`At most ${MAX_REFERENCES} reference images: ${images.length - room} left out.`);
  for (const file of images.slice(0, Math.max(0, room))) {
    state.references.push({ file, url: URL.createObjectURL(file) });
  }
  drawReferences();
}

function drawReferences() {
  const list = $("#refs");
  list.replaceChildren(
    ...state.references.map((ref, index) => {
      const item = document.createElement("li");
      const img = document.createElement("img");
      img.src = ref.url;
      img.alt = ref.file.name;
      img.title = ref.file.name;
      const remove = document.createElement("button");
      remove.type = "button";
      remove.textContent = "x";
      remove.setAttribute("aria-label", `Remove ${ref.file.name}`);
      remove.addEventListener("click", () => {
        URL.revokeObjectURL(ref.url);
        state.references.splice(index, 1);
        drawReferences();
      });
      item.append(img, remove);
      return item;
    }),
  );
  $("#refs-count").textContent = `${state.references.length} / ${MAX_REFERENCES}`;
  $("#count").max = String(Math.max(1, MAX_IMAGES - state.references.length));
}

function wireDropZone() {
  const zone = $("#drop");
  const input = $("#file-input");
  zone.addEventListener("click", () => input.click());
  zone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") input.click();
  });
  input.addEventListener("change", () => {
    addReferences(input.files);
    input.value = "";
  });
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (event) => {
      event.preventDefault();
      zone.classList.add("over");
    });
  }
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    addReferences(event.dataTransfer.files);
  });
}

// -- running a task and following it live ----------------------------------------------------------

function chosenSize() {
  const choice = $("#size").value;
  return choice === "custom" ? $("#custom-size").value.trim() : choice;
}

async function submitRun(event) {
  event.preventDefault();
  const prompt = $("#prompt").value.trim();
  const count = Number($("#count").value || 1);
  if (!prompt) return say("Describe the image in the prompt.");
  if (count + state.references.length > MAX_IMAGES) {
    return say(`Images plus references must be at most ${MAX_IMAGES}: ask for fewer images or send fewer references.`);
  }
  const form = new FormData();
  form.append("prompt", prompt);
  form.append("size", chosenSize());
  form.append("maxImages", String(count));
  form.append("watermark", $("#watermark").checked ? "true" : "false");
  if ($("#seed").value !== "") form.append("seed", $("#seed").value);
  for (const ref of state.references) form.append("inputImage", ref.file, ref.file.name);
  const button = $("#submit");
  button.disabled = true;
  try {
    const run = await api(`/v1/Run/${MODEL}`, form);
    say("");
    follow(run.taskid, run.socketaccesstoken, addRunCard(run.taskid, prompt));
    refreshTasks();
  } catch (error) {
    say(error.message);
  } finally {
    button.disabled = false;
  }
}

function addRunCard(taskid, prompt) {
  const card = document.createElement("li");
  card.className = "run";
  card.dataset.taskid = taskid;
  card.dataset.state = "queued";
  card.dataset.percent = "0";
  card.dataset.steps = "0";
  card.innerHTML = `
    <div class="top"><strong></strong><span class="prompt"></span><span class="status">queued</span></div>
    <div class="bar"><div class="fill"></div></div>
    <div class="detail"><span class="steps"></span><span class="eta"></span></div>
    <img class="preview" alt="preview" hidden>
    <div class="error" hidden></div>`;
  $("strong", card).textContent = `Task ${taskid}`;
  $(".prompt", card).textContent = prompt;
  $("#runs").prepend(card);
  return card;
}

function setProgress(card, percent) {
  const value = Math.max(0, Math.min(100, percent));
  card.dataset.percent = String(Math.round(value));
  $(".fill", card).style.width = `${value}%`;
}

function decode(message) {
  if (typeof message !== "string") return message;
  try {
    return JSON.parse(message);
  } catch (_) {
    return message;
  }
}

function follow(taskid, token, card) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const socket = new WebSocket(`${scheme}//${location.host}/v1`);
  let ended = false;
  socket.addEventListener("open", () => socket.send(JSON.stringify({ type: F.INFO, tasktoken: token })));
  socket.addEventListener("message", (event) => {
    const frame = JSON.parse(event.data);
    if (frame.type === "error") return showError(card, frame.message);
    onFrame(card, frame.type, decode(frame.message));
    if (TERMINAL.has(frame.type)) {
      ended = true;
      socket.close();
    }
  });
  // A dropped socket (proxy, restart) falls back to polling Task/Detail until the task ends.
  socket.addEventListener("close", () => { if (!ended) poll(taskid, card); });
}

async function poll(taskid, card) {
  while (true) {
    await new Promise((resolve) => setTimeout(resolve, 2000));
    try {
      const task = (await api("/v1/Task/Detail", { taskid })).tasklist[0];
      if (task.progress) onFrame(card, F.OUTPUT, decode(task.progress));
      onFrame(card, task.status, task.status === S.POSTPROCESS_END ? task.outputs : null);
      if (TERMINAL.has(task.status)) return;
    } catch (error) {
      showError(card, error.message);
    }
  }
}

function onFrame(card, type, message) {
  if (type === F.OUTPUT && message && typeof message === "object") {
    const step = Number(message.stepCurrent);
    const total = Number(message.stepTotal);
    const percent = message.percentage !== undefined ? Number(message.percentage) : (100 * step) / total;
    setProgress(card, percent);
    card.dataset.steps = String(Number(card.dataset.steps) + 1);
    $(".steps", card).textContent = total ? `step ${step}/${total} · ${Math.round(percent)}%` : `${Math.round(percent)}%`;
    $(".eta", card).textContent = message.remainingTime ? `ETA ${message.remainingTime}` : "";
    // Live frames carry a small JPEG of the image being denoised (every Nth step, when the model sends them).
    if (typeof message.preview === "string" && message.preview.startsWith("data:image/")) {
      const preview = $(".preview", card);
      preview.src = message.preview;
      preview.hidden = false;
      card.dataset.previews = String(Number(card.dataset.previews || 0) + 1);
    }
    return;
  }
  if (type === F.ERROR) return showError(card, typeof message === "string" ? message : JSON.stringify(message));
  if (!(type in STATUS_TEXT)) return;
  $(".status", card).textContent = STATUS_TEXT[type];
  if (type === S.CANCEL) {
    card.dataset.state = "cancelled";
    $(".eta", card).textContent = "";
  } else if (type === S.POSTPROCESS_END) {
    const outputs = Array.isArray(message) ? message : [];
    card.dataset.state = outputs.length ? "done" : "failed";
    $(".preview", card).hidden = true;
    if (outputs.length) {
      setProgress(card, 100);
      $(".eta", card).textContent = "";
      addToGallery(card.dataset.taskid, outputs);
    } else {
      $(".status", card).textContent = "failed";
      explainFailure(card);
    }
  } else if (RUNNING.has(type)) {
    card.dataset.state = "running";
  }
  refreshTasks();
}

async function explainFailure(card) {
  try {
    const task = (await api("/v1/Task/Detail", { taskid: card.dataset.taskid })).tasklist[0];
    showError(card, task.debugerror || `pexit ${task.pexit}`);
  } catch (error) {
    showError(card, error.message);
  }
}

function showError(card, text) {
  const box = $(".error", card);
  box.textContent = text;
  box.hidden = !text;
}

function addToGallery(taskid, outputs) {
  const gallery = $("#gallery");
  $(".empty", gallery)?.remove();
  for (const output of outputs.slice().reverse()) {
    const figure = document.createElement("figure");
    figure.dataset.taskid = taskid;
    const link = document.createElement("a");
    link.href = output.url;
    link.target = "_blank";
    link.rel = "noopener";
    const img = document.createElement("img");
    img.src = output.url;
    img.alt = `Output ${output.name} of task ${taskid}`;
    link.append(img);
    const caption = document.createElement("figcaption");
    const size = output.width ? ` · ${output.width}x${output.height}` : "";
    caption.textContent = `#${taskid} ${output.name}${size}${output.seed ? ` · seed ${output.seed}` : ""}`;
    figure.append(link, caption);
    gallery.prepend(figure);
  }
}

// -- the project's task list -----------------------------------------------------------------------

function badge(status, pexit) {
  if (status === S.POSTPROCESS_END) return pexit === P.OK ? ["done", "done"] : ["failed", `failed (${pexit})`];
  if (status === S.CANCEL) return ["cancelled", pexit === P.KILLED ? "killed" : "cancelled"];
  if (status === S.QUEUE) return ["queued", "queued"];
  return ["running", STATUS_TEXT[status] || status];
}

function ago(unix) {
  const seconds = Math.max(0, Date.now() / 1000 - Number(unix));
  if (seconds < 60) return `${Math.round(seconds)} s ago`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
  return new Date(Number(unix) * 1000).toLocaleString();
}

async function stopTask(kind, taskid, button) {
  button.disabled = true;
  try {
    await api(`/v1/Task/${kind}`, { taskid });
  } catch (error) {
    say(`Task ${taskid}: ${error.message}`);
  }
  refreshTasks();
}

function taskRow(task) {
  const row = document.createElement("tr");
  row.dataset.taskid = task.id;
  row.dataset.status = task.status;
  const [kind, text] = badge(task.status, task.pexit);
  const cells = {
    id: `#${task.id}`,
    prompt: (task.parameters && task.parameters.prompt) || "",
    size: (task.parameters && task.parameters.size) || "",
    created: ago(task.createtime),
    outputs: String(task.outputs.length),
  };
  const status = document.createElement("span");
  status.className = `badge ${kind}`;
  status.textContent = text;
  if (task.status === S.QUEUE && task.queueposition !== "" && task.queueposition !== undefined) {
    status.textContent += task.queueposition === "0" ? " · next" : ` · ${task.queueposition} ahead`;
  } else if (kind === "running" && task.progress && task.progress.percentage !== undefined) {
    status.textContent += ` · ${Math.round(Number(task.progress.percentage))}%`;
  }
  const actions = document.createElement("td");
  actions.className = "actions";
  // Task/Cancel or Task/Kill of this task; the button is disabled while the request is out.
  const stopButton = (verb, className, title) => {
    const button = document.createElement("button");
    button.className = className;
    button.textContent = verb;
    button.title = title;
    button.addEventListener("click", () => stopTask(verb, task.id, button));
    return button;
  };
  if (!TERMINAL.has(task.status)) {
    actions.append(stopButton("Cancel", "small quiet cancel",
      "Queued: removed at once. Running: stops at the next step; the model stays loaded."));
    if (task.status !== S.QUEUE) {
      actions.append(stopButton("Kill", "small danger kill",
        "Terminates the model process at once (it reloads for the next task)."));
    }
  }
  const td = (value, className = "") => {
    const cell = document.createElement("td");
    cell.className = className;
    cell.textContent = value;
    return cell;
  };
  const statusCell = document.createElement("td");
  statusCell.append(status);
  row.append(td(cells.id), statusCell, td(cells.prompt, "prompt"), td(cells.size), td(cells.created), td(cells.outputs), actions);
  $("td.prompt", row).title = cells.prompt;
  return row;
}

let listing = null;
async function refreshTasks() {
  if (!state.key) return;
  if (listing) return listing; // one request at a time; callers in between share it
  listing = (async () => {
    try {
      const body = await api("/v1/Task/List", { start: 0, limit: 20 });
      $("#tasks").replaceChildren(...body.tasklist.map(taskRow));
    } catch (error) {
      say(error.message);
    } finally {
      listing = null;
    }
  })();
  return listing;
}

function startListing() {
  clearInterval(state.listTimer);
  state.listTimer = setInterval(() => {
    if (document.visibilityState === "visible") refreshTasks();
  }, 2000);
}

// -- start -----------------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  loadCredentials();
  wireDropZone();
  drawReferences();
  $("#creds-form").addEventListener("submit", saveCredentials);
  $("#forget-creds").addEventListener("click", forgetCredentials);
  $("#run-form").addEventListener("submit", submitRun);
  $("#refresh").addEventListener("click", refreshTasks);
  $("#size").addEventListener("change", () => {
    $("#custom-label").hidden = $("#size").value !== "custom";
  });
  refreshTasks();
  startListing();
});

// For tests and the curious: the signing in use, and its fallback.
window.dreamserve = { hmacHex, hmacSha256Hex };
