// The guard's screen. The server pushes every text already translated over one WebSocket:
// "hello" (labels), "status", "verdict", "override". This script only places them.
"use strict";

const RECONNECT_MAX_MS = 3000;
let labels = {};
let clearAfterMs = 6000;
let clearTimer = null;
let current = null; // the verdict on screen
let signedIn = false;
let reconnectDelayMs = 250;
let connected = false;

const $ = (id) => document.getElementById(id);

function label(key) {
  return labels[key] || "";
}

function applyLabels() {
  for (const element of document.querySelectorAll("[data-label]")) {
    element.textContent = label(element.dataset.label);
  }
  document.title = label("title");
}

function connect() {
  const socket = new WebSocket(`ws://${location.host}/ws`);
  socket.onopen = () => {
    connected = true;
    reconnectDelayMs = 250;
  };
  socket.onmessage = (event) => handle(JSON.parse(event.data));
  socket.onclose = () => {
    connected = false;
    renderOffline();
    setTimeout(connect, reconnectDelayMs);
    reconnectDelayMs = Math.min(reconnectDelayMs * 2, RECONNECT_MAX_MS);
  };
}

function handle(message) {
  if (message.type === "hello") {
    labels = message.labels;
    clearAfterMs = message.clear_after_s * 1000;
    document.documentElement.lang = message.language === "en" ? "en" : "zh-CN";
    applyLabels();
    const select = $("override-reason");
    select.replaceChildren();
    for (const reason of message.override_reasons) {
      select.append(new Option(reason.label, reason.code));
    }
    renderOffline();
  } else if (message.type === "status") {
    renderStatus(message);
  } else if (message.type === "verdict") {
    showVerdict(message);
  } else if (message.type === "override") {
    if (current && current.seq === message.verdict_seq) {
      $("override-result").textContent = message.text;
      hideOverrideButtons();
      scheduleClear();
    }
  }
}

let lastBanners = [];

function renderStatus(status) {
  $("data-age").textContent = status.data_age;
  $("count-admit").textContent = status.counts.admit;
  $("count-review").textContent = status.counts.review;
  $("count-deny").textContent = status.counts.deny;
  $("guard").textContent = status.guard_text;
  signedIn = status.guard !== null;
  $("sign-in-button").hidden = signedIn;
  $("sign-out-button").hidden = !signedIn;
  lastBanners = status.banners;
  renderBanners();
}

function renderOffline() {
  renderBanners();
}

function renderBanners() {
  const box = $("banners");
  box.replaceChildren();
  if (!connected && labels.screen_offline) {
    const div = document.createElement("div");
    div.className = "offline";
    div.dataset.code = "screen_offline";
    div.textContent = label("screen_offline");
    box.append(div);
  }
  for (const banner of lastBanners) {
    const div = document.createElement("div");
    div.dataset.code = banner.code;
    div.textContent = banner.text;
    box.append(div);
  }
}

function showVerdict(verdict) {
  current = verdict;
  document.body.className = verdict.class;
  document.body.dataset.outcome = verdict.outcome;
  $("idle-text").hidden = true;
  $("verdict-body").hidden = false;
  $("word").textContent = verdict.word;
  const reasons = $("reasons");
  reasons.replaceChildren();
  for (const text of verdict.reasons) {
    const item = document.createElement("li");
    item.textContent = text;
    reasons.append(item);
  }
  $("name").textContent = verdict.name;
  $("place").textContent = verdict.place;
  $("role").textContent = verdict.role;
  $("override-result").textContent = "";
  $("override-admit-button").hidden = !verdict.overridable;
  $("override-refuse-button").hidden = !verdict.overridable;
  scheduleClear();
}

function hideOverrideButtons() {
  $("override-admit-button").hidden = true;
  $("override-refuse-button").hidden = true;
}

function scheduleClear() {
  clearTimeout(clearTimer);
  clearTimer = setTimeout(clearVerdict, clearAfterMs);
}

function clearVerdict() {
  // An open override form keeps its verdict on screen until it is sent or cancelled.
  if ($("override-dialog").open) {
    scheduleClear();
    return;
  }
  current = null;
  document.body.className = "idle";
  delete document.body.dataset.outcome;
  $("idle-text").hidden = false;
  $("verdict-body").hidden = true;
  hideOverrideButtons();
}

async function post(path, body) {
  let response;
  try {
    response = await fetch(path, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
  } catch (error) {
    return { ok: false, body: { error: "request_failed", message: label("request_failed") } };
  }
  let parsed = {};
  try {
    parsed = await response.json();
  } catch (error) {
    parsed = { error: "request_failed", message: label("request_failed") };
  }
  return { ok: response.ok, body: parsed };
}

function wireDialog(dialogId, submit) {
  const dialog = $(dialogId);
  const form = dialog.querySelector("form");
  const error = dialog.querySelector(".error");
  dialog.querySelector(".cancel").addEventListener("click", () => {
    form.reset();
    dialog.close();
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.textContent = "";
    const result = await submit();
    if (result.ok) {
      form.reset();
      dialog.close();
    } else {
      error.textContent = result.body.message;
      error.dataset.code = result.body.error;
    }
  });
  return { dialog, error };
}

function openDialog(wired) {
  wired.error.textContent = "";
  delete wired.error.dataset.code;
  wired.dialog.showModal();
  const first = wired.dialog.querySelector("input, select");
  if (first) first.focus();
}

let overrideDecision = "admit";
let overrideSeq = null;

function setUp() {
  const signIn = wireDialog("sign-in-dialog", () =>
    post("/api/sign-in", { guard_id: $("guard-id").value.trim(), pin: $("pin").value }),
  );
  // The typed ID number leaves the page only in this request, and the form is reset after it.
  const idCheck = wireDialog("id-check-dialog", () =>
    post("/api/id-check", { id_number: $("id-number").value.trim() }),
  );
  const override = wireDialog("override-dialog", () =>
    post("/api/override", {
      verdict_seq: overrideSeq,
      decision: overrideDecision,
      reason: $("override-reason").value,
    }),
  );
  $("sign-in-button").addEventListener("click", () => openDialog(signIn));
  $("id-check-button").addEventListener("click", () => openDialog(idCheck));
  $("sign-out-button").addEventListener("click", () => post("/api/sign-out", {}));
  for (const [id, decision] of [["override-admit-button", "admit"], ["override-refuse-button", "refuse"]]) {
    $(id).addEventListener("click", () => {
      if (!current) return;
      overrideDecision = decision;
      overrideSeq = current.seq;
      $("override-title").textContent = label(`override_${decision}`);
      openDialog(override);
    });
  }
  connect();
}

document.addEventListener("DOMContentLoaded", setUp);
