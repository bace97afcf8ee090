// cxrserve viewer: uploads a study through the local proxy, as one request to the composed
// model when it is served (else to every served model), and shows each answer in a card its
// family declares (lines and pictures from /api/models; this file names no model or field).
// Every string from a response is set with textContent (never as HTML), and pictures are the
// models' own PNGs (data: URLs).
"use strict";

const API_HEADERS = { "X-CXR-UI": "1" };
const state = { models: [], inputs: [], maxBytes: 64 * 1024 * 1024 };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function fmt(value, digits = 3) {
  return typeof value === "number" ? value.toFixed(digits) : String(value);
}

function pct(value) {
  return `${(100 * value).toFixed(1)} %`;
}

function kv(pairs) {
  const list = el("dl", { class: "kv" });
  for (const [key, value] of pairs) {
    if (value === undefined || value === null) continue;
    list.append(el("dt", { text: key }), el("dd", { text: value }));
  }
  return list;
}

function bars(entries, { top = true } = {}) {
  const box = el("div", { class: "bars" });
  const best = Math.max(...entries.map(([, p]) => p));
  for (const [label, p] of entries) {
    const row = el("div", { class: "bar" + (top && p === best ? " top" : ""), "data-label": label });
    const fill = el("div", { class: "fill" });
    fill.style.width = `${Math.max(0, Math.min(1, p)) * 100}%`;
    row.append(el("span", { text: label }), el("div", { class: "track" }, fill), el("span", { class: "value", text: fmt(p) }));
    box.append(row);
  }
  return box;
}

function picture(b64, caption, name) {
  if (!b64) return null;
  const fig = el("figure", { class: "picture-box" });
  fig.append(el("img", { class: "picture", src: `data:image/png;base64,${b64}`, alt: caption, "data-picture": name }));
  fig.append(el("figcaption", { text: caption }));
  return fig;
}

function common(result) {
  const nodes = [];
  const facts = [["model version", result.model_version]];
  if (result.input) facts.push(["input", `${result.input.format} ${result.input.width}x${result.input.height}${result.input.view ? " " + result.input.view : ""}`]);
  if (result.input_gate) facts.push(["input gate", `${result.input_gate.verdict} (${fmt(result.input_gate.score)})`]);
  if (result.site) facts.push(["site", result.operating_point ? `${result.site} · ${result.operating_point}` : result.site]);
  if (result.uncalibrated) facts.push(["as served", show(result.uncalibrated)]);
  nodes.push(kv(facts));
  if (result.warnings && result.warnings.length) {
    nodes.push(el("ul", { class: "warnings" }, ...result.warnings.map((w) => el("li", { text: w }))));
  }
  return nodes;
}

// ------------------------------------------------------------------ declared cards
// A card line (cxrserve.core.family.CardLine): text with {path} / {path:fmt} placeholders.
function lookup(r, path) {
  return path.split(".").reduce((v, k) => (v !== null && typeof v === "object" ? v[k] : undefined), r);
}

function show(value, spec) {
  if (value === undefined || value === null) return "none";
  if (spec === "%") return pct(value);
  if (spec === "max%") return pct(Math.max(...Object.values(value)));
  const digits = /^(\+?)\.(\d)$/.exec(spec || "");
  if (digits) return (digits[1] && value >= 0 ? "+" : "") + fmt(value, Number(digits[2]));
  if (typeof value === "boolean") return value ? "yes" : "no";
  if (Array.isArray(value)) return value.join(", ");
  if (typeof value === "object") return JSON.stringify(value);
  return fmt(value);
}

function fill(template, r) {
  return template.replace(/\{\{|\}\}|\{([^{}:]+)(?::([^{}]+))?\}/g,
    (match, path, spec) => (match === "{{" ? "{" : match === "}}" ? "}" : show(lookup(r, path), spec)));
}

function renderDeclared(model, r) {
  const nodes = [];
  let facts = null; // consecutive facts share one list
  for (const line of model.card) {
    if (line.when && !lookup(r, line.when)) {
      if (line.otherwise) nodes.push(el("p", { class: "muted", text: line.otherwise }));
      continue;
    }
    if (line.kind === "fact") {
      if (!facts) nodes.push(facts = kv([]));
      facts.append(el("dt", { text: line.label }), el("dd", { text: fill(line.text, r) }));
      continue;
    }
    facts = null;
    if (line.kind === "headline") nodes.push(el("div", { class: "headline", text: fill(line.text, r) }));
    else if (line.kind === "note") nodes.push(el("p", { class: "muted", text: fill(line.text, r) }));
    else if (line.kind === "bars") {
      const entries = Object.entries(lookup(r, line.text) || {});
      if (line.sort) entries.sort((a, b) => b[1] - a[1]);
      nodes.push(bars(entries, { top: line.top }));
    } else if (line.kind === "tag") {
      const value = String(lookup(r, line.label));
      const name = line.label.split(".").pop();
      nodes.push(el("div", { class: `${name}-${value}`, [`data-${name}`]: value, text: fill(line.text, r) }));
    }
  }
  for (const p of model.pictures) nodes.push(picture(r[p.field], p.caption, p.option));
  return nodes;
}

