// The demo page: each part calls the same HTTP API an application would, and shows the
// answer, the model version that gave it and the time it took, or the API's own error.
"use strict";

const $ = (id) => document.getElementById(id);

// One API call: `body` (a string or a Blob) makes it a POST. Returns the parsed answer,
// or null after showing the refusal in `out.error`.
async function call(path, out, body, type) {
  out.error.textContent = "";
  if (out.meta) out.meta.textContent = "";
  const headers = apiKey.headers();
  if (type) headers["Content-Type"] = type;
  const started = performance.now();
  let response;
  try {
    response = await fetch(path, { method: body === undefined ? "GET" : "POST", headers, body });
  } catch (err) {
    out.error.textContent = "Could not reach the server: " + err.message;
    return null;
  }
  const ms = performance.now() - started;
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    if (response.status === 401) askForKey(true);
    const why = data && data.error ? data.error : response.statusText;
    out.error.textContent = `Refused (HTTP ${response.status}): ${why}`;
    return null;
  }
  if (out.meta) out.meta.textContent = `Answered by ${data.model} in ${ms.toFixed(0)} ms`;
  return data;
}

const percent = (p) => (100 * p).toFixed(1) + "\u00a0%";

// ---- API key --------------------------------------------------------------------------
function askForKey(refused) {
  $("key-why").textContent = refused && apiKey.get()
    ? "The server refused this API key. Enter the right one."
    : "This server needs an API key (DLSERVE_API_KEY). Enter it to try the models.";
  $("key-form").hidden = false;
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  apiKey.set($("key").value.trim());
  $("key-form").hidden = true;
  start();
});

// ---- Which models this server serves ----------------------------------------------------
async function showServed() {
  const data = await call("models", { error: $("served") });
  if (!data) return false;
  const names = data.models.map((m) => m.name);
  $("served").textContent = "Served here: " + data.models
    .map((m) => `${m.tag} (${m.provider.replace("ExecutionProvider", "")})`).join(", ") + "." +
    (data.training || []).map((t) => ` Still training: ${t.message}.`).join("");
  for (const section of document.querySelectorAll("section[data-model]")) {
    section.hidden = !names.includes(section.dataset.model);
  }
  return true;
}

// ---- Digits -----------------------------------------------------------------------------
const pad = $("pad");
const ink = pad.getContext("2d");
const digitsOut = { meta: $("digits-meta"), error: $("digits-error") };
const bars = [];

function clearPad() {
  ink.fillStyle = "#fff";
  ink.fillRect(0, 0, pad.width, pad.height);
}

function buildBars() {
  for (let d = 0; d < 10; d++) {
    const li = document.createElement("li");
    li.innerHTML = `<span>${d}</span><span class="track"><span class="fill"></span></span>` +
                   `<span class="value">–</span>`;
    $("bars").append(li);
    bars.push(li);
  }
}

function showDigit(prediction) {
  $("digit").textContent = prediction.digit;
  $("digit-confidence").textContent = `(${percent(prediction.confidence)} sure)`;
  prediction.probabilities.forEach((p, d) => {
    bars[d].classList.toggle("top", d === prediction.digit);
    bars[d].querySelector(".fill").style.width = (100 * p) + "%";
    bars[d].querySelector(".value").textContent = percent(p);
  });
}

async function classifyImage(blob, type) {
  const data = await call("digits/predict_image", digitsOut, blob, type);
  if (data) showDigit(data.predictions[0]);
}

function at(event) {
  const box = pad.getBoundingClientRect();
  return [(event.clientX - box.left) * pad.width / box.width,
          (event.clientY - box.top) * pad.height / box.height];
}

let last = null;
pad.addEventListener("pointerdown", (event) => {
  pad.setPointerCapture(event.pointerId);
  last = at(event);
  ink.beginPath();
  ink.arc(last[0], last[1], ink.lineWidth / 2, 0, 2 * Math.PI);
  ink.fillStyle = "#000";
  ink.fill();
});
pad.addEventListener("pointermove", (event) => {
  if (!last) return;
  const next = at(event);
  ink.beginPath();
  ink.moveTo(...last);
  ink.lineTo(...next);
  ink.stroke();
  last = next;
});
function penUp() {
  if (!last) return;
  last = null;
  pad.toBlob((blob) => classifyImage(blob, "image/png"), "image/png");
}
pad.addEventListener("pointerup", penUp);
pad.addEventListener("pointercancel", penUp);

async function classifyFile(file) {
  clearPad();
  try {  // show it in the box, fitted; the server gets the file itself
    const image = await createImageBitmap(file);
    const scale = Math.min(pad.width / image.width, pad.height / image.height);
    const w = image.width * scale, h = image.height * scale;
    ink.drawImage(image, (pad.width - w) / 2, (pad.height - h) / 2, w, h);
  } catch (err) { /* not an image the browser reads: the server says what it is */ }
  classifyImage(file, file.type || "application/octet-stream");
}

