// The live page: pick a class, see its best stored matches, then every new match the stream announces.
"use strict";

const MAX_SHOWN = 120;  // tiles kept on the page
const $ = (id) => document.getElementById(id);
const state = { classes: [], calibrated: 0, threshold: 0, source: null, live: 0, pending: null,
                selected: new Set() };

function setStatus(text, kind) {
  const el = $("status");
  el.textContent = text;
  el.className = "status " + (kind || "");
}

function fmt(x, digits) { return Number(x).toFixed(digits); }

// The slider's range starts at the server's suggestion and widens to every score seen.
function widen(lo, hi) {
  const slider = $("threshold");
  const min = slider.dataset.set ? Math.min(Number(slider.min), lo) : lo;
  const max = slider.dataset.set ? Math.max(Number(slider.max), hi) : hi;
  slider.dataset.set = "1";
  slider.min = min;
  slider.max = max;
  slider.step = (max - min) / 500;
  if (state.threshold !== undefined) slider.value = state.threshold;
}

function tile(item, live) {
  const fig = document.createElement("figure");
  fig.className = "match" + (live ? " live" : "");
  fig.dataset.id = item.id;
  fig.dataset.score = item.score;
  const img = document.createElement("img");
  img.src = "/items/" + item.id + ".png";
  img.alt = "item " + item.id;
  const cap = document.createElement("figcaption");
  cap.textContent = "#" + item.id + " · " + fmt(item.score, 2);
  fig.append(img, cap);
  if (state.selected.has(item.id)) fig.classList.add("selected");
  fig.addEventListener("click", () => {
    if (state.selected.has(item.id)) state.selected.delete(item.id); else state.selected.add(item.id);
    fig.classList.toggle("selected");
    updateEnroll();
  });
  return fig;
}

function updateEnroll() {
  const files = $("new-files").files.length;
  $("selected-count").textContent = state.selected.size + " selected" + (files ? ", " + files + " files" : "");
  $("add-class").disabled = !$("new-name").value.trim() || (state.selected.size + files) === 0;
}

async function base64Of(blob) {
  const bytes = new Uint8Array(await blob.arrayBuffer());
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(text);
}

// The selected matches (their stored PNGs) and the chosen files become a new class; the page then searches it.
async function addClass() {
  const blobs = [];
  for (const id of state.selected) blobs.push(await (await fetch("/items/" + id + ".png")).blob());
  for (const file of $("new-files").files) blobs.push(file);
  const images = await Promise.all(blobs.map(base64Of));
  const headers = { "Content-Type": "application/json" };
  if ($("token").value) headers.Authorization = "Bearer " + $("token").value;
  const response = await fetch("/classes", { method: "POST", headers,
                                             body: JSON.stringify({ name: $("new-name").value.trim(), images }) });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  state.selected.clear();
  $("new-name").value = "";
  $("new-files").value = "";
  updateEnroll();
  await loadClasses();
  $("class-select").value = String(body.id);
  setStatus("added class " + body.name + " (" + body.examples + " images)", "");
  await show();
}

// The slider snaps to its steps; the threshold itself stays exact (the calibrated value until moved).
function setThreshold(value, moveSlider) {
  state.threshold = value;
  if (moveSlider) $("threshold").value = value;
  $("threshold-value").textContent = fmt(value, 2);
}

async function getJSON(url) {
  const response = await fetch(url);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

async function loadClasses() {
  const info = await getJSON("/classes");
  state.classes = info.classes;
  state.calibrated = info.threshold;
  const select = $("class-select");
  while (select.options.length > 1) select.remove(1);
  for (const c of info.classes) {
    const option = document.createElement("option");
    option.value = c.id;
    option.textContent = c.enrolled ? c.name + " (enrolled)" : c.name;
    select.append(option);
  }
  return info;
}

async function load() {
  const info = await loadClasses();
  const [lo, hi] = info.score_range;
  widen(lo, hi);
  setThreshold(info.threshold, true);
  $("total").textContent = info.total;
  $("threshold").disabled = false;
  $("reset-threshold").disabled = false;
  setStatus("ready: choose a class", "");
}

// The stream opens first and the search fills in behind it, so no item falls between the two; ids dedupe.
async function show() {
  if (state.source) { state.source.close(); state.source = null; }
  const classId = $("class-select").value;
  const grid = $("matches");
  grid.replaceChildren();
  if (classId === "") return;
  state.live = 0;
  $("live-count").textContent = "0";
  const t = state.threshold;
  const query = "class_id=" + classId + "&threshold=" + t;
  const shown = new Set();
  const source = new EventSource("/stream?" + query);
  state.source = source;
  source.onopen = () => setStatus("live: class " + state.classes[classId].name + ", threshold " + fmt(t, 2), "live");
  source.onerror = () => setStatus("stream interrupted, reconnecting…", "error");
  source.addEventListener("match", (event) => {
    const item = JSON.parse(event.data);
    if (shown.has(item.id)) return;
    shown.add(item.id);
    widen(item.score, item.score);
    grid.prepend(tile(item, true));
    while (grid.children.length > MAX_SHOWN) grid.lastChild.remove();
    state.live += 1;
    $("live-count").textContent = state.live;
    $("stream-ms").textContent = fmt(Math.max(0, Date.now() - 1000 * item.time), 0);
  });
  source.addEventListener("ingest", (event) => { $("total").textContent = JSON.parse(event.data).total; });
  const began = performance.now();
  const result = await getJSON("/search?" + query + "&top_k=" + MAX_SHOWN);
  if (state.source !== source) return;  // a newer choice won
  $("rtt-ms").textContent = fmt(performance.now() - began, 1);
  $("search-ms").textContent = fmt(result.ms, 2);
  $("total").textContent = result.total;
  if (result.items.length) widen(result.items[result.items.length - 1].score, result.items[0].score);
  for (const item of result.items) {
    if (shown.has(item.id) || grid.children.length >= MAX_SHOWN) continue;
    shown.add(item.id);
    grid.append(tile(item, false));
  }
}

function refresh() {
  clearTimeout(state.pending);
  state.pending = setTimeout(() => show().catch((err) => setStatus(err.message, "error")), 150);
}

$("class-select").addEventListener("change", refresh);
$("new-name").addEventListener("input", updateEnroll);
$("new-files").addEventListener("change", updateEnroll);
$("add-class").addEventListener("click", () => addClass().catch((err) => setStatus(err.message, "error")));
$("threshold").addEventListener("input", () => { setThreshold(Number($("threshold").value), false); refresh(); });
$("reset-threshold").addEventListener("click", () => { setThreshold(state.calibrated, true); refresh(); });
load().catch((err) => setStatus("cannot load classes: " + err.message, "error"));
