// Sluice dashboard: the dead-letter panel. Polls GET /api/dead-letters (the
// letters held in the dead-letter queues, by reason: queue depths, cheap to
// read) every few seconds and, when the service allows it (AUTH_TOKEN set),
// replays a reason with POST /api/dead-letters/replay and the token typed in
// the panel (kept in this tab's sessionStorage only).
//
// Kept apart from dashboard.js: it shares nothing with the charts and the
// live tail. Its state is mirrored in data-* attributes for the tests.
(function () {
  "use strict";

  /** How often the counts are read, in milliseconds. */
  const POLL_MS = 3000;
  /** Where the token is kept (this tab only). */
  const TOKEN_KEY = "sluice.authToken";
  /** Reasons worth acting on first; any other the service reports follows. */
  const ORDER = ["overflow", "rejected_by_database", "not_json", "not_utf8", "empty", "too_large", "unsorted"];

  const $ = (id) => document.getElementById(id);
  const panel = $("dead-letters");
  if (!panel) return;
  const integer = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });
  let replaying = null;
  let replayEnabled = false;
  let pollTimer = null;

  function status(text, kind) {
    const el = $("dl-status");
    el.textContent = text;
    el.dataset.kind = kind || "";
  }

  function token() {
    return $("dl-token").value.trim();
  }

  function row(reason, held) {
    const tr = document.createElement("tr");
    tr.dataset.reason = reason;
    tr.dataset.held = String(held);
    const name = document.createElement("td");
    name.className = "reason";
    name.textContent = reason;
    const count = document.createElement("td");
    count.className = "num";
    count.textContent = integer.format(held);
    const action = document.createElement("td");
    action.className = "act";
    if (replayEnabled) {
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = replaying === reason ? "Replaying…" : "Replay";
      button.dataset.reason = reason;
      button.disabled = held === 0 || replaying !== null;
      button.addEventListener("click", () => replay(reason));
      action.appendChild(button);
    }
    tr.append(name, count, action);
    return tr;
  }

  function render(summary) {
    replayEnabled = Boolean(summary.replay && summary.replay.enabled);
    panel.dataset.replay = replayEnabled ? "on" : "off";
    panel.dataset.total = String(summary.total);
    $("dl-total").textContent = integer.format(summary.total) + " held";
    $("dl-token-form").hidden = !replayEnabled;
    if (!replayEnabled) {
      $("dl-note").textContent = "Letters held in the dead-letter queues now. Replay from here is off: " +
        "the service has no " + ((summary.replay && summary.replay.setting) || "AUTH_TOKEN") +
        " (sluice dead-letters replay works without it).";
    }
    const reasons = Object.keys(summary.by_reason || {});
    reasons.sort((a, b) => {
      const ia = ORDER.indexOf(a) < 0 ? ORDER.length : ORDER.indexOf(a);
      const ib = ORDER.indexOf(b) < 0 ? ORDER.length : ORDER.indexOf(b);
      return ia - ib || a.localeCompare(b);
    });
    const fragment = document.createDocumentFragment();
    for (const reason of reasons) fragment.appendChild(row(reason, summary.by_reason[reason]));
    $("dl-body").replaceChildren(fragment);
  }

  async function refresh() {
    clearTimeout(pollTimer);
    try {
      const response = await fetch("/api/dead-letters", { cache: "no-store" });
      const answer = await response.json();
      if (!response.ok) throw new Error(answer.error || "HTTP " + response.status);
      render(answer);
      if (!replaying && $("dl-status").dataset.kind === "error-poll") status("", "");
    } catch (err) {
      // Marked apart from a replay's error, so the next good poll clears it.
      status("Dead letters unreadable: " + err.message, "error-poll");
    } finally {
      pollTimer = setTimeout(refresh, POLL_MS);
    }
  }

  async function replay(reason) {
    if (replaying) return;
    const secret = token();
    if (!secret) {
      status("Type the token (AUTH_TOKEN) to replay.", "need-token");
      $("dl-token").focus();
      return;
    }
    replaying = reason;
    status("Replaying " + reason + "…", "");
    refreshButtons();
    try {
      const response = await fetch("/api/dead-letters/replay", {
        method: "POST",
        cache: "no-store",
        headers: { "Content-Type": "application/json", Authorization: "Bearer " + secret },
        body: JSON.stringify({ reason }),
      });
      const answer = await response.json();
      if (response.status === 401) throw new Error("the token was refused");
      if (!response.ok) throw new Error(answer.error || "HTTP " + response.status);
      panel.dataset.replayed = String(Number(panel.dataset.replayed) + answer.replayed);
      status("Replayed " + integer.format(answer.replayed) + " " + reason + " letter(s)" +
        (answer.skipped ? ", " + integer.format(answer.skipped) + " skipped (replayed too often)" : "") +
        "; " + integer.format(answer.left) + " left.", "done");
    } catch (err) {
      status("Replay of " + reason + " failed: " + err.message, "error");
    } finally {
      replaying = null;
      refresh();
    }
  }

  function refreshButtons() {
    for (const button of $("dl-body").querySelectorAll("button")) {
      button.disabled = true;
      if (button.dataset.reason === replaying) button.textContent = "Replaying…";
    }
  }

  const input = $("dl-token");
  input.value = sessionStorage.getItem(TOKEN_KEY) || "";
  input.addEventListener("input", () => {
    sessionStorage.setItem(TOKEN_KEY, token());
    if ($("dl-status").dataset.kind === "need-token") status("", "");
  });
  $("dl-token-form").addEventListener("submit", (e) => e.preventDefault());
  refresh();
})();
