// Sluice dashboard: polls /api/stats every second for the figures and charts,
// and keeps a WebSocket on /ws for the live tail.
//
// Event text is only ever put in the page with textContent (never innerHTML),
// so a payload cannot inject markup. The page's state is mirrored in data-*
// attributes on <body> and on each chart card, which tests read.
(function () {
  "use strict";

  /** Seconds of history kept for the charts. */
  const WINDOW_SECONDS = 300;
  /** How often /api/stats is polled, in milliseconds. */
  const POLL_MS = 1000;
  /** Most rows kept in the live tail. */
  const TAIL_ROWS = 200;
  /** Longest payload text shown in a collapsed row. */
  const PAYLOAD_CHARS = 400;

  const $ = (id) => document.getElementById(id);
  const body = document.body;

  // A script error is kept on <body> for tests and for whoever inspects the page.
  window.addEventListener("error", (e) => {
    body.dataset.jsError = String(e.message || e.type);
  });

  // ---------------------------------------------------------------- formatting

  const numberFormat = new Intl.NumberFormat(undefined, { maximumFractionDigits: 1 });
  const integerFormat = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });

  function fmt(value, digits) {
    if (value === null || value === undefined || !Number.isFinite(value)) return "–";
    if (digits === 0) return integerFormat.format(value);
    if (Math.abs(value) >= 1e6) return numberFormat.format(value / 1e6) + "M";
    if (Math.abs(value) >= 1e4) return numberFormat.format(value / 1e3) + "k";
    return numberFormat.format(value);
  }

  function pct(value) {
    return value === null || !Number.isFinite(value) ? "–" : Math.round(value * 100) + "%";
  }

  function clockTime(iso) {
    const date = iso ? new Date(iso) : new Date();
    if (Number.isNaN(date.getTime())) return String(iso);
    const pad = (n, w) => String(n).padStart(w || 2, "0");
    return pad(date.getHours()) + ":" + pad(date.getMinutes()) + ":" + pad(date.getSeconds()) +
      "." + pad(date.getMilliseconds(), 3);
  }

  function setText(id, text) {
    const el = $(id);
    if (el && el.textContent !== text) el.textContent = text;
  }

  function setMeter(id, fraction) {
    const el = $(id);
    if (!el) return;
    const f = Number.isFinite(fraction) ? Math.max(0, Math.min(1, fraction)) : 0;
    el.style.width = (f * 100).toFixed(1) + "%";
    el.dataset.level = f >= 1 ? "full" : f >= 0.8 ? "warn" : "ok";
  }

  function setBadge(id, state, text) {
    const el = $(id);
    el.dataset.state = state;
    el.textContent = text;
  }

  // ---------------------------------------------------------------- stats reading

  /** Sum of every series of counter `name` (all label sets). */
  function counterTotal(stats, name) {
    return seriesTotal(stats.counters, name);
  }

  /** The sum of every series of `name` (any labels) in `series`. */
  function seriesTotal(series, name) {
    let total = 0;
    for (const [key, value] of Object.entries(series || {})) {
      if (key === name || key.startsWith(name + "{")) total += value;
    }
    return total;
  }

  /** Every series of counter `name`, as [label text, value] pairs. */
  function counterSeries(stats, name) {
    const out = [];
    for (const [key, value] of Object.entries(stats.counters)) {
      if (key === name) out.push(["", value]);
      else if (key.startsWith(name + "{")) out.push([key.slice(name.length + 1, -1), value]);
    }
    return out;
  }

  /** The change of a counter between snapshots; null across a restart. */
  function delta(now, before) {
    const d = now - before;
    return d >= 0 ? d : null;
  }

  /** Quantile q of the observations between two snapshots of a histogram. */
  function intervalQuantile(now, before, q) {
    if (!now || !before) return null;
    const count = now.count - before.count;
    if (!(count > 0)) return null;
    const previous = new Map(before.buckets.map((b) => [b.le, b.count]));
    const rank = q * count;
    let lowerBound = 0;
    let lowerCount = 0;
    for (const bucket of now.buckets) {
      const cumulative = bucket.count - (previous.get(bucket.le) || 0);
      if (cumulative >= rank) {
        const inBucket = cumulative - lowerCount;
        if (inBucket <= 0) return bucket.le;
        return lowerBound + (bucket.le - lowerBound) * ((rank - lowerCount) / inBucket);
      }
      lowerBound = bucket.le;
      lowerCount = cumulative;
    }
    return now.buckets.length ? now.buckets[now.buckets.length - 1].le : null;
  }

  /** Busy seconds per second, spread over the writers: 0 to 1. */
  function busyRatio(busyPerSecond, writers) {
    if (busyPerSecond === null || !(writers > 0)) return null;
    return Math.min(1, busyPerSecond / writers);
  }

  /** Mean of the observations between two snapshots of a histogram. */
  function intervalMean(now, before) {
    if (!now || !before) return null;
    const count = now.count - before.count;
    return count > 0 ? (now.sum - before.sum) / count : null;
  }

  // ---------------------------------------------------------------- charts

  const AXIS = {
    stroke: "#8b949e",
    grid: { stroke: "rgba(48,54,61,0.7)", width: 1 },
    ticks: { stroke: "rgba(48,54,61,0.7)", width: 1 },
    font: "11px system-ui, sans-serif",
  };

  function line(label, color, extra) {
    return Object.assign(
      { label, stroke: color, width: 2, spanGaps: false, points: { show: false } },
      extra || {},
    );
  }

  function fill(color) {
    return color.replace("rgb(", "rgba(").replace(")", ",0.12)");
  }

  function fmtMs(v) {
    if (v === null || v === undefined || !Number.isFinite(v)) return "–";
    return v < 10 ? v.toFixed(2) : fmt(v);
  }

  const GREEN = "rgb(63,185,80)";
  const BLUE = "rgb(88,166,255)";
  const AMBER = "rgb(210,153,34)";
  const PURPLE = "rgb(188,140,255)";
  const RED = "rgb(248,81,73)";

  const chartDefs = {
    throughput: {
      series: [
        line("stored/s", GREEN, { fill: fill(GREEN) }),
        line("received/s", BLUE),
        line("dead-lettered/s", RED, { width: 1.5 }),
      ],
      value: (v) => fmt(v),
    },
    queue: {
      series: [
        line("depth", BLUE, { fill: fill(BLUE) }),
        line("held", AMBER),
        line("in flight", PURPLE, { width: 1.5, dash: [4, 4] }),
      ],
      value: (v) => fmt(v, 0),
    },
    batch: {
      series: [line("mean batch", PURPLE, { fill: fill(PURPLE) })],
      value: (v) => fmt(v),
    },
    latency: {
      series: [line("mean", GREEN, { fill: fill(GREEN) }), line("p99", AMBER)],
      value: (v) => fmtMs(v),
    },
    // In Sluice (received → committed, → acked) is always measured; end to
    // end (publish → commit) only for events whose publisher sent the time
    // in milliseconds (the timestamp_in_ms header): the AMQP timestamp alone
    // is whole seconds, and a latency from it would be rounding noise.
    latencies: {
      series: [
        line("committed p50", BLUE, { fill: fill(BLUE) }),
        line("committed p99", PURPLE),
        line("acked p99", AMBER, { width: 1.5, dash: [4, 4] }),
        line("end to end p50", GREEN),
      ],
      value: (v) => fmtMs(v),
    },
    busy: {
      series: [line("busy", AMBER, { fill: fill(AMBER) })],
      value: (v) => (v === null || v === undefined ? "–" : Math.round(v) + "%"),
      max: 100,
    },
  };

  /** Time stamps (seconds) and one array per series, per chart. */
  const history = { x: [] };
  for (const [name, def] of Object.entries(chartDefs)) history[name] = def.series.map(() => []);

  const charts = {};

  function chartSize(container) {
    const width = Math.max(280, Math.floor(container.clientWidth));
    return { width, height: 220 };
  }

  /** The legend shows the value under the cursor, else the latest one. */
  function legendValue(u, v, seriesIdx, idx) {
    if (idx !== null && idx !== undefined) return v;
    const values = u.data[seriesIdx] || [];
    for (let i = values.length - 1; i >= 0; i -= 1) {
      if (values[i] !== null && values[i] !== undefined) return values[i];
    }
    return null;
  }

  function makeCharts() {
    if (typeof uPlot !== "function") {
      for (const name of Object.keys(chartDefs)) {
        $("chart-" + name).querySelector(".chart").textContent = "The chart library did not load.";
      }
      return;
    }
    for (const [name, def] of Object.entries(chartDefs)) {
      const card = $("chart-" + name);
      const container = card.querySelector(".chart");
      const options = Object.assign(chartSize(container), {
        cursor: { points: { size: 6 }, drag: { x: false, y: false } },
        legend: { live: true },
        scales: {
          x: { time: true },
          y: { range: (u, min, max) => [0, def.max || (max > 0 ? max * 1.1 : 1)] },
        },
        axes: [Object.assign({}, AXIS), Object.assign({ size: 56, values: (u, ticks) => ticks.map((t) => fmt(t)) }, AXIS)],
        series: [{ value: (u, v) => (v === null ? "–" : new Date(v * 1000).toLocaleTimeString()) }].concat(
          def.series.map((s) => Object.assign({}, s, { value: (u, v, i, idx) => def.value(legendValue(u, v, i, idx)) })),
        ),
      });
      charts[name] = new uPlot(options, [history.x].concat(history[name]), container);
    }
    if (typeof ResizeObserver === "function") {
      const observer = new ResizeObserver(() => {
        for (const [name, chart] of Object.entries(charts)) {
          const size = chartSize($("chart-" + name).querySelector(".chart"));
          if (size.width !== chart.width) chart.setSize(size);
        }
      });
      for (const name of Object.keys(charts)) observer.observe($("chart-" + name));
    }
  }

  function redrawCharts() {
    for (const name of Object.keys(chartDefs)) {
      const card = $("chart-" + name);
      let points = 0;
      let max = 0;
      for (const values of history[name]) {
        for (const v of values) {
          if (v !== null && Number.isFinite(v)) {
            points += 1;
            if (v > max) max = v;
          }
        }
      }
      card.dataset.points = String(points);
      card.dataset.max = String(max);
      if (charts[name]) charts[name].setData([history.x].concat(history[name]));
    }
  }

  function pushPoint(t, values) {
    history.x.push(t);
    for (const name of Object.keys(chartDefs)) {
      history[name].forEach((arr, i) => arr.push(values[name] ? values[name][i] : null));
    }
    while (history.x.length && history.x[0] < t - WINDOW_SECONDS) {
      history.x.shift();
      for (const name of Object.keys(chartDefs)) history[name].forEach((arr) => arr.shift());
    }
  }

  // ---------------------------------------------------------------- snapshot → page

  let previous = null;
  let samples = 0;

  const VERDICTS = {
    nothing: "Keeping up: nothing is waiting",
    writers: "Waiting on the writers: all are busy",
    queue_full: "Waiting on the database: the queue is full",
    prefetch_exhausted: "Waiting on acks: the prefetch window is exhausted",
  };

  function render(stats) {
    const p = stats.pipeline;
    // Which replica this page talks to (INSTANCE_NAME): with several behind
    // a load balancer, the figures below are this one's own.
    if (stats.instance) {
      setText("instance", stats.instance);
      body.dataset.instance = stats.instance;
    }
    const t = stats.taken_at_ms / 1000;
    const stored = counterTotal(stats, "sluice_events_stored_total");
    const received = counterTotal(stats, "sluice_events_received_total");
    const dead = counterTotal(stats, "sluice_events_dead_lettered_total");

    // Rates and interval figures need the previous snapshot.
    let rates = { stored: null, received: null, dead: null, busy: null };
    const values = {
      queue: [p.queue_depth, p.queue_held, p.unacked],
    };
    if (previous) {
      const dt = (stats.taken_at_ms - previous.taken_at_ms) / 1000;
      if (dt > 0) {
        const rate = (now, before) => {
          const d = delta(now, before);
          return d === null ? null : d / dt;
        };
        rates = {
          stored: rate(stored, previous.stored),
          received: rate(received, previous.received),
          dead: rate(dead, previous.dead),
          busy: busyRatio(rate(p.writer_busy_seconds, previous.pipeline.writer_busy_seconds), p.writers),
        };
        values.throughput = [rates.stored, rates.received, rates.dead];
        const h = stats.histograms;
        const hp = previous.histograms;
        values.batch = [intervalMean(h.sluice_batch_size_events, hp.sluice_batch_size_events)];
        const ms = (v) => (v === null ? null : v * 1000);
        const writes = [h.sluice_write_duration_seconds, hp.sluice_write_duration_seconds];
        values.latency = [ms(intervalMean(writes[0], writes[1])), ms(intervalQuantile(writes[0], writes[1], 0.99))];
        const q = (name, quantile) => ms(intervalQuantile(h[name], hp[name], quantile));
        values.latencies = [
          q("sluice_received_to_committed_seconds", 0.5),
          q("sluice_received_to_committed_seconds", 0.99),
          q("sluice_received_to_acked_seconds", 0.99),
          q("sluice_end_to_end_latency_seconds", 0.5),
        ];
        values.busy = [rates.busy === null ? null : rates.busy * 100];
      }
    }
    pushPoint(t, values);
    redrawCharts();

    // Tiles.
    setText("v-stored", rates.stored === null ? "–" : fmt(rates.stored) + "/s");
    setText("h-stored", fmt(stored, 0));
    setText("v-received", rates.received === null ? "–" : fmt(rates.received) + "/s");
    setText("h-received", fmt(received, 0));
    setText("v-queue", fmt(p.queue_depth, 0));
    setText("h-queue", "capacity " + fmt(p.queue_capacity, 0) + (p.queue_held > 0 ? " · " + fmt(p.queue_held, 0) + " held" : ""));
    setMeter("m-queue", p.queue_capacity > 0 ? p.queue_depth / p.queue_capacity : 0);
    setText("v-writers", fmt(p.writers_busy, 0) + " / " + fmt(p.writers, 0));
    setText("h-writers", "busy ratio " + pct(rates.busy));
    setMeter("m-writers", p.writers > 0 ? p.writers_busy / p.writers : 0);
    setText("v-inflight", fmt(p.unacked, 0));
    setText("h-inflight", "of " + fmt(p.prefetch, 0) + " prefetch");
    setMeter("m-inflight", p.prefetch > 0 ? p.unacked / p.prefetch : 0);
    setText("v-dead", fmt(dead, 0));
    setText("h-dead", rates.dead ? fmt(rates.dead) + "/s now" : "none now");
    setText("v-observers", fmt(p.observers, 0));
    const liveDropped = counterTotal(stats, "sluice_live_dropped_events_total") +
      counterTotal(stats, "sluice_tap_dropped_events_total");
    setText("h-observers", fmt(liveDropped, 0) + " dropped for them");
    // While the datastore path is behind, the live path yields: say why
    // "missed here" climbs.
    const yielding = seriesTotal(stats.gauges, "sluice_live_yielding") > 0;
    body.dataset.liveYielding = String(yielding);
    setText("h-missed", yielding ? "paced: a backlog is being stored" : "lagged, this browser");

    // Badges.
    setBadge("badge-broker", p.broker_up === null ? "unknown" : p.broker_up ? "up" : "down",
      p.broker_up === null ? "Broker ?" : p.broker_up ? "Broker up" : "Broker down");
    // The database badge trusts the last /readyz probe, and a failing
    // writer (the gauge) overrides it at once.
    const databaseUp = p.database_up === false ? false : readiness.database;
    setBadge("badge-database", databaseUp === null ? "unknown" : databaseUp ? "up" : "down",
      databaseUp === null ? "Database ?" : databaseUp ? "Database up" : "Database down");
    setBadge("badge-service", "up", "Stats live");

    // Where it waits.
    const verdict = $("verdict");
    verdict.dataset.state = p.waiting_on;
    body.dataset.waitingOn = p.waiting_on;
    setText("verdict-text", p.database_up === false
      ? "Waiting on the database: writers are retrying"
      : VERDICTS[p.waiting_on] || p.waiting_on);
    for (const condition of ["queue_full", "prefetch_exhausted", "writers"]) {
      $("lamp-" + condition).dataset.on = String(p.conditions.includes(condition));
    }
    setText("lamp-queue_full-detail", fmt(p.queue_depth, 0) + " / " + fmt(p.queue_capacity, 0) + " pending" +
      (p.queue_held > 0 ? ", " + fmt(p.queue_held, 0) + " held" : ""));
    setText("lamp-prefetch_exhausted-detail", fmt(p.unacked, 0) + " / " + fmt(p.prefetch, 0) + " unacked");
    setText("lamp-writers-detail", fmt(p.writers_busy, 0) + " / " + fmt(p.writers, 0) + " busy · " + pct(rates.busy) + " of the last second");

    renderLosses(stats);
    renderBroker(stats);
    renderEndToEnd(stats.latency);

    samples += 1;
    body.dataset.statsSamples = String(samples);
    setText("updated", "Updated " + new Date(stats.taken_at_ms).toLocaleTimeString());
    previous = { taken_at_ms: stats.taken_at_ms, stored, received, dead, pipeline: p, histograms: stats.histograms };
  }

  /** Says what the end-to-end series covers, as /api/stats words it. */
  function renderEndToEnd(latency) {
    if (!latency) return;
    const measured = latency.end_to_end ? latency.end_to_end.count : 0;
    const leftOut = Object.values(latency.end_to_end_unmeasured || {}).reduce((a, b) => a + b, 0);
    const state = measured > 0 ? (leftOut > 0 ? "partial" : "measured") : leftOut > 0 ? "unmeasured" : "none";
    $("chart-latencies").dataset.endToEnd = state;
    setText("latency-note", "End to end: " + latency.end_to_end_note + ".");
  }

  function fillTable(id, rows, highlight) {
    const tbody = $(id).tBodies[0];
    const fragment = document.createDocumentFragment();
    for (const [label, value] of rows) {
      const tr = document.createElement("tr");
      const name = document.createElement("td");
      name.textContent = label;
      const cell = document.createElement("td");
      if (value === null) {
        name.colSpan = 2;
        name.className = "none";
      } else {
        cell.textContent = fmt(value, 0);
        if (highlight && value > 0) tr.className = "nonzero";
      }
      tr.appendChild(name);
      if (value !== null) tr.appendChild(cell);
      fragment.appendChild(tr);
    }
    tbody.replaceChildren(fragment);
  }

  function renderLosses(stats) {
    const rows = [];
    const labelled = (name, prefix) => {
      for (const [labels, value] of counterSeries(stats, name)) {
        rows.push([prefix + (labels ? " " + labels.replace(/^[a-z_]+="(.*)"$/, "$1") : ""), value]);
      }
    };
    labelled("sluice_events_dead_lettered_total", "dead-lettered:");
    labelled("sluice_queue_dropped_events_total", "queue dropped:");
    labelled("sluice_queue_deduplicated_events_total", "deduplicated:");
    labelled("sluice_tap_dropped_events_total", "live copy dropped at tap");
    labelled("sluice_live_dropped_events_total", "live dropped at");
    if (!rows.length) rows.push(["Nothing lost, dropped or dead-lettered.", null]);
    fillTable("losses", rows, true);
  }

  function renderBroker(stats) {
    const c = (name) => counterTotal(stats, name);
    fillTable("broker", [
      ["acks sent", c("sluice_amqp_acks_total")],
      ["deliveries acked", c("sluice_amqp_acked_deliveries_total")],
      ["rejects sent", c("sluice_amqp_rejects_total")],
      ["reconnects", c("sluice_amqp_reconnects_total")],
      ["database retries", c("sluice_database_retries_total")],
      ["already stored (redelivered)", c("sluice_events_already_stored_total")],
    ], false);
  }

  /** What /readyz said last: `null` until it answered. */
  const readiness = { database: null };

  /** Asks /readyz (a real `SELECT 1`) every five seconds. */
  async function probeReadiness() {
    try {
      const response = await fetch("/readyz", { cache: "no-store" });
      const report = await response.json();
      readiness.database = report.database === "up";
    } catch (err) {
      readiness.database = null;
    } finally {
      setTimeout(probeReadiness, 5000);
    }
  }

  async function poll() {
    try {
      const response = await fetch("/api/stats", { cache: "no-store" });
      if (!response.ok) throw new Error("HTTP " + response.status);
      render(await response.json());
    } catch (err) {
      setBadge("badge-service", "down", "Stats unreachable");
      const verdict = $("verdict");
      verdict.dataset.state = "down";
      setText("verdict-text", "The service does not answer (" + err.message + ")");
      pushPoint(Date.now() / 1000, {});
      redrawCharts();
    } finally {
      setTimeout(poll, POLL_MS);
    }
  }

  // ---------------------------------------------------------------- live tail

  const tbody = $("tail-body");
  let pending = [];
  let frameRequested = false;
  let eventsSeen = 0;
  let missed = 0;
  let paused = false;
  let pausedSkipped = 0;
  /** The oldest any event was when it was shown, in ms (this page's clock). */
  let worstShownAgeMs = 0;
  /** How old the newest event of the last batch drawn was when drawn, in ms. */
  let lastShownAgeMs = null;
  /** When (this page's clock, ms) events were last drawn, and last told missed. */
  let lastShownAt = null;
  let lastLaggedAt = null;
  function payloadText(payload) {
    if (typeof payload === "string") return payload;
    try {
      return JSON.stringify(payload);
    } catch (err) {
      return String(payload);
    }
  }

  function cell(className, text, title) {
    const td = document.createElement("td");
    if (className) td.className = className;
    td.textContent = text;
    if (title) td.title = title;
    return td;
  }

  function eventRow(event) {
    const tr = document.createElement("tr");
    tr.className = "fresh";
    const compact = payloadText(event.payload);
    tr.appendChild(cell("c-time", clockTime(event.received_at), event.received_at || ""));
    tr.appendChild(cell("c-key", event.routing_key || "", event.routing_key || ""));
    tr.appendChild(cell("c-id", event.message_id || "", event.message_id || ""));
    const payload = cell("payload", compact.length > PAYLOAD_CHARS ? compact.slice(0, PAYLOAD_CHARS) + "…" : compact);
    tr.appendChild(payload);
    tr.addEventListener("click", () => {
      const expanded = tr.classList.toggle("expanded");
      if (expanded) {
        let full;
        try {
          full = JSON.stringify({ payload: event.payload, headers: event.headers, published_at: event.published_at }, null, 2);
        } catch (err) {
          full = compact;
        }
        payload.textContent = full;
      } else {
        payload.textContent = compact.length > PAYLOAD_CHARS ? compact.slice(0, PAYLOAD_CHARS) + "…" : compact;
      }
    });
    return tr;
  }

  function flushTail() {
    frameRequested = false;
    const batch = pending.slice(-TAIL_ROWS);
    pending = [];
    noteShown(batch);
    const fragment = document.createDocumentFragment();
    for (let i = batch.length - 1; i >= 0; i -= 1) fragment.appendChild(eventRow(batch[i]));
    tbody.insertBefore(fragment, tbody.firstChild);
    while (tbody.rows.length > TAIL_ROWS) tbody.deleteRow(-1);
    $("tail-empty").hidden = tbody.rows.length > 0;
    setText("tail-count", tbody.rows.length + " shown · " + fmt(eventsSeen, 0) + " seen");
    body.dataset.tailRows = String(tbody.rows.length);
  }

  /** The oldest an event was when its frame arrived, in ms (this page's clock). */
  let worstArrivalAgeMs = 0;

  function onEvents(events) {
    for (const event of events) {
      if (Number.isFinite(event.position) && (lastPosition === null || event.position > lastPosition)) {
        lastPosition = event.position;
      }
    }
    if (lastPosition !== null) body.dataset.position = String(lastPosition);
    const first = events.length ? Date.parse(events[0].received_at) : NaN;
    if (Number.isFinite(first)) {
      worstArrivalAgeMs = Math.max(worstArrivalAgeMs, Date.now() - first);
      body.dataset.worstArrivalAgeMs = String(Math.round(worstArrivalAgeMs));
    }
    eventsSeen += events.length;
    body.dataset.eventsSeen = String(eventsSeen);
    if (paused) {
      pausedSkipped += events.length;
      setText("pause", "Resume (" + fmt(pausedSkipped, 0) + " new)");
      setText("tail-count", tbody.rows.length + " shown · " + fmt(eventsSeen, 0) + " seen");
      return;
    }
    for (const event of events) pending.push(event);
    if (pending.length > TAIL_ROWS * 2) pending = pending.slice(-TAIL_ROWS);
    if (!frameRequested) {
      frameRequested = true;
      requestAnimationFrame(flushTail);
    }
  }

  // Freshness: how old events were when this page showed them, counted from
  // when the service received them (the service keeps them under
  // WS_MAX_LAG when sent). It is the age of the newest event of the last
  // batch drawn, at the moment it was drawn, so it does not grow while
  // nothing arrives: after IDLE_AFTER_MS with no events the tile says
  // "idle" (or "behind" when events were told missed meanwhile, i.e. the
  // stream is busy but none reached this page). Ages use this page's clock
  // against the service's: a skewed clock shifts them by the skew.
  const IDLE_AFTER_MS = 3000;

  function noteShown(batch) {
    const now = Date.now();
    let newest = null;
    for (const event of batch) {
      const at = Date.parse(event.received_at);
      if (!Number.isFinite(at)) continue;
      worstShownAgeMs = Math.max(worstShownAgeMs, now - at);
      if (newest === null || at > newest) newest = at;
    }
    if (newest === null) return;
    lastShownAgeMs = Math.max(0, now - newest);
    lastShownAt = now;
    body.dataset.worstShownAgeMs = String(Math.round(worstShownAgeMs));
    showFreshness();
  }

  function secondsText(ms) {
    return ms < 10000 ? (ms / 1000).toFixed(1) + " s" : fmt(ms / 1000, 0) + " s";
  }

  function showFreshness() {
    let state;
    let value;
    let hint;
    const now = Date.now();
    if (paused) {
      state = "paused";
      value = "paused";
      hint = "the tail is paused";
    } else if (lastShownAt === null) {
      state = "none";
      value = "–";
      hint = "no events shown yet";
    } else if (now - lastShownAt < IDLE_AFTER_MS) {
      state = "fresh";
      value = secondsText(lastShownAgeMs);
      hint = "when shown · worst " + secondsText(worstShownAgeMs);
    } else {
      const quiet = secondsText(now - lastShownAt);
      if (lastLaggedAt !== null && lastLaggedAt > lastShownAt) {
        state = "behind";
        value = "behind";
        hint = "missed, none shown " + quiet;
      } else {
        state = "idle";
        value = "idle";
        hint = "quiet for " + quiet;
      }
    }
    $("tile-fresh").dataset.state = state;
    body.dataset.freshnessState = state;
    if (lastShownAgeMs !== null) body.dataset.freshnessMs = String(Math.round(lastShownAgeMs));
    setText("v-fresh", value);
    setText("h-fresh", hint);
  }

  setInterval(showFreshness, 500);

  // How late this page's own timers run (its main thread busy or starved):
  // what the page adds to an event's age on top of what the service bounds.
  let loopCheckAt = performance.now();
  let worstLoopLagMs = 0;
  setInterval(() => {
    const now = performance.now();
    worstLoopLagMs = Math.max(worstLoopLagMs, now - loopCheckAt - 100);
    loopCheckAt = now;
    body.dataset.worstLoopLagMs = String(Math.round(worstLoopLagMs));
  }, 100);

  function onLagged(count, position) {
    // Told of events up to `position`: a reconnect resumes after it too, so
    // that they are neither replayed nor told again.
    if (Number.isFinite(position) && (lastPosition === null || position > lastPosition)) {
      lastPosition = position;
      body.dataset.position = String(lastPosition);
    }
    lastLaggedAt = Date.now();
    missed += count;
    body.dataset.missed = String(missed);
    setText("v-missed", fmt(missed, 0));
  }

  // ---------------------------------------------------------------- WebSocket

  let socket = null;
  let topic = new URLSearchParams(location.search).get("topic") || "";
  /** Position of the newest event shown or told missed: a reconnect resumes after it. */
  let lastPosition = null;
  let retryMs = 500;

  function setLive(state, text) {
    body.dataset.ws = state;
    setBadge("badge-live", state === "open" ? "up" : state === "connecting" ? "warn" : "down", text);
  }

  function showFilter(text, error) {
    const status = $("filter-status");
    status.textContent = text;
    status.dataset.error = String(Boolean(error));
  }

  function describeFilter() {
    showFilter(topic ? "Showing topics matching " + topic + "." : "All topics.", false);
  }

  function connect() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    // The first connection asks for the last events (the tail is full at
    // once); a reconnection resumes after the last one shown, and the
    // service replays what came meanwhile, or says how many were missed.
    const params = new URLSearchParams();
    if (topic) params.set("topic", topic);
    if (lastPosition === null) params.set("last", String(TAIL_ROWS));
    else params.set("since", String(lastPosition));
    const query = "?" + params.toString();
    setLive("connecting", "Live connecting");
    const ws = new WebSocket(scheme + "//" + location.host + "/ws" + query);
    socket = ws;
    ws.addEventListener("open", () => {
      retryMs = 500;
      setLive("open", "Live");
    });
    ws.addEventListener("message", (message) => {
      let frame;
      try {
        frame = JSON.parse(message.data);
      } catch (err) {
        return;
      }
      if (frame.type === "events" && Array.isArray(frame.events)) onEvents(frame.events);
      else if (frame.type === "lagged" && Number.isFinite(frame.missed)) onLagged(frame.missed, frame.position);
    });
    ws.addEventListener("close", (close) => {
      if (socket !== ws) return;
      socket = null;
      if (close.code === 1008 && topic) {
        // The service refused the filter: say why and go back to every topic.
        showFilter("Filter " + topic + " refused: " + (close.reason || "invalid topic pattern") + ". Showing all topics.", true);
        topic = "";
        $("filter-topic").value = "";
        updateUrl();
        retryMs = 0;
      }
      setLive("closed", "Live reconnecting");
      setTimeout(connect, retryMs);
      retryMs = Math.min(Math.max(retryMs * 2, 500), 10000);
    });
  }

  function updateUrl() {
    const url = new URL(location.href);
    if (topic) url.searchParams.set("topic", topic);
    else url.searchParams.delete("topic");
    window.history.replaceState(null, "", url);
  }

  function applyFilter(next) {
    topic = next.trim();
    updateUrl();
    describeFilter();
    tbody.replaceChildren();
    pending = [];
    $("tail-empty").hidden = false;
    body.dataset.tailRows = "0";
    setText("tail-count", "0 shown · " + fmt(eventsSeen, 0) + " seen");
    if (socket && socket.readyState === WebSocket.OPEN) {
      socket.send(JSON.stringify({ type: "filter", topic: topic || null }));
    }
  }

  // ---------------------------------------------------------------- start

  $("filter-topic").value = topic;
  describeFilter();
  $("filter-form").addEventListener("submit", (e) => {
    e.preventDefault();
    applyFilter($("filter-topic").value);
  });
  $("pause").addEventListener("click", () => {
    paused = !paused;
    $("pause").setAttribute("aria-pressed", String(paused));
    if (!paused) pausedSkipped = 0;
    setText("pause", paused ? "Resume" : "Pause");
  });

  makeCharts();
  connect();
  probeReadiness();
  poll();
})();
