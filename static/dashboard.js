// kevlard dashboard: polls /api/cluster and /api/stats every second and on every event, renders
// the workers, the routes and the charts (static/charts.js), logs the events that htmx's SSE extension reads
// from /api/events, sends faults (the admin cookie authenticates) and streams the prompt box.
(() => {
  "use strict";

  const POLL_MS = 1000;
  const WINDOW_S = 300; // the charts' time span
  const CHART_EVERY_S = 0.9; // at most one chart sample per poll, not one per event refresh
  const MAX_EVENTS = 300;
  const SEEN_EVENTS = 2000; // events remembered to drop a replay's repeats: far more than a replay holds
  const FETCH_TIMEOUT_MS = 5000;
  const FAULT_LABELS = { kill: "kill", hang: "hang", slow: "slow", device_error: "device error" };

  const body = document.body;
  const isAdmin = body.dataset.admin === "true";
  const model = body.dataset.model;
  const faultKinds = body.dataset.faultKinds.split(",").filter(Boolean);
  const suspectAfterS = parseFloat(body.dataset.suspectAfterS) || 1;
  const $ = (id) => document.getElementById(id);

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }
  const nowS = () => performance.now() / 1000;
  const fmtPct = (x) => (x == null ? "–" : `${Math.round(x * 100)}%`);
  const fmtNum = (x) => (x == null ? "–" : Number(x).toLocaleString("en-US"));
  function fmtSeconds(s) {
    if (s == null) return "–";
    if (s < 1) return `${Math.round(s * 1000)} ms`;
    return `${s.toFixed(s < 10 ? 2 : 1)} s`;
  }
  function clock(epochS) {
    const when = new Date(epochS * 1000);
    return `${when.toLocaleTimeString("en-GB", { hour12: false })}.${String(when.getMilliseconds()).padStart(3, "0")}`;
  }
  const layersText = (layers) => (layers && layers.length === 2 ? `L${layers[0]}-${layers[1] - 1}` : "");

  async function getJSON(url) {
    const r = await fetch(url, { credentials: "same-origin", signal: AbortSignal.timeout(FETCH_TIMEOUT_MS) });
    if (!r.ok) throw new Error(`${url}: ${r.status}`);
    return r.json();
  }

  // ------------------------------------------------------------------ refresh loop

  let busy = false;
  let again = false;
  async function refresh() {
    if (busy) { again = true; return; }
    busy = true;
    try {
      const [snap, stats] = await Promise.all([getJSON("/api/cluster"), getJSON("/api/stats").catch(() => null)]);
      render(snap, stats, nowS());
    } catch (e) {
      $("ready-badge").textContent = "unreachable";
      $("ready-badge").className = "badge not-ready";
    } finally {
      busy = false;
      if (again) { again = false; refresh(); }
    }
  }
  let refreshSoon = null;
  function scheduleRefresh() {
    if (refreshSoon) return;
    refreshSoon = setTimeout(() => { refreshSoon = null; refresh(); }, 80);
  }

  function render(snap, stats, t) {
    renderSummary(snap);
    const byId = new Map(snap.workers.map((w) => [w.id, w]));
    renderWorkers(snap, byId, t);
    renderPipelines(snap, byId);
    sampleCharts(snap, stats, t);
  }

  function renderSummary(snap) {
    const badge = $("ready-badge");
    badge.textContent = snap.ready ? "ready" : "not ready";
    badge.className = `badge ${snap.ready ? "ready" : "not-ready"}`;
    $("sum-running").textContent = fmtNum(snap.num_running);
    $("sum-waiting").textContent = fmtNum(snap.num_waiting);
    $("sum-kv").textContent = fmtPct(snap.kv_usage);
    $("sum-lag").textContent = fmtNum(snap.replica_lag_tokens);
    const stats = snap.stats || {};
    $("sum-tokens").textContent = fmtNum(stats.tokens_generated);
    $("sum-requests").textContent = fmtNum(stats.requests_finished);
    const rec = snap.recovery || {};
    $("sum-failures").textContent = fmtNum(rec.failures || 0);
    $("sum-reroutes").textContent = fmtNum(rec.reroutes || 0);
    $("sum-rehosts").textContent = fmtNum(rec.rehosts || 0);
    const took = rec.recovery_seconds || [];
    $("sum-recovery").textContent = took.length ? fmtSeconds(took[took.length - 1]) : "–";
  }

  // ------------------------------------------------------------------ worker cards

  const cards = new Map(); // worker id -> {root, fields...}
  const stepRates = new Map(); // worker id -> {t, steps, rate}

  function shownState(w) {
    if (w.state === "healthy" && w.heartbeat_age_s != null && w.heartbeat_age_s > suspectAfterS) return "suspect";
    return w.state;
  }

  function makeCard(w) {
    const root = el("article", "card");
    root.dataset.worker = w.id;
    const head = el("div", "card-head");
    const title = el("div", "card-title", `w${w.id}`);
    const device = el("span", "device", w.device);
    title.append(device);
    const state = el("span", "state");
    head.append(title, state);
    const stages = el("div", "stages");
    const kv = el("div", "kv");
    const fields = {};
    for (const [key, label] of [["pid", "pid"], ["heartbeat", "heartbeat"], ["steps", "steps"], ["kv", "KV usage"], ["lag", "replica lag"]]) {
      kv.append(el("span", "", label));
      fields[key] = el("b");
      kv.append(fields[key]);
    }
    const bar = el("div", "bar");
    const barFill = el("span");
    bar.append(barFill);
    const failure = el("div", "failure");
    const faults = el("div", "faults");
    const buttons = [];
    for (const kind of faultKinds) {
      const b = el("button", `fault ${kind}`, FAULT_LABELS[kind] || kind);
      b.type = "button";
      b.dataset.kind = kind;
      b.dataset.worker = w.id;
      b.title = isAdmin ? `inject "${FAULT_LABELS[kind] || kind}" into worker ${w.id}`
        : "fault injection needs the admin link printed at start-up";
      b.addEventListener("click", () => injectFault(w.id, kind, root));
      buttons.push(b);
      faults.append(b);
    }
    root.append(head, stages, kv, bar, failure, faults);
    return { root, state, stages, fields, barFill, failure, buttons, device };
  }

  function renderWorkers(snap, byId, t) {
    const container = $("workers");
    const pipelineKv = new Map((snap.pipelines || []).map((p) => [p.id, p]));
    for (const w of snap.workers) {
      let card = cards.get(w.id);
      if (!card) {
        card = makeCard(w);
        cards.set(w.id, card);
        container.append(card.root);
      }
      const state = shownState(w);
      card.root.dataset.state = state;
      card.state.textContent = state;
      card.state.className = `state ${state}`;
      card.device.textContent = w.device;
      card.fields.pid.textContent = w.pid ?? "–";
      const gone = w.state === "dead" || w.state === "stopped";
      card.fields.heartbeat.textContent = gone ? "–" : fmtSeconds(w.heartbeat_age_s);
      const prev = stepRates.get(w.id);
      let rate = prev ? prev.rate : null;
      if (!prev) {
        stepRates.set(w.id, { t, steps: w.steps_done, rate: null });
      } else if (t - prev.t >= 0.5) {
        const inst = Math.max(0, (w.steps_done - prev.steps) / (t - prev.t));
        rate = rate == null ? inst : 0.5 * rate + 0.5 * inst;
        stepRates.set(w.id, { t, steps: w.steps_done, rate });
      }
      const rateText = rate == null || gone ? "" : ` · ${rate.toFixed(1)}/s`;
      card.fields.steps.textContent = `${fmtNum(w.steps_done)}${rateText}`;

      card.stages.replaceChildren();
      const served = w.served || [];  // a dead worker: what it served
      if (w.stages.length === 0 && served.length === 0) {
        card.stages.append(el("span", "stage-tag none", w.state === "spare" ? "spare: no stage" : "no stage"));
      }
      for (const st of w.stages) {
        card.stages.append(el("span", "stage-tag mono", `p${st.pipeline} s${st.stage} ${layersText(st.layers)}`));
      }
      for (const st of served) {
        card.stages.append(el("span", "stage-tag mono none", `was p${st.pipeline} s${st.stage}`));
      }
      // KV usage and replica lag per pipeline when the snapshot has them, else cluster-wide
      const kvOf = w.stages.map((st) => pipelineKv.get(st.pipeline)).filter(Boolean);
      const live = w.stages.length > 0 && w.state !== "dead" && w.state !== "stopped";
      let kv = null;
      let lag = null;
      if (live) {
        const perPipeKv = kvOf.map((p) => p.kv_usage).filter((x) => x != null);
        kv = perPipeKv.length ? Math.max(...perPipeKv) : snap.kv_usage;
        const perPipeLag = kvOf.map((p) => p.replica_lag_tokens).filter((x) => x != null);
        lag = perPipeLag.length ? perPipeLag.reduce((a, b) => a + b, 0) : snap.replica_lag_tokens;
      }
      card.fields.kv.textContent = fmtPct(kv);
      card.barFill.style.width = `${Math.round((kv || 0) * 100)}%`;
      card.fields.lag.textContent = lag == null ? "–" : `${fmtNum(lag)} tok`;
      card.failure.textContent = w.failure ? `failure: ${w.failure}` : card.failure.dataset.message || "";
      for (const b of card.buttons) b.disabled = !isAdmin || gone;
    }
    for (const [wid, card] of cards) {
      if (!byId.has(wid)) { card.root.remove(); cards.delete(wid); stepRates.delete(wid); }
    }
  }

  async function injectFault(worker, kind, root) {
    const card = cards.get(worker);
    for (const b of card.buttons) b.disabled = true;
    card.failure.dataset.message = "";
    try {
      const r = await fetch("/api/faults", {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ worker, kind }),
        signal: AbortSignal.timeout(FETCH_TIMEOUT_MS),
      });
      if (!r.ok) {
        const err = await r.json().catch(() => null);
        card.failure.dataset.message = `${kind} refused: ${(err && err.error && err.error.message) || r.status}`;
      }
    } catch (e) {
      card.failure.dataset.message = `${kind} failed: ${e.message}`;
    }
    card.failure.textContent = card.failure.dataset.message;
    refresh();
  }

  // ------------------------------------------------------------------ pipelines as routes

  // What happened to each pipeline lately, from the events, so that a reroute stays visible after
  // a restore that follows it within a poll: "stage 1: w1 died → via buddy w3 for 0.22 s → restored on w4".
  const knownRoutes = new Map(); // pipeline -> route, from snapshots and route events
  const routeNotes = new Map(); // pipeline -> {stage, text, time, kind}
  const NOTE_FRESH_S = 20;

  function noteRouteEvent(ev) {
    const p = ev.pipeline;
    const at = clock(ev.time);
    if (ev.kind === "reroute") {
      const old = knownRoutes.get(p);
      const lost = ev.replaced ?? (old && old[ev.stage] !== ev.worker ? old[ev.stage] : null);
      const dead = lost !== null && lost !== undefined ? `w${lost} lost → ` : "";
      routeNotes.set(p, { kind: "reroute", stage: ev.stage, time: ev.time, buddy: ev.worker,
        text: `stage ${ev.stage}: ${dead}via buddy w${ev.worker} (${at})` });
    } else if (ev.kind === "restore") {
      const prev = routeNotes.get(p);
      if (ev.how === "restart") {
        routeNotes.set(p, { kind: "restore", time: ev.time, text: `restarted (${at})` });
      } else {
        const via = prev && prev.kind === "reroute" && prev.stage === ev.stage
          ? `${prev.text.replace(/ \(.*\)$/, "")} for ${fmtSeconds(ev.time - prev.time)} → ` : `stage ${ev.stage}: `;
        routeNotes.set(p, { kind: "restore", stage: ev.stage, time: ev.time, text: `${via}restored on w${ev.worker} (${at})` });
      }
    } else if (ev.kind === "pipeline_down") {
      routeNotes.set(p, { kind: "down", stage: ev.stage, time: ev.time, text: `down at stage ${ev.stage} (${at})` });
    }
    if (ev.route) knownRoutes.set(p, ev.route);
  }

  function renderPipelines(snap, byId) {
    const container = $("pipelines");
    const rows = [];
    const wallNow = Date.now() / 1000;
    for (const p of snap.pipelines) {
      knownRoutes.set(p.id, p.route);
      const note = routeNotes.get(p.id);
      const fresh = note && wallNow - note.time < NOTE_FRESH_S;
      const row = el("div", "route-row");
      row.dataset.pipeline = p.id;
      row.dataset.state = p.state;
      const name = el("div", "route-name");
      name.append(el("b", "", `P${p.id}`), el("span", `pstate ${p.state}`, p.state));
      if (p.quiet) name.append(el("span", "pstate quiet", "quiet: heartbeats late"));
      if (p.num_running != null) name.append(el("span", "pstate", `${p.num_running} running`));
      const route = el("div", "route");
      route.dataset.route = p.route.join(",");
      p.route.forEach((wid, s) => {
        if (s > 0) route.append(el("span", "arrow", "→"));
        const w = byId.get(wid);
        const hop = el("div", "hop");
        hop.dataset.worker = wid;
        hop.dataset.state = w ? shownState(w) : "dead";
        const own = w && w.stages.find((st) => st.pipeline === p.id && st.stage === s);
        hop.append(el("div", "w", `w${wid}`));
        hop.append(el("div", "sub mono", `s${s} ${layersText(own && own.layers)}`));
        if (fresh && note.stage === s) hop.classList.add("changed");
        if (p.pools && p.pools[s] === "replica") {
          hop.classList.add("via-buddy");
          hop.append(el("span", "buddy", "via buddy"));
        }
        const holder = p.replica_holders ? p.replica_holders[s] : null;
        hop.append(el("div", "sub", holder == null ? "no replica" : `replica → w${holder}`));
        route.append(hop);
      });
      route.append(el("span", "arrow", "→"), el("span", "endpoint", "tokens"));
      row.append(name, route);
      if (note) row.append(el("div", `route-note ${note.kind}${fresh ? " fresh" : ""}`, note.text));
      rows.push(row);
    }
    container.replaceChildren(...rows);
  }

  // ------------------------------------------------------------------ charts (static/charts.js)

  const charts = {
    tps: KevlardChart($("chart-tps"), { title: "tokens/s", keys: ["tokens/s"], fmt: (v) => v.toFixed(1), windowS: WINDOW_S }),
    ttft: KevlardChart($("chart-ttft"), { title: "TTFT", keys: ["p50", "p99"], fmt: fmtSeconds, windowS: WINDOW_S }),
    latency: KevlardChart($("chart-latency"), { title: "latency", keys: ["p50", "p99"], fmt: fmtSeconds, windowS: WINDOW_S }),
    queue: KevlardChart($("chart-queue"), { title: "requests", keys: ["running", "waiting"], fmt: (v) => String(Math.round(v)), windowS: WINDOW_S }),
  };
  let lastSample = null; // {t, tokens}

  function sampleCharts(snap, stats, t) {
    if (lastSample && t - lastSample.t < CHART_EVERY_S) return;
    const tokens = (snap.stats || {}).tokens_generated || 0;
    const tps = lastSample ? Math.max(0, (tokens - lastSample.tokens) / (t - lastSample.t)) : null;
    lastSample = { t, tokens };
    charts.tps.push(t, [tps]);
    charts.ttft.push(t, stats ? [stats.ttft_p50_s, stats.ttft_p99_s] : [null, null]);
    charts.latency.push(t, stats ? [stats.latency_p50_s, stats.latency_p99_s] : [null, null]);
    charts.queue.push(t, [snap.num_running, snap.num_waiting]);
    for (const chart of Object.values(charts)) chart.draw(t);
  }

  // ------------------------------------------------------------------ event log

  const seenEvents = new Set();
  const EVENT_TONE = {
    failure: "k-bad", pipeline_down: "k-bad", no_route: "k-bad", reroute_failed: "k-bad", rehost_failed: "k-bad",
    spare_failed: "k-bad", restart_failed: "k-bad", fault_injected: "k-warn", step_deadline: "k-warn",
    restore_waiting: "k-warn", restart: "k-warn", monitor_stalled: "k-warn", reroute: "k-info", rehost: "k-info", restore: "k-good",
    request_resumed: "k-good", replica_lag: "k-quiet",
  };
  const routeText = (route) => (route || []).map((w) => `w${w}`).join(" → ");

  function describe(ev) {
    const w = ev.worker != null ? `w${ev.worker}` : "";
    switch (ev.kind) {
      case "worker_state":
        return `${w} is ${ev.state}${ev.reason ? ` (${ev.reason})` : ""}${ev.exit_code != null ? `, exit ${ev.exit_code}` : ""}`;
      case "failure":
        return `${w} failed: ${ev.reason}${ev.message ? ` — ${ev.message}` : ""}${ev.heartbeat_age_s != null ? ` (no heartbeat for ${ev.heartbeat_age_s} s)` : ""}`;
      case "fault_injected":
        return `${FAULT_LABELS[ev.fault] || ev.fault} injected into ${w}${ev.duration_s ? ` for ${ev.duration_s} s` : ""}`;
      case "reroute":
        return `P${ev.pipeline} stage ${ev.stage} rerouted via buddy ${w} in ${fmtSeconds(ev.seconds)}: ${routeText(ev.route)}`;
      case "rehost":
        return `${w} rehosting P${ev.pipeline} stage ${ev.stage}`;
      case "restore":
        return `P${ev.pipeline}${ev.stage != null ? ` stage ${ev.stage}` : ""} restored${w ? ` on ${w}` : ""}${ev.how ? ` (${ev.how})` : ""}: ${routeText(ev.route)}`;
      case "request_resumed":
        return `request ${ev.request} ${ev.how === "replica" ? "resumed from the KV replica" : `resumed by ${ev.how}`}, ${ev.recomputed_tokens} token(s) recomputed`;
      case "replica_lag":
        return `replica lag ${ev.tokens} token(s)`;
      case "monitor_stalled":
        return `the daemon did not run for ${fmtSeconds(ev.late_s)}: heartbeats judged once read`;
      case "pipeline_down":
        return `P${ev.pipeline} down at stage ${ev.stage}`;
      default: {
        const rest = Object.entries(ev).filter(([k]) => !["kind", "time", "worker"].includes(k))
          .map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`).join(" ");
        return `${w} ${rest}`.trim();
      }
    }
  }

  function logEvent(kind, data) {
    let ev;
    try { ev = JSON.parse(data); } catch (e) { return; }
    ev.kind = ev.kind || kind;
    const key = `${ev.time}|${ev.kind}|${ev.worker}`;
    if (seenEvents.has(key)) return; // a reconnect replays the latest events
    seenEvents.add(key);
    // remembered for as long as a replay can repeat them (the stream's last 100), not forever
    if (seenEvents.size > SEEN_EVENTS) seenEvents.delete(seenEvents.values().next().value);
    const li = el("li");
    li.dataset.kind = ev.kind;
    const time = el("time", "", clock(ev.time));
    time.dateTime = new Date(ev.time * 1000).toISOString();
    li.append(time, el("span", `kind ${EVENT_TONE[ev.kind] || "k-info"}`, ev.kind.replaceAll("_", " ")), el("span", "what", describe(ev)));
    noteRouteEvent(ev);
    const log = $("event-log");
    // the replica lag is reported every second while it changes: keep only its latest line on top
    if (ev.kind === "replica_lag" && log.firstElementChild && log.firstElementChild.dataset.kind === "replica_lag") {
      log.firstElementChild.remove();
    }
    log.prepend(li);
    while (log.children.length > MAX_EVENTS) log.lastElementChild.remove();
  }

  // static/event_stream.js: this tab's stream, or the one another tab of the browser shares
  const source = $("event-source");
  source.addEventListener("kevlard:event", (e) => {
    logEvent(e.detail.type, e.detail.data);
    scheduleRefresh();
  });
  source.addEventListener("kevlard:stream", (e) => {
    const { open, shared } = e.detail;
    $("conn").className = `conn ${open ? "open" : "closed"}`;
    $("conn").dataset.shared = shared ? "true" : "false";
    $("conn").title = `event stream ${open ? "connected" : "lost, reconnecting"}${shared ? " (shared by another tab of this browser)" : ""}`;
  });

  // ------------------------------------------------------------------ prompt box

  let controller = null;
  const out = $("prompt-output");
  const status = $("prompt-status");

  function setStatus(text, cls, finish) {
    status.textContent = text;
    status.className = `status ${cls || ""}`;
    if (finish !== undefined) status.dataset.finish = finish;
  }

  async function sendPrompt() {
    const content = $("prompt-text").value.trim();
    if (!content) return;
    const maxTokens = parseInt($("prompt-max-tokens").value, 10);
    const request = { model, messages: [{ role: "user", content }], stream: true, stream_options: { include_usage: true } };
    if (maxTokens > 0) request.max_tokens = maxTokens;
    if ($("prompt-ignore-eos").checked) request.ignore_eos = true;
    const headers = { "Content-Type": "application/json" };
    const apiKey = $("prompt-api-key").value.trim();
    if (apiKey) headers.Authorization = `Bearer ${apiKey}`;

    controller = new AbortController();
    $("prompt-send").textContent = "Stop";
    out.textContent = "";
    delete status.dataset.finish;
    setStatus("waiting for the first token…");
    const t0 = performance.now();
    let ttft = null;
    let pieces = 0;
    let usage = null;
    let finish = null;
    try {
      const r = await fetch("/v1/chat/completions", {
        method: "POST", credentials: "same-origin", headers, body: JSON.stringify(request), signal: controller.signal,
      });
      if (!r.ok) {
        const err = await r.json().catch(() => null);
        if (r.status === 401) $("prompt-api-key-label").hidden = false;
        throw new Error(`${r.status}: ${(err && err.error && err.error.message) || r.statusText}`);
      }
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      let done = false;
      while (!done) {
        const { value, done: ended } = await reader.read();
        if (ended) break;
        buffer += value;
        const blocks = buffer.split(/\r?\n\r?\n/);
        buffer = blocks.pop();
        for (const block of blocks) {
          const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
          if (!data) continue;
          if (data === "[DONE]") { done = true; break; }
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message || "stream error");
          if (chunk.usage) usage = chunk.usage;
          for (const choice of chunk.choices || []) {
            const text = choice.delta && choice.delta.content;
            if (text) {
              if (ttft == null) ttft = (performance.now() - t0) / 1000;
              out.textContent += text;
              out.scrollTop = out.scrollHeight;
              pieces += 1;
            }
            if (choice.finish_reason) finish = choice.finish_reason;
          }
        }
        const n = usage ? usage.completion_tokens : pieces;
        setStatus(`streaming · ${n} tokens · TTFT ${fmtSeconds(ttft)}`);
      }
      const total = (performance.now() - t0) / 1000;
      const n = usage ? usage.completion_tokens : pieces;
      setStatus(`finish: ${finish || "none"} · ${n} tokens · TTFT ${fmtSeconds(ttft)} · ${fmtSeconds(total)} total`,
        finish ? "done" : "error", finish || "");
      status.dataset.tokens = n;
    } catch (e) {
      const stopped = e.name === "AbortError";
      setStatus(stopped ? "stopped" : `error: ${e.message}`, stopped ? "" : "error", stopped ? "stopped" : "error");
    } finally {
      controller = null;
      $("prompt-send").textContent = "Send";
    }
  }

  // one button: Send, and Stop while a request streams
  $("prompt-form").addEventListener("submit", (e) => {
    e.preventDefault();
    if (controller) controller.abort();
    else sendPrompt();
  });

  refresh();
  setInterval(refresh, POLL_MS);
})();
