// cxrserve viewer: uploads a study through the local proxy, as one cxr-study request
// when that model is served (else to every served model), and shows each answer. Every string from a response is set with
// textContent (never as HTML), and pictures are the models' own PNGs (data: URLs).
"use strict";

const API_HEADERS = { "X-CXR-UI": "1" };
const state = { models: [], maxBytes: 64 * 1024 * 1024 };

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
  nodes.push(kv(facts));
  if (result.warnings && result.warnings.length) {
    nodes.push(el("ul", { class: "warnings" }, ...result.warnings.map((w) => el("li", { text: w }))));
  }
  return nodes;
}

// ------------------------------------------------------------------ renderers
const RENDER = {
  "cxr-triage": (r) => {
    const entries = Object.entries(r.probabilities || {});
    return [
      el("div", { class: "headline", text: `${r.label} (${pct(r.probabilities[r.label])})` }),
      bars(entries),
      kv([["lung box", r.lung_bbox ? r.lung_bbox.join(", ") : "none"],
          ["segmentation confidence", fmt(r.segmentation_confidence)],
          ["crop used", r.crop_used ? "yes" : "no: whole image classified"]]),
      picture(r.heatmap_png, "Grad-CAM heatmap of the predicted class; green box: lung crop", "heatmap"),
    ];
  },
  "cxr-lungseg": (r) => [
    el("div", { class: "headline", text: `lungs: ${pct(r.lung_area_fraction)} of the image` }),
    kv([["lung box", r.lung_bbox ? r.lung_bbox.join(", ") : "none"],
        ["segmentation confidence", fmt(r.segmentation_confidence)]]),
    picture(r.overlay_png, "lung mask and box over the image", "overlay"),
  ],
  "cxr-pxs": (r) => {
    const nodes = [
      el("div", { class: "headline", text: `PXS ${fmt(r.pxs, 2)}` }),
      kv([["pool percentile", `${fmt(r.pxs_percentile, 1)} (of ${r.pool ? r.pool.size : "?"} normal references)`]]),
    ];
    if (r.prior && r.change) {
      nodes.push(kv([["prior PXS", `${fmt(r.prior.pxs, 2)} (percentile ${fmt(r.prior.pxs_percentile, 1)})`],
                     ["PXS change", `${r.change.pxs_difference >= 0 ? "+" : ""}${fmt(r.change.pxs_difference, 2)}`],
                     ["embedding distance", fmt(r.change.distance, 2)]]));
      nodes.push(el("div", { class: `direction-${r.change.direction}`, "data-direction": r.change.direction,
                             text: `change vs prior: ${r.change.direction} (threshold ${fmt(r.change.threshold, 2)})` }));
    } else {
      nodes.push(el("p", { class: "muted", text: "Add a prior study to see the change." }));
    }
    return nodes;
  },
  "cxr-severity": (r) => [
    el("div", { class: "headline", text: `extent ${fmt(r.geographic_extent, 1)} / 8 · opacity ${fmt(r.opacity, 1)} / 6` }),
    kv([["lung opacity logit", fmt(r.lung_opacity_logit)], ["lung opacity probability", fmt(r.lung_opacity_probability)]]),
    picture(r.saliency_png, "saliency: squared gradient of the predicted extent", "saliency"),
  ],
  "cxr-mortality": (r) => [
    el("div", { class: "headline", text: `risk ${pct(r.risk)} (${r.risk_label})` }),
    kv([["high-risk threshold", fmt(r.threshold)]]),
    r.research_only ? el("p", { class: "muted", text: r.research_only }) : null,
    picture(r.overlay_png, "Grad-CAM of the predicted risk class", "overlay"),
  ],
  "cxr-zeroshot": (r) => {
    const entries = Object.entries(r.probabilities || {}).sort((a, b) => b[1] - a[1]);
    return [
      el("p", { class: "muted", text: `p = exp(sim "{finding}") / (exp(sim "{finding}") + exp(sim "no {finding}")); ${r.labels_source === "request" ? "your findings" : "14 CheXpert findings"}, ensemble of ${r.ensemble_size}` }),
      bars(entries, { top: false }),
    ];
  },
};

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
    const render = RENDER[model.name] || renderGeneric;
    for (const node of [...render(body), ...common(body)]) if (node) target.append(node);
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
    state.maxBytes = info.max_bytes;
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
  const priorFile = document.getElementById("prior-file").files[0];
  const labels = document.getElementById("labels").value.split(",").map((s) => s.trim()).filter(Boolean);
  if (!imageFile) { message.textContent = "Choose a study first."; return; }
  for (const f of [imageFile, priorFile]) {
    if (f && f.size > state.maxBytes) {
      message.textContent = `${f.name} is larger than ${(state.maxBytes / 2 ** 20).toFixed(0)} MiB.`;
      return;
    }
  }
  showPreview(imageFile);
  button.disabled = true;
  message.textContent = "Scoring…";
  const payload = { image: await readBase64(imageFile) };
  if (priorFile) payload.prior = await readBase64(priorFile);
  if (labels.length) payload.labels = labels;
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

// One cxr-study request; each section goes to its family's card. False when the study
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
  document.body.dataset.requests = study;
  for (const model of families) {
    const card = document.getElementById(`card-${model.name}`);
    if (!res || res.status !== 200) { renderCard(card, model, res ? res.status : 0, answer); continue; }
    const section = (answer.results || {})[model.name.replace(/^cxr-/, "")];
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