$("file").addEventListener("change", () => {
  if ($("file").files.length) classifyFile($("file").files[0]);
});
pad.addEventListener("dragover", (event) => { event.preventDefault(); pad.classList.add("dragging"); });
pad.addEventListener("dragleave", () => pad.classList.remove("dragging"));
pad.addEventListener("drop", (event) => {
  event.preventDefault();
  pad.classList.remove("dragging");
  if (event.dataTransfer.files.length) classifyFile(event.dataTransfer.files[0]);
});
$("clear").addEventListener("click", () => {
  clearPad();
  $("digit").textContent = "–";
  $("digit-confidence").textContent = "";
  digitsOut.error.textContent = "";
});

// ---- Sentiment --------------------------------------------------------------------------
const sentimentOut = { meta: $("sentiment-meta"), error: $("sentiment-error") };

$("review-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  // Sent as typed: an empty review is the server's to refuse, with its own message.
  const data = await call("sentiment/predict", sentimentOut,
                          JSON.stringify({ texts: [$("review").value] }), "application/json");
  if (!data) return;
  const { label, positive_probability: p } = data.predictions[0];
  $("label").textContent = label;
  $("positive").textContent = `(positive: ${percent(p)})`;
  $("positive-bar").style.width = (100 * p) + "%";
});
$("review").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("review-form").requestSubmit();
});

// ---- Recommender ------------------------------------------------------------------------
const rated = new Map();  // movie_id → {title, rating}
const searchOut = { meta: null, error: $("recommender-error") };
const recommendOut = { meta: $("recommender-meta"), error: $("recommender-error") };

function ratingSelect(id, title) {
  const select = document.createElement("select");
  select.setAttribute("aria-label", `Your rating of ${title}`);
  select.append(new Option("Rate…", ""));
  for (let stars = 5; stars >= 1; stars--) {
    select.append(new Option(`${"★".repeat(stars)} ${stars}`, String(stars)));
  }
  select.value = rated.has(id) ? String(rated.get(id).rating) : "";
  select.addEventListener("change", () => {
    if (select.value) rated.set(id, { title, rating: Number(select.value) });
    else rated.delete(id);
    showRated();
  });
  return select;
}

function movieItem(title, control) {
  const li = document.createElement("li");
  const name = document.createElement("span");
  name.textContent = title;
  li.append(name, control);
  return li;
}

function showRated() {
  const list = $("rated");
  list.replaceChildren();
  if (!rated.size) list.innerHTML = '<li class="help">None yet.</li>';
  for (const [id, { title, rating }] of rated) {
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "secondary";
    remove.textContent = `${rating} ★ ✕`;
    remove.setAttribute("aria-label", `Remove your rating of ${title} (${rating} stars)`);
    remove.addEventListener("click", () => { rated.delete(id); showRated(); search(); });
    list.append(movieItem(title, remove));
  }
}

let searchTimer = null;
async function search() {
  const query = $("search").value;
  const data = await call(`recommender/movies?limit=12&query=${encodeURIComponent(query)}`,
                          searchOut);
  if (!data || query !== $("search").value) return;  // refused, or typed on meanwhile
  $("search-meta").textContent = query.trim()
    ? `${data.matches} movie(s) match; ${data.movies.length} shown.`
    : "The most-rated movies:";
  $("movies").replaceChildren(...data.movies.map(
    (m) => movieItem(m.title, ratingSelect(m.movie_id, m.title))));
}
$("search").addEventListener("input", () => {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(search, 200);
});

$("recommend").addEventListener("click", async () => {
  const ratings = [...rated].map(([movie_id, { rating }]) => ({ movie_id, rating }));
  const data = await call("recommender/recommend", recommendOut,
                          JSON.stringify({ ratings, k: 10 }), "application/json");
  if (!data) return;
  $("recommendations").replaceChildren(...data.recommendations.map((r) => {
    const li = document.createElement("li");
    const stars = document.createElement("span");
    stars.className = "stars";
    stars.textContent = ` — you would rate it ${r.predicted_rating.toFixed(1)} ★`;
    li.append(r.title, stars);
    return li;
  }));
  if (data.cold_start) {
    recommendOut.meta.textContent += " (no ratings given: the most-rated movies)";
  }
});

// ---- Start ------------------------------------------------------------------------------
async function start() {
  if (!(await showServed())) return;
  if (!$("recommender").hidden) search();
}

ink.lineWidth = 20;
ink.lineCap = "round";
ink.lineJoin = "round";
ink.strokeStyle = "#000";
clearPad();
buildBars();
start();