function renderGeneric(r) {
  const skip = new Set(["model", "model_version", "warnings", "input", "input_gate"]);
  const pairs = [];
  const pictures = [];
  for (const [key, value] of Object.entries(r)) {
    if (skip.has(key)) continue;
    if (key.endsWith("_png")) pictures.push(picture(value, key, key));
    else if (typeof value !== "object") pairs.push([key, fmt(value)]);
    else pairs.push([key, JSON.stringify(value)]);
  }
  return [kv(pairs), ...pictures];
}

// ------------------------------------------------------------------ cards
function cardFor(model) {
  const card = el("article", { class: "card", id: `card-${model.name}`, "data-model": model.name, "data-state": "idle" });
  card.append(el("h2", { text: model.title }));
  card.append(el("p", { class: "sub", text: `${model.name}${model.seed ? " · " + model.seed : ""}` }));
  card.append(el("div", { class: "state" }));
  card.append(el("div", { class: "body" }));
  return card;
}

function setState(card, name, text) {
  card.dataset.state = name;
  card.classList.toggle("error", name === "error");
  card.classList.toggle("absent", name === "not-served");
  card.querySelector(".state").textContent = text;
}

function renderCard(card, model, status, body) {
  const target = card.querySelector(".body");
  target.replaceChildren();
  if (status === 200) {
    setState(card, "done", "");
    const nodes = model.card && model.card.length ? renderDeclared(model, body) : renderGeneric(body);
    for (const node of [...nodes, ...common(body)]) if (node) target.append(node);
  } else if (status === 404 && body && body.error === "not_served") {
    setState(card, "not-served", "not served by this TorchServe");
  } else {
    const code = body && body.error ? body.error : "error";
    const message = body && body.message ? body.message : `HTTP ${status}`;
    setState(card, "error", `rejected: ${status} ${code}`);
    target.append(el("p", { class: "error-text", "data-status": String(status), text: message }));
  }
}

async function loadModels() {
  const status = document.getElementById("server-status");
  const results = document.getElementById("results");
  try {
    const res = await fetch("/api/models", { headers: API_HEADERS });
    const info = await res.json();
    state.models = info.models;
    state.inputs = info.inputs || [];
    state.maxBytes = info.max_bytes;
    addInputs(state.inputs);
    const served = info.models.filter((m) => m.served === true).map((m) => m.name);
    status.textContent = info.management === "ok"
      ? `TorchServe serves: ${served.join(", ") || "no models"}`
      : "TorchServe's model list is unavailable: every model will be tried.";
  } catch (err) {
    status.textContent = `Viewer server unreachable: ${err}`;
    return;
  }
  results.replaceChildren();
  for (const model of state.models) {
    if (model.composes) continue; // its sections fill the family cards
    const card = cardFor(model);
    results.append(card);
    if (model.served === false) setState(card, "not-served", "not served by this TorchServe");
    else setState(card, "idle", "waiting for a study");
  }
}

// The extra inputs the families declare (a second image, a list): id <name>-file or <name>.
function addInputs(inputs) {
  const box = document.getElementById("extra-inputs");
  box.replaceChildren();
  for (const input of inputs) {
    const id = input.kind === "file" ? `${input.name}-file` : input.name;
    box.append(el("label", { for: id, text: input.label }));
    if (input.kind === "file") {
      box.append(el("input", { id, name: input.name, type: "file", accept: document.getElementById("image-file").accept }));
    } else {
      box.append(el("input", { id, name: input.name, type: "text", placeholder: input.placeholder, autocomplete: "off" }));
    }
  }
}

function readBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1] || "");
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function showPreview(file) {
  const figure = document.getElementById("preview");
  const img = document.getElementById("preview-image");
  const caption = document.getElementById("preview-caption");
  figure.hidden = false;
  if (/^image\/(png|jpeg)$/.test(file.type)) {
    img.hidden = false;
    img.src = URL.createObjectURL(file);
    caption.textContent = file.name;
  } else {
    img.hidden = true;
    img.removeAttribute("src");
    caption.textContent = `${file.name}: no browser preview for this format; the models' overlays show the image.`;
  }
}

