// deepmetric search page: pick a sample item or upload an image, show the k nearest neighbours.
// Plain JavaScript, no build step. Talks to /info, /samples and /search of the same server.
"use strict";

const state = { info: null, lastQuery: null, objectUrl: null };

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (value !== null && value !== undefined) node.setAttribute(key, value);
  }
  for (const child of children) node.appendChild(child);
  return node;
}

function setStatus(text, isError = false) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

function labelText(label, name) {
  if (label === null || label === undefined) return "no label";
  return name && name !== String(label) ? `${name} (${label})` : `label ${label}`;
}

function currentK() {
  const max = state.info ? state.info.max_k : 100;
  const k = parseInt($("k-input").value, 10);
  return Number.isFinite(k) ? Math.min(Math.max(k, 1), max) : 10;
}

async function fetchJson(url, options) {
  const response = await fetch(url, options);
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    const detail = body && body.detail ? (typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail))
                                       : response.statusText;
    throw new Error(`${response.status}: ${detail}`);
  }
  return body;
}

function showQuery(src, caption) {
  $("query-view").hidden = false;
  const img = $("query-image");
  if (src) { img.src = src; img.hidden = false; } else { img.hidden = true; }
  $("query-caption").textContent = caption;
}

function renderResults(data) {
  const results = $("results");
  results.replaceChildren();
  for (const r of data.results) {
    const mark = r.correct === true ? "✓" : r.correct === false ? "✗" : "";
    const cls = "tile result" + (r.correct === true ? " correct" : r.correct === false ? " incorrect" : "");
    const img = r.thumbnail_url
      ? el("img", { class: "result-thumb", src: r.thumbnail_url, alt: `item ${r.id}` })
      : el("div", { class: "result-thumb no-thumb", text: "(no image)" });
    const caption = el("figcaption", {}, [
      el("div", {}, [el("span", { class: "mark", text: mark ? mark + " " : "" }),
                     el("span", { text: `#${r.rank} · id ${r.id}` })]),
      el("div", { class: "distance", text: `d = ${r.distance.toFixed(4)}` }),
      el("div", { class: "label", text: labelText(r.label, r.label_name) }),
    ]);
    results.appendChild(el("figure", { class: cls, "data-id": r.id, "data-correct": String(r.correct) },
                           [img, caption]));
  }
  const judged = data.results.filter((r) => r.correct !== null);
  const right = judged.filter((r) => r.correct).length;
  const score = judged.length ? ` — ${right}/${judged.length} with the query's label` : "";
  setStatus(`${data.results.length} nearest of ${state.info.items} items (${data.metric}, ${data.backend})${score}`);
}

async function runQuery(query) {
  state.lastQuery = query;
  setStatus("searching…");
  try {
    let data;
    if (query.type === "item") {
      data = await fetchJson("/search", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ id: query.id, k: currentK() }),
      });
    } else {
      const form = new FormData();
      form.append("file", query.file);
      form.append("k", String(currentK()));
      const label = $("label-select").value;
      if (label !== "") form.append("label", label);
      data = await fetchJson("/search", { method: "POST", body: form });
    }
    renderResults(data);
  } catch (err) {
    $("results").replaceChildren();
    setStatus(`search failed: ${err.message}`, true);
  }
}

function searchItem(item) {
  showQuery(item.thumbnail_url, `sample id ${item.id} · ${labelText(item.label, item.label_name)}`);
  runQuery({ type: "item", id: item.id });
}

function searchFile(file) {
  if (state.objectUrl) URL.revokeObjectURL(state.objectUrl);
  state.objectUrl = URL.createObjectURL(file);
  const select = $("label-select");
  const label = select.value === "" ? "label unknown" : select.options[select.selectedIndex].text;
  showQuery(state.objectUrl, `${file.name} · ${label}`);
  runQuery({ type: "image", file });
}

async function loadSamples() {
  const samples = await fetchJson("/samples?n=12");
  const box = $("samples");
  box.replaceChildren();
  for (const item of samples) {
    const tile = el("figure", { class: "tile sample", tabindex: "0", "data-id": item.id }, [
      item.thumbnail_url ? el("img", { src: item.thumbnail_url, alt: `sample ${item.id}` })
                         : el("div", { text: "(no image)" }),
      el("figcaption", { text: `id ${item.id} · ${labelText(item.label, item.label_name)}` }),
    ]);
    tile.addEventListener("click", () => searchItem(item));
    tile.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") searchItem(item); });
    box.appendChild(tile);
  }
}

async function init() {
  try {
    state.info = await fetchJson("/info");
  } catch (err) {
    setStatus(`cannot reach the service: ${err.message}`, true);
    return;
  }
  const info = state.info;
  const source = info.data ? `${info.data}${info.split ? " (" + info.split + " split)" : ""}` : "embeddings";
  $("summary").textContent = `${info.items} items from ${source} · dimension ${info.dim} · ${info.metric} distance · `
    + `${info.backend} index` + (info.image_search ? "" : " · image upload unavailable: " + info.image_search_error);
  $("k-input").max = String(info.max_k);
  const select = $("label-select");
  (info.class_names || []).forEach((name, i) => select.appendChild(el("option", { value: String(i), text: `${name} (${i})` })));
  const fileInput = $("file-input");
  fileInput.disabled = !info.image_search;
  fileInput.addEventListener("change", () => {
    $("search-button").disabled = fileInput.files.length === 0;
    if (fileInput.files.length) searchFile(fileInput.files[0]);
  });
  $("search-button").addEventListener("click", () => {
    if (fileInput.files.length) searchFile(fileInput.files[0]);
  });
  const rerun = () => { if (state.lastQuery) runQuery(state.lastQuery); };
  $("k-input").addEventListener("change", rerun);
  select.addEventListener("change", () => { if (state.lastQuery && state.lastQuery.type === "image") searchFile(state.lastQuery.file); });
  try {
    await loadSamples();
  } catch (err) {
    setStatus(`cannot load samples: ${err.message}`, true);
  }
}

document.addEventListener("DOMContentLoaded", init);