async function analyse(event) {
  event.preventDefault();
  const message = document.getElementById("form-message");
  const button = document.getElementById("analyse");
  const imageFile = document.getElementById("image-file").files[0];
  if (!imageFile) { message.textContent = "Choose a study first."; return; }
  const files = { image: imageFile };
  const lists = {};
  for (const input of state.inputs) {
    if (input.kind === "file") {
      const file = document.getElementById(`${input.name}-file`).files[0];
      if (file) files[input.name] = file;
    } else {
      const items = document.getElementById(input.name).value.split(",").map((s) => s.trim()).filter(Boolean);
      if (items.length) lists[input.name] = items;
    }
  }
  for (const f of Object.values(files)) {
    if (f.size > state.maxBytes) {
      message.textContent = `${f.name} is larger than ${(state.maxBytes / 2 ** 20).toFixed(0)} MiB.`;
      return;
    }
  }
  showPreview(imageFile);
  showPriority(null);
  button.disabled = true;
  message.textContent = "Scoring…";
  const payload = { ...lists };
  const site = document.getElementById("site").value.trim();
  if (site) payload.site = site;
  for (const [name, file] of Object.entries(files)) payload[name] = await readBase64(file);
  const body = JSON.stringify(payload);
  const families = state.models.filter((m) => !m.composes);
  const study = state.models.find((m) => m.composes && m.served !== false);
  let answered = false;
  if (study) answered = await analyseStudy(study.name, families, body);
  const jobs = answered ? [] : families.filter((m) => m.served !== false).map(async (model) => {
    const card = document.getElementById(`card-${model.name}`);
    setState(card, "running", "scoring…");
    card.querySelector(".body").replaceChildren();
    try {
      const res = await fetch(`/api/predict/${encodeURIComponent(model.name)}`, {
        method: "POST", headers: { ...API_HEADERS, "Content-Type": "application/json" }, body,
      });
      let answer = null;
      try { answer = await res.json(); } catch (_) { answer = { error: "bad_response", message: `HTTP ${res.status}` }; }
      renderCard(card, model, res.status, answer);
    } catch (err) {
      renderCard(card, model, 0, { error: "network", message: String(err) });
    }
  });
  await Promise.all(jobs);
  button.disabled = false;
  const done = document.querySelectorAll('.card[data-state="done"]').length;
  const failed = document.querySelectorAll('.card[data-state="error"]').length;
  message.textContent = `Done: ${done} model(s) answered${failed ? `, ${failed} rejected the input` : ""}.`;
  document.body.dataset.analysed = "true";
}

// The study's worklist priority (urgent / routine / not assessed), its reasons and whose rules.
function showPriority(priority) {
  const box = document.getElementById("priority");
  if (!priority || !priority.level) { box.hidden = true; box.textContent = ""; return; }
  const reasons = (priority.reasons || []).map((r) => r.meaning).join("; ");
  box.dataset.level = priority.level.replace(/ /g, "-");
  box.textContent = `Worklist priority: ${priority.level}${reasons ? ` (${reasons})` : ""}; rules: ${priority.rules}`;
  box.hidden = false;
}

// One request to the composed model; each section goes to its family's card. False when the study
// model is not served after all (the page then asks each model).
async function analyseStudy(study, families, body) {
  for (const model of families) {
    const card = document.getElementById(`card-${model.name}`);
    setState(card, "running", "scoring…");
    card.querySelector(".body").replaceChildren();
  }
  let res = null;
  let answer = null;
  try {
    res = await fetch(`/api/predict/${study}`, {
      method: "POST", headers: { ...API_HEADERS, "Content-Type": "application/json" }, body,
    });
    try { answer = await res.json(); } catch (_) { answer = { error: "bad_response", message: `HTTP ${res.status}` }; }
  } catch (err) {
    answer = { error: "network", message: String(err) };
  }
  if (res && res.status === 404 && answer && answer.error === "not_served") return false;
  showPriority(res && res.status === 200 ? answer.priority : null);
  document.body.dataset.requests = study;
  for (const model of families) {
    const card = document.getElementById(`card-${model.name}`);
    if (!res || res.status !== 200) { renderCard(card, model, res ? res.status : 0, answer); continue; }
    const section = (answer.results || {})[model.section];
    if (!section) setState(card, "idle", "not part of this study");
    else if (section.error) renderCard(card, model, section.status || 500, section);
    else renderCard(card, model, 200, section);
  }
  return true;
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("study-form").addEventListener("submit", analyse);
  loadModels();
});
