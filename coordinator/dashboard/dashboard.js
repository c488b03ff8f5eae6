/* hilora dashboard: a static page that reads the coordinator's admin JSON API (docs/dashboard.md).
 * No framework, no CDN: DOM built with textContent only (never innerHTML with data), charts are
 * inline SVG made here. The admin token lives in sessionStorage and goes out as a Bearer header. */
"use strict";

(function () {
  const TOKEN_KEY = "hilora.adminToken";
  const POLL_MS = 4000;
  const SVG_NS = "http://www.w3.org/2000/svg";
  const TIERS = ["root", "cluster", "leaf"];

  const state = {
    timer: null,
    view: null,            // {kind: "list"} | {kind: "federation", id}
    generation: 0,         // bumps on every navigation: stale responses are dropped
    polling: false,
    clientSort: { key: "name", dir: 1 },
    clientFilter: "",
    selectedRun: null,     // clustering run shown in the heatmap; null: the newest
    affinity: null,        // {runId, data}
    roundsLimit: 50,
    data: {},
  };

  // ------------------------------------------------------------------ DOM helpers

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    setAttrs(node, attrs);
    append(node, children);
    return node;
  }

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    setAttrs(node, attrs);
    if (tag === "svg" && attrs && attrs.viewBox) {
      const [, , w, h] = attrs.viewBox.split(" ").map(Number);
      node.setAttribute("width", w);
      node.setAttribute("height", h);
    }
    append(node, children);
    return node;
  }

  function setAttrs(node, attrs) {
    if (!attrs) return;
    for (const [key, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "text") node.textContent = String(value);
      else if (key === "on") for (const [ev, fn] of Object.entries(value)) node.addEventListener(ev, fn);
      else if (key === "class") node.setAttribute("class", value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
  }

  function append(node, children) {
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      node.appendChild(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }

  function replace(node, ...children) {
    while (node.firstChild) node.removeChild(node.firstChild);
    append(node, children);
  }

  const $ = (id) => document.getElementById(id);

  // ------------------------------------------------------------------ formatting

  function pct(x) { return x === null || x === undefined ? "–" : (100 * x).toFixed(1) + "%"; }
  function num(x, digits) { return x === null || x === undefined ? "–" : Number(x).toFixed(digits); }

  function ago(iso) {
    if (!iso) return "–";
    const s = (Date.now() - Date.parse(iso)) / 1000;
    const a = Math.abs(s);
    let text;
    if (a < 60) text = Math.round(a) + " s";
    else if (a < 3600) text = Math.round(a / 60) + " min";
    else if (a < 86400) text = (a / 3600).toFixed(1) + " h";
    else text = (a / 86400).toFixed(1) + " d";
    return s >= 0 ? text + " ago" : "in " + text;
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    if (seconds < 1) return seconds.toFixed(2) + " s";
    if (seconds < 120) return seconds.toFixed(1) + " s";
    if (seconds < 7200) return (seconds / 60).toFixed(1) + " min";
    return (seconds / 3600).toFixed(1) + " h";
  }

  function time(iso) {
    return el("time", { datetime: iso || "", title: iso ? new Date(iso).toLocaleString() : "", text: ago(iso) });
  }

  function badge(text, kind) { return el("span", { class: "badge " + (kind || text), text }); }

  // ------------------------------------------------------------------ API

  class ApiError extends Error {
    constructor(status, code, detail) { super(detail || code); this.status = status; this.code = code; this.detail = detail; }
  }

  async function api(path, options) {
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (!token) { showLogin(""); throw new ApiError(401, "missing_token", "not logged in"); }
    const init = { method: (options && options.method) || "GET", headers: { Authorization: "Bearer " + token } };
    if (options && options.body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(options.body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (err) {
      throw new ApiError(0, "unreachable", "the coordinator cannot be reached");
    }
    let body = null;
    try { body = await response.json(); } catch (err) { body = null; }
    if (response.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      showLogin("The coordinator refused the admin token" + (body && body.error ? " (" + body.error + ")" : "") + ". Log in again.");
      throw new ApiError(401, body && body.error, body && body.detail);
    }
    if (!response.ok) throw new ApiError(response.status, body && body.error, (body && body.detail) || response.statusText);
    return body;
  }

  let toastTimer = null;
  function toast(message, bad) {
    const box = $("toast");
    box.textContent = message;
    box.className = "toast" + (bad ? " bad" : "");
    box.setAttribute("role", bad ? "alert" : "status");
    box.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { box.hidden = true; }, bad ? 9000 : 5000);
  }

  // ------------------------------------------------------------------ login

  function showLogin(message) {
    stopPolling();
    state.view = null;
    $("main").hidden = true;
    $("logout").hidden = true;
    replace($("crumbs"));
    $("live").textContent = "";
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    $("token-input").value = "";
    $("token-input").focus();
  }

  async function login(event) {
    event.preventDefault();
    const token = $("token-input").value.trim();
    if (!token) { $("login-error").textContent = "Enter the admin token."; return; }
    sessionStorage.setItem(TOKEN_KEY, token);
    $("login-submit").disabled = true;
    try {
      await api("/v1/overview");
      $("login").hidden = true;
      route();
    } catch (err) {
      if (err.status !== 401) $("login-error").textContent = "Cannot log in: " + (err.detail || err.code);
    } finally {
      $("login-submit").disabled = false;
    }
  }

  function logout() {
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin("Logged out.");
  }

  // ------------------------------------------------------------------ routing and polling

  function route() {
    if (!sessionStorage.getItem(TOKEN_KEY)) { showLogin(""); return; }
    $("login").hidden = true;
    $("main").hidden = false;
    $("logout").hidden = false;
    const match = /^#\/federations\/(\d+)/.exec(location.hash);
    state.generation += 1;
    state.data = {};
    if (match) {
      const id = Number(match[1]);
      if (!state.view || state.view.id !== id) {
        state.selectedRun = null; state.affinity = null; state.clientFilter = ""; state.roundsLimit = 50;
      }
      state.view = { kind: "federation", id };
      buildFederationPage(id);
    } else {
      state.view = { kind: "list" };
      buildListPage();
    }
    startPolling();
  }

  function startPolling() {
    stopPolling();
    refresh();
    state.timer = setInterval(() => { if (!document.hidden && !$("confirm").open) refresh(); }, POLL_MS);
  }

  function stopPolling() {
    if (state.timer) clearInterval(state.timer);
    state.timer = null;
  }

  async function refresh() {
    if (state.polling || !state.view) return;
    state.polling = true;
    const generation = state.generation;
    try {
      if (state.view.kind === "list") await refreshList(generation);
      else await refreshFederation(state.view.id, generation);
      if (generation === state.generation) $("live").textContent = "updated " + new Date().toLocaleTimeString();
    } catch (err) {
      if (err.status !== 401 && generation === state.generation) {
        $("live").textContent = "update failed: " + (err.detail || err.code);
        if (err.status === 404 && state.view.kind === "federation" && !state.data.status) {
          replace($("main"), el("h1", { text: "Federation not found" }),
            el("p", null, err.detail || "", " ", el("a", { href: "#/", text: "All federations" })));
          stopPolling();
        }
      }
    } finally {
      state.polling = false;
    }
  }

  // ------------------------------------------------------------------ tables

  function table(caption, columns, rows, options) {
    const head = el("tr", null, columns.map((c) => {
      const th = el("th", { scope: "col", class: c.num ? "num" : null });
      if (options && options.sort && c.sortKey) {
        const active = options.sort.key === c.sortKey;
        if (active) th.setAttribute("aria-sort", options.sort.dir > 0 ? "ascending" : "descending");
        th.appendChild(el("button", { type: "button", class: "sort", text: c.title,
          "aria-label": "Sort by " + c.title, on: { click: () => options.onSort(c.sortKey) } }));
      } else {
        th.textContent = c.title;
      }
      return th;
    }));
    const body = el("tbody", null, rows.map((row) => {
      const tr = el("tr", row._attrs || null);
      for (const c of columns) {
        const value = c.render(row);
        tr.appendChild(el("td", { class: c.num ? "num" : null }, value));
      }
      return tr;
    }));
    const t = el("table", options && options.id ? { id: options.id } : null,
      el("caption", { class: "visually-hidden", text: caption }), el("thead", null, head), body);
    if (!rows.length) return el("div", null, t, el("p", { class: "empty", text: (options && options.empty) || "Nothing yet." }));
    return t;
  }

  // ------------------------------------------------------------------ federations list

  function buildListPage() {
    replace($("crumbs"), el("span", { text: "Federations" }));
    replace($("main"),
      el("h1", { text: "Federations" }),
      el("section", { class: "card", "aria-labelledby": "fed-list-title" },
        el("h2", { id: "fed-list-title", class: "visually-hidden", text: "All federations" }),
        el("div", { id: "fed-list" }, el("p", { class: "empty", text: "Loading…" }))));
  }

  async function refreshList(generation) {
    const feds = await api("/v1/overview");
    if (generation !== state.generation) return;
    replace($("fed-list"), table("Federations", [
      { title: "Federation", render: (f) => el("a", { href: "#/federations/" + f.federation_id, text: f.name,
        "data-federation-id": f.federation_id }) },
      { title: "Stage", render: (f) => [badge(f.state), f.paused_at ? [" ", badge("paused")] : null] },
      { title: "Round", num: true, render: (f) => f.current_round === null ? "–" : String(f.current_round) },
      { title: "Progress", render: (f) => f.tasks_total ? [
        el("progress", { max: f.tasks_total, value: f.tasks_done, "aria-label": "tasks done of open rounds" }),
        " " + f.tasks_done + "/" + f.tasks_total] : "–" },
      { title: "Clients online", num: true, render: (f) => f.clients_online + " / " + f.clients_total },
      { title: "K", num: true, render: (f) => f.k === null ? "–" : String(f.k) },
      { title: "Last aggregation", render: (f) => time(f.last_aggregation_at) },
      { title: "Created", render: (f) => time(f.created_at) },
    ], feds, { empty: "No federation yet: create one with `hilora admin create`." }));
  }

  // ------------------------------------------------------------------ federation page

  const SECTIONS = [
    ["sec-timeline", "Stages and rounds"], ["sec-clusters", "Clusters"], ["sec-accuracy", "Accuracy"],
    ["sec-clients", "Clients"], ["sec-workers", "Workers"], ["sec-unseen", "Unseen clients"], ["sec-audit", "Audit log"],
  ];

  function section(id, title, ...body) {
    return el("section", { id, class: "card", "aria-labelledby": id + "-title" },
      el("h2", { id: id + "-title", text: title }), ...body);
  }

  function buildFederationPage(id) {
    replace($("crumbs"), el("a", { href: "#/", text: "Federations" }), " / ", el("span", { id: "crumb-name", text: "#" + id }));
    const search = el("input", { id: "client-search", type: "search", placeholder: "name, cluster, status…",
      "aria-label": "Search clients", value: state.clientFilter,
      on: { input: (e) => { state.clientFilter = e.target.value; renderClients(); } } });
    const runSelect = el("select", { id: "run-select", "aria-label": "Clustering run shown in the heatmap",
      on: { change: (e) => { state.selectedRun = Number(e.target.value); renderClusters(true); } } });
    const fewer = el("button", { type: "button", class: "secondary small", id: "rounds-toggle", text: "Show all rounds",
      on: { click: () => { state.roundsLimit = state.roundsLimit > 50 ? 50 : 5000;
        fewer.textContent = state.roundsLimit > 50 ? "Show the newest 50" : "Show all rounds"; refresh(); } } });
    replace($("main"),
      el("div", { class: "fed-head" },
        el("h1", { id: "fed-name", text: "Federation " + id }),
        el("span", { id: "fed-badges" }),
        el("div", { class: "actions", role: "group", "aria-label": "Federation actions" },
          el("button", { type: "button", id: "btn-pause", class: "secondary", text: "Pause", on: { click: pauseOrResume } }),
          el("button", { type: "button", id: "btn-deadline", class: "secondary", text: "Extend deadline…", on: { click: extendDeadline } }),
          el("button", { type: "button", id: "btn-recluster", text: "Recluster…", on: { click: recluster } }))),
      el("div", { id: "fed-notice", role: "status" }),
      el("div", { class: "stats", id: "fed-stats", "aria-label": "Federation summary" }),
      el("nav", { class: "jump", "aria-label": "Sections" }, SECTIONS.map(([sid, title]) =>
        el("button", { type: "button", text: title, on: { click: () => $(sid).scrollIntoView({ behavior: "smooth" }) } }))),
      section("sec-timeline", "Stages and rounds",
        el("div", { id: "timeline-chart" }),
        el("div", { class: "toolbar" }, el("h3", { text: "Rounds (newest first)" }), fewer),
        el("div", { class: "scroll", id: "rounds-table" })),
      section("sec-clusters", "Clusters",
        el("div", { id: "clusters-table" }),
        el("div", { class: "grid2" },
          el("div", null, el("div", { class: "toolbar" }, el("h3", { text: "Affinity (ordered by cluster)" }), runSelect),
            el("div", { id: "affinity-chart" })),
          el("div", null, el("h3", { text: "Eigengaps of the normalised Laplacian" }), el("div", { id: "eigengap-chart" }),
            el("h3", { text: "Clustering runs" }), el("div", { id: "runs-table" }))),
        el("h3", { text: "Assignment moves between consecutive runs" }), el("div", { id: "moves" })),
      section("sec-accuracy", "Accuracy",
        el("div", { class: "grid2" },
          el("div", null, el("h3", { text: "Per tier and round: mean (solid) and p10 (dashed)" }), el("div", { id: "accuracy-chart" })),
          el("div", null, el("h3", { text: "Per client, latest value" }), el("div", { id: "distribution-chart" })))),
      section("sec-clients", "Clients",
        el("div", { class: "toolbar" }, el("label", { for: "client-search", text: "Search" }), search,
          el("span", { id: "client-count", class: "muted" })),
        el("div", { class: "scroll", id: "clients-table" })),
      section("sec-workers", "Workers",
        el("div", { id: "workers-table" }),
        el("h3", { text: "Live leases" }), el("div", { id: "leases-table" }),
        el("h3", { text: "Recent failed or cancelled tasks" }), el("div", { id: "failures-table" })),
      section("sec-unseen", "Unseen clients", el("div", { id: "unseen-table" })),
      section("sec-audit", "Audit log", el("div", { id: "audit-table" })));
  }

  async function refreshFederation(id, generation) {
    const base = "/v1/federations/" + id;
    const [status, timeline, clusters, runs, moves, accuracy, clients, workers, unseen, audit] = await Promise.all([
      api(base), api(base + "/timeline?limit=" + state.roundsLimit), api(base + "/clusters"),
      api(base + "/clustering-runs"), api(base + "/assignment-moves"), api(base + "/accuracy"), api(base + "/clients"),
      api(base + "/workers"), api(base + "/unseen-clients"), api(base + "/audit?limit=20"),
    ]);
    if (generation !== state.generation) return;
    const overview = (await api("/v1/overview")).find((f) => f.federation_id === id);
    if (generation !== state.generation) return;
    Object.assign(state.data, { status, overview, timeline, clusters, runs, moves, accuracy, clients, workers, unseen, audit });
    renderHeader();
    renderTimeline();
    await renderClustersWithAffinity(generation);
    renderAccuracy();
    renderClients();
    renderWorkers();
    renderUnseen();
    renderAudit();
  }

  function stat(label, value, id) {
    return el("div", { class: "stat", id }, el("div", { class: "label", text: label }), el("div", { class: "value" }, value));
  }

  function renderHeader() {
    const { status, overview } = state.data;
    $("fed-name").textContent = status.name;
    $("crumb-name").textContent = status.name;
    document.title = status.name + " · hilora dashboard";
    replace($("fed-badges"), badge(status.state), status.paused_at ? [" ", badge("paused")] : null);
    const notes = [];
    if (status.paused_at) notes.push(el("p", { class: "notice danger", id: "paused-reason",
      text: "Paused: " + (status.paused_reason || "no reason given") }));
    if (status.failure_count > 0 || (status.last_failure && !status.paused_at)) {
      notes.push(el("p", { class: "notice", id: "last-failure", text: (status.failure_count > 0
        ? "The scheduler failed to advance this federation " + status.failure_count + " time(s) in a row; the last: "
        : "Last scheduler failure (recovered since): ") + status.last_failure }));
    }
    replace($("fed-notice"), notes);
    const pause = $("btn-pause");
    pause.textContent = status.paused_at ? "Resume" : "Pause";
    const open = openRounds();
    $("btn-deadline").disabled = open.length === 0;
    $("btn-recluster").disabled = !state.data.runs.length;
    const o = overview || {};
    replace($("fed-stats"),
      stat("Stage", status.state + (status.cycle ? ` · cycle ${status.cycle}` : "") +
        (status.cycle_requested_at ? " · next cycle requested" : "") + (status.paused_at ? " (paused)" : "")),
      stat("Current round", o.current_round === null || o.current_round === undefined ? "–" : String(o.current_round)),
      stat("Open-round progress", o.tasks_total ? [el("progress", { max: o.tasks_total, value: o.tasks_done,
        "aria-label": "tasks done of open rounds" }), " " + o.tasks_done + "/" + o.tasks_total] : "–"),
      stat("Clients online", (o.clients_online ?? "–") + " / " + status.clients_total, "stat-online"),
      stat("Clusters K", (status.clustering ? String(status.clustering.k) : "–") +
        (status.unassigned ? ` (${status.unassigned} unassigned)` : ""), "stat-k"),
      stat("Last aggregation", time(o.last_aggregation_at)),
      stat("Uploaded", (status.uploaded_bytes / 1e6).toFixed(2) + " MB"));
  }

  function openRounds() {
    return (state.data.timeline ? state.data.timeline.rounds : []).filter((r) => r.status === "open");
  }

  // ------------------------------------------------------------------ stage timeline and rounds

  function renderTimeline() {
    const { timeline } = state.data;
    const stages = timeline.stages;
    const now = Date.now();
    const spans = stages.map((s) => Math.max(0, ((s.ended_at ? Date.parse(s.ended_at) : now) - Date.parse(s.started_at)) / 1000));
    const total = spans.reduce((a, b) => a + b, 0) || 1;
    const W = 1240, H = 62, minShare = 0.08;
    const shares = spans.map((d) => Math.max(minShare, d / total));
    const scale = W / shares.reduce((a, b) => a + b, 0);
    let x = 0;
    const colours = { enrolling: "#c7ced8", root: "#1f77b4", probe: "#8c6bb1", cluster: "#d9630b", leaf: "#2a9d3f", serving: "#3c8d93" };
    const chart = svg("svg", { class: "chart wide", viewBox: `0 0 ${W} ${H}`, role: "img", "data-chart": "timeline",
      "aria-label": "Stage timeline: " + stages.map((s, i) => s.stage + " " + duration(spans[i])).join(", ") });
    stages.forEach((s, i) => {
      const w = shares[i] * scale;
      const current = !s.ended_at;
      chart.appendChild(svg("rect", { class: "stage" + (current ? " current" : ""), x, y: 4, width: w, height: 34, rx: 4,
        fill: colours[s.stage] || "#999", "data-stage": s.stage },
        svg("title", { text: `${s.stage}: ${duration(spans[i])}, ${s.rounds_done} rounds done, ${s.rounds_failed} failed` })));
      const rounds = s.rounds_done || s.rounds_failed ? ` (${s.rounds_done}${s.rounds_failed ? "+" + s.rounds_failed + "✗" : ""})` : "";
      const label = (s.stage + rounds).length * 7 + 10 < w ? s.stage + rounds : s.stage;
      chart.appendChild(svg("text", { x: x + 6, y: 25, class: "stage-label", fill: "#fff", text: label }));
      if (duration(spans[i]).length * 6.5 + 6 < w) chart.appendChild(svg("text", { x: x + 4, y: 54, text: duration(spans[i]) }));
      x += w;
    });
    replace($("timeline-chart"), chart);
    replace($("rounds-table"), table("Rounds", [
      { title: "Round", num: true, render: (r) => String(r.id) },
      { title: "Stage", render: (r) => r.stage },
      { title: "Scope", render: (r) => r.scope },
      { title: "No.", num: true, render: (r) => String(r.number) },
      { title: "Status", render: (r) => badge(r.status) },
      { title: "Tasks done", num: true, render: (r) => r.tasks_done + "/" + r.tasks_total +
        (r.tasks_failed ? ` (${r.tasks_failed} failed)` : "") + (r.tasks_cancelled ? ` (${r.tasks_cancelled} cancelled)` : "") },
      { title: "Quorum", num: true, render: (r) => r.quorum === null ? "–" : String(r.quorum) },
      { title: "Deadline", render: (r) => r.deadline_at ? time(r.deadline_at) : "–" },
      { title: "Duration", num: true, render: (r) => r.status === "open" ? "open " + ago(r.created_at).replace(" ago", "") : duration(r.duration_seconds) },
      { title: "Failure", render: (r) => r.failure || "" },
    ], timeline.rounds.map((r) => Object.assign({ _attrs: { "data-round-id": r.id } }, r)),
    { empty: "No round yet: training starts at min_clients or on `hilora admin start`." }));
  }

  // ------------------------------------------------------------------ clusters

  async function renderClustersWithAffinity(generation) {
    const { runs } = state.data;
    const runId = state.selectedRun && runs.some((r) => r.id === state.selectedRun) ? state.selectedRun : (runs[0] ? runs[0].id : null);
    const run = runs.find((r) => r.id === runId);
    if (run && run.has_affinity && (!state.affinity || state.affinity.runId !== runId)) {
      try {
        const data = await api(`/v1/federations/${state.view.id}/clustering-runs/${runId}/affinity`);
        if (generation !== state.generation) return;
        state.affinity = { runId, data };
      } catch (err) {
        if (err.status === 401) throw err;
        state.affinity = { runId, data: null, error: err.detail || err.code };
      }
    }
    renderClusters(false);
  }

  function renderClusters(fetchIfNeeded) {
    const { clusters, runs, moves } = state.data;
    if (!runs) return;
    const runId = state.selectedRun && runs.some((r) => r.id === state.selectedRun) ? state.selectedRun : (runs[0] ? runs[0].id : null);
    if (fetchIfNeeded && runId && (!state.affinity || state.affinity.runId !== runId)) {
      renderClustersWithAffinity(state.generation);
      return;
    }
    replace($("clusters-table"), table("Clusters", [
      { title: "Label", num: true, render: (c) => String(c.label) },
      { title: "Size", num: true, render: (c) => String(c.size) },
      { title: "Members", render: (c) => c.members.join(", ") },
      { title: "Age", render: (c) => duration(c.age_seconds) },
      { title: "Made by run", num: true, render: (c) => "#" + c.created_run_id },
      { title: "Adapter version", num: true, render: (c) => c.adapter_version === null ? "–"
        : c.pinned_version !== null && c.pinned_version !== undefined
          ? [String(c.adapter_version), el("span", { class: "muted", text: ` · serves v${c.pinned_version} (pinned)`,
            title: "an admin pinned this version: clients get it instead of the newest" })]
          : String(c.adapter_version) },
    ], clusters.map((c) => Object.assign({ _attrs: { "data-cluster-label": c.label } }, c)),
    { empty: "No cluster yet: LSAC runs when the probe round of all clients is done." }));

    const select = $("run-select");
    const wanted = runs.map((r) => `${r.id}:${r.k}`).join(",");
    if (select.dataset.runs !== wanted) {
      replace(select, runs.map((r) => el("option", { value: r.id, text: `run #${r.id} · K=${r.k} · ${r.trigger}` })));
      select.dataset.runs = wanted;
    }
    if (runId) select.value = String(runId);
    select.disabled = !runs.length;

    const run = runs.find((r) => r.id === runId);
    if (!run) {
      replace($("affinity-chart"), el("p", { class: "empty", text: "No clustering run yet." }));
      replace($("eigengap-chart"), el("p", { class: "empty", text: "No clustering run yet." }));
    } else {
      const aff = state.affinity && state.affinity.runId === runId ? state.affinity : null;
      replace($("affinity-chart"), aff && aff.data ? heatmap(aff.data) :
        el("p", { class: "empty", text: aff && aff.error ? "Affinity unavailable: " + aff.error : "Loading…" }));
      replace($("eigengap-chart"), eigengapChart(run));
    }
    replace($("runs-table"), table("Clustering runs", [
      { title: "Run", num: true, render: (r) => "#" + r.id },
      { title: "When", render: (r) => time(r.created_at) },
      { title: "By", render: (r) => r.trigger },
      { title: "K", num: true, render: (r) => String(r.k) },
      { title: "Features", render: (r) => r.features },
      { title: "Clients", num: true, render: (r) => String(r.num_clients) },
      { title: "Contrast", num: true, render: (r) => num(r.contrast_ratio, 3) },
    ], runs.map((r) => Object.assign({ _attrs: { "data-run-id": r.id } }, r)), { id: "runs", empty: "No run yet." }));
    replace($("moves"), moves.length ? moves.map((t) => el("div", { "data-transition": t.to_run_id },
      el("p", null, el("strong", { text: `run #${t.from_run_id} → #${t.to_run_id}` }),
        ` (${ago(t.created_at)}): ${t.moves.length} moved, ${t.unchanged} kept their cluster`),
      t.moves.length ? table(`Moves from run ${t.from_run_id} to run ${t.to_run_id}`, [
        { title: "Client", render: (m) => m.name },
        { title: "From cluster", num: true, render: (m) => m.from_label === null ? "none" : String(m.from_label) },
        { title: "To cluster", num: true, render: (m) => m.to_label === null ? "none" : String(m.to_label) },
      ], t.moves) : null)) : el("p", { class: "empty", text: "One clustering run so far: no moves." }));
  }

  function colour(v) {
    // white -> deep blue
    const t = Math.max(0, Math.min(1, v));
    const a = [247, 251, 255], b = [8, 48, 107];
    const c = a.map((x, i) => Math.round(x + (b[i] - x) * t));
    return `rgb(${c[0]},${c[1]},${c[2]})`;
  }

  function heatmap(data) {
    const n = data.client_ids.length;
    const showNames = n <= 40;
    const longest = Math.max(0, ...data.names.map((name) => name.length));
    const pad = showNames ? Math.min(150, Math.max(40, longest * 6.2 + 10)) : 8;
    const size = Math.max(260, Math.min(520, n * 34));
    const cell = size / Math.max(n, 1);
    let max = 0;
    data.matrix.forEach((row, i) => row.forEach((v, j) => { if (i !== j && v > max) max = v; }));
    max = max || 1;
    const W = pad + size + 8, H = pad + size + 28;
    const chart = svg("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img", "data-chart": "affinity",
      "data-n": n, "data-run-id": data.run_id,
      "aria-label": `Affinity matrix of clustering run ${data.run_id}: ${n} clients ordered by cluster; darker is more similar` });
    const cells = svg("g", { class: "cells" });
    const titled = n <= 60;
    for (let i = 0; i < n; i++) {
      for (let j = 0; j < n; j++) {
        const v = data.matrix[i][j];
        const rect = svg("rect", { class: "cell", x: (pad + j * cell).toFixed(2), y: (pad + i * cell).toFixed(2),
          width: cell.toFixed(2), height: cell.toFixed(2), fill: colour(v / max), "data-i": i, "data-j": j, "data-value": v });
        if (titled) rect.appendChild(svg("title", { text: `${data.names[i]} · ${data.names[j]}: ${v.toFixed(3)}` }));
        cells.appendChild(rect);
      }
    }
    chart.appendChild(cells);
    // cluster blocks
    let start = 0;
    for (let i = 1; i <= n; i++) {
      if (i === n || data.labels[i] !== data.labels[start]) {
        chart.appendChild(svg("rect", { class: "block", x: pad + start * cell, y: pad + start * cell,
          width: (i - start) * cell, height: (i - start) * cell, "data-label": data.labels[start] === null ? "none" : data.labels[start] }));
        chart.appendChild(svg("text", { x: pad + start * cell + 2, y: pad + size + 14,
          text: "c" + (data.labels[start] === null ? "–" : data.labels[start]) }));
        start = i;
      }
    }
    if (showNames) {
      const fs = Math.max(7, Math.min(11, cell * 0.7));
      data.names.forEach((name, i) => {
        chart.appendChild(svg("text", { x: pad - 4, y: pad + (i + 0.5) * cell + fs / 3, "text-anchor": "end", "font-size": fs, text: name }));
        chart.appendChild(svg("text", { x: 0, y: 0, "font-size": fs, "text-anchor": "start", text: name,
          transform: `translate(${pad + (i + 0.5) * cell + fs / 3},${pad - 4}) rotate(-90)` }));
      });
    }
    chart.appendChild(svg("text", { x: pad + size, y: pad + size + 26, "text-anchor": "end", class: "muted",
      text: `max off-diagonal ${max.toFixed(3)}` }));
    return chart;
  }

  function eigengapChart(run) {
    const gaps = run.eigengaps || [];
    const W = 420, H = 190, L = 44, B = 30, T = 10, R = 8;
    const chart = svg("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img", "data-chart": "eigengaps",
      "aria-label": `Eigengaps of run ${run.id}: ` + gaps.map((g, i) => `k=${i + 1}: ${g.toFixed(3)}`).join(", ") + `; chosen K=${run.k}` });
    if (!gaps.length) { chart.appendChild(svg("text", { x: 10, y: 20, text: "no eigengaps (fewer than 2 clients)" })); return chart; }
    const max = Math.max(...gaps, 1e-9);
    const bw = (W - L - R) / gaps.length;
    axes(chart, L, T, W - R, H - B, 0, max, (v) => v.toFixed(2));
    gaps.forEach((g, i) => {
      const h = (H - B - T) * (g / max);
      chart.appendChild(svg("rect", { class: "bar" + (i + 1 === run.k ? " chosen" : ""), x: L + i * bw + bw * 0.15,
        y: H - B - h, width: bw * 0.7, height: Math.max(0, h), "data-k": i + 1 },
      svg("title", { text: `λ${i + 2} − λ${i + 1} = ${g.toFixed(4)}` + (i + 1 === run.k ? " (chosen K)" : "") })));
      chart.appendChild(svg("text", { x: L + (i + 0.5) * bw, y: H - B + 14, "text-anchor": "middle", text: String(i + 1) }));
    });
    chart.appendChild(svg("text", { x: (L + W) / 2, y: H - 3, "text-anchor": "middle", text: "k (bar k: λ(k+1) − λ(k)); dark: chosen K" }));
    return chart;
  }

  function axes(chart, x0, y0, x1, y1, lo, hi, fmt) {
    const g = svg("g", { class: "axis" });
    for (let i = 0; i <= 4; i++) {
      const v = lo + (hi - lo) * i / 4;
      const y = y1 - (y1 - y0) * i / 4;
      g.appendChild(svg("line", { class: "grid", x1: x0, x2: x1, y1: y, y2: y }));
      g.appendChild(svg("text", { x: x0 - 4, y: y + 3, "text-anchor": "end", text: fmt(v) }));
    }
    g.appendChild(svg("line", { x1: x0, x2: x0, y1: y0, y2: y1 }));
    g.appendChild(svg("line", { x1: x0, x2: x1, y1: y1, y2: y1 }));
    chart.appendChild(g);
  }

  // ------------------------------------------------------------------ accuracy

  function renderAccuracy() {
    const { accuracy } = state.data;
    replace($("accuracy-chart"), accuracyChart(accuracy.steps));
    replace($("distribution-chart"), distributionChart(accuracy.clients));
  }

  function accuracyChart(steps) {
    const W = 560, H = 250, L = 44, R = 10, T = 10, B = 46;
    const summary = TIERS.map((t) => {
      const last = [...steps].reverse().find((s) => s.tiers[t]);
      return last ? `${t} ${pct(last.tiers[t].mean)} mean, ${pct(last.tiers[t].p10)} p10` : null;
    }).filter(Boolean).join("; ");
    const chart = svg("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img", "data-chart": "accuracy",
      "aria-label": steps.length ? `Accuracy per tier over ${steps.length} rounds; newest: ${summary}` : "No accuracy reported yet" });
    if (!steps.length) { chart.appendChild(svg("text", { x: 10, y: 24, text: "No accuracy reported yet." })); return el("div", null, chart); }
    let lo = 1, hi = 0;
    steps.forEach((s) => TIERS.forEach((t) => { const v = s.tiers[t]; if (v) { lo = Math.min(lo, v.p10 ?? v.mean, v.mean); hi = Math.max(hi, v.mean); } }));
    lo = Math.max(0, Math.floor((lo - 0.05) * 10) / 10);
    hi = Math.min(1, Math.ceil((hi + 0.02) * 10) / 10);
    if (hi <= lo) { lo = 0; hi = 1; }
    axes(chart, L, T, W - R, H - B, lo, hi, (v) => (100 * v).toFixed(0) + "%");
    const xs = (i) => L + (steps.length === 1 ? (W - L - R) / 2 : (W - L - R) * i / (steps.length - 1));
    const ys = (v) => (H - B) - (H - B - T) * (v - lo) / (hi - lo);
    const every = Math.ceil(steps.length / 12);
    steps.forEach((s, i) => {
      if (i % every === 0 || i === steps.length - 1) {
        chart.appendChild(svg("text", { x: 0, y: 0, "text-anchor": "end", text: s.label,
          transform: `translate(${xs(i) + 3},${H - B + 10}) rotate(-35)` }));
      }
    });
    for (const t of TIERS) {
      for (const key of ["mean", "p10"]) {
        const pts = steps.map((s, i) => s.tiers[t] && s.tiers[t][key] !== null ? [xs(i), ys(s.tiers[t][key]), s] : null);
        let d = "";
        let pen = false;
        pts.forEach((p) => { if (!p) { pen = false; return; } d += (pen ? "L" : "M") + p[0].toFixed(1) + "," + p[1].toFixed(1); pen = true; });
        if (!d) continue;
        chart.appendChild(svg("path", { class: `line tier-${t} ${key}`, d, "data-tier": t, "data-stat": key }));
        if (key === "mean") {
          pts.forEach((p) => { if (p) chart.appendChild(svg("circle", { class: `tier-${t}`, cx: p[0], cy: p[1], r: 2.6 },
            svg("title", { text: `${p[2].label}: ${t} mean ${pct(p[2].tiers[t].mean)}, p10 ${pct(p[2].tiers[t].p10)}, ${p[2].tiers[t].n} clients` }))); });
        }
      }
    }
    const legend = el("div", { class: "legend" },
      TIERS.map((t) => el("span", null, el("span", { class: "swatch " + t }), t === "root" ? "root" : t === "cluster" ? "+ cluster" : "+ leaf")),
      el("span", null, el("span", { class: "swatch dashed" }), "p10 (worst 10% of clients)"));
    return el("div", null, chart, legend);
  }

  function distributionChart(clients) {
    const W = 560, H = 170, L = 64, R = 14, T = 10, B = 28;
    const rows = TIERS.map((t) => clients.filter((c) => c["acc_" + t] !== null).map((c) => [c, c["acc_" + t]]));
    const chart = svg("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img", "data-chart": "distribution",
      "aria-label": "Latest accuracy of each client per tier: " + TIERS.map((t, i) => `${t} ${rows[i].length} clients`).join(", ") + "; hollow dots are unseen clients" });
    const xs = (v) => L + (W - L - R) * v;
    const g = svg("g", { class: "axis" });
    for (let i = 0; i <= 10; i += 2) {
      g.appendChild(svg("line", { class: "grid", x1: xs(i / 10), x2: xs(i / 10), y1: T, y2: H - B }));
      g.appendChild(svg("text", { x: xs(i / 10), y: H - B + 14, "text-anchor": "middle", text: i * 10 + "%" }));
    }
    chart.appendChild(g);
    const rowH = (H - B - T) / TIERS.length;
    TIERS.forEach((t, r) => {
      const cy = T + rowH * (r + 0.5);
      chart.appendChild(svg("text", { x: L - 8, y: cy + 4, "text-anchor": "end", text: t === "root" ? "root" : "+" + t }));
      rows[r].forEach(([c, v], k) => {
        const jitter = ((k * 7919) % 11 - 5) * rowH * 0.05;
        chart.appendChild(svg("circle", { class: `tier-${t}` + (c.cohort === "late" ? " late" : ""), cx: xs(v), cy: cy + jitter, r: 3.4,
          "fill-opacity": c.cohort === "late" ? 1 : 0.55, "data-client": c.name },
        svg("title", { text: `${c.name} (${c.cohort}, cluster ${c.cluster_label ?? "–"}): ${pct(v)}` })));
      });
      if (rows[r].length) {
        const mean = rows[r].reduce((a, x) => a + x[1], 0) / rows[r].length;
        chart.appendChild(svg("line", { x1: xs(mean), x2: xs(mean), y1: cy - rowH * 0.38, y2: cy + rowH * 0.38,
          class: `tier-${t}`, "stroke-width": 2.5 }, svg("title", { text: `${t} mean ${pct(mean)}` })));
      }
    });
    return el("div", null, chart, el("div", { class: "legend" }, el("span", { text: "dot: one client (hollow: unseen); bar: mean" })));
  }

  // ------------------------------------------------------------------ clients

  const CLIENT_COLUMNS = [
    { title: "Client", sortKey: "name", render: (c) => [el("span", { class: "dot" + (c.online ? " on" : ""), role: "img",
      title: c.online ? "online" : "offline", "aria-label": c.online ? "online" : "offline" }), c.name] },
    { title: "Status", sortKey: "status", render: (c) => c.inactive_since
      ? [badge(c.status), el("span", { class: "muted", text: ` · inactive (${c.missed_rounds} missed)`,
        title: "no task opens for it until it asks for work again; inactive since " + c.inactive_since })]
      : badge(c.status) },
    { title: "Cohort", sortKey: "cohort", render: (c) => c.cohort + (c.cohort === "late" ? " · " + c.onboarding : "") },
    { title: "Cluster", sortKey: "cluster_label", num: true, render: (c) => c.cluster_label !== null ? String(c.cluster_label)
      : c.unassigned ? el("span", { class: "muted", text: "unassigned", title: "fits no cluster: served root + its own leaf" })
      : "–" },
    { title: "Samples", sortKey: "num_samples", num: true, render: (c) => String(c.num_samples) },
    { title: "Tasks done", sortKey: "tasks_done", num: true, render: (c) => String(c.tasks_done) },
    { title: "Last seen", sortKey: "last_seen_at", render: (c) => time(c.last_seen_at) },
    { title: "Root", sortKey: "acc_root", num: true, render: (c) => pct(c.acc_root) },
    { title: "+Cluster", sortKey: "acc_cluster", num: true, render: (c) => pct(c.acc_cluster) },
    { title: "+Leaf", sortKey: "acc_leaf", num: true, render: (c) => pct(c.acc_leaf) },
    { title: "Action", render: (c) => c.status === "active" ? el("button", { type: "button", class: "secondary small",
      text: "Revoke", "aria-label": "Revoke client " + c.name, on: { click: () => revoke(c) } }) : "" },
  ];

  function renderClients() {
    const clients = state.data.clients;
    if (!clients) return;
    const q = state.clientFilter.trim().toLowerCase();
    const shown = clients.filter((c) => !q || [c.name, c.status, c.cohort, c.onboarding, c.cluster_label === null ? "" : "cluster " + c.cluster_label]
      .some((v) => String(v).toLowerCase().includes(q)));
    const { key, dir } = state.clientSort;
    shown.sort((a, b) => {
      const x = a[key], y = b[key];
      if (x === y) return a.client_id - b.client_id;
      if (x === null || x === undefined) return 1;
      if (y === null || y === undefined) return -1;
      return (x < y ? -1 : 1) * dir;
    });
    $("client-count").textContent = `${shown.length} of ${clients.length}`;
    replace($("clients-table"), table("Clients", CLIENT_COLUMNS,
      shown.map((c) => Object.assign({ _attrs: { "data-client-id": c.client_id } }, c)),
      { id: "clients", sort: state.clientSort, empty: q ? "No client matches." : "No client registered yet.",
        onSort: (k) => { state.clientSort = { key: k, dir: state.clientSort.key === k ? -state.clientSort.dir : 1 }; renderClients(); } }));
  }

  // ------------------------------------------------------------------ workers, unseen, audit

  // "compute 1.20 · upload 0.05": the phases a worker's tasks reported (time_<phase> metrics)
  function phaseTimes(seconds) {
    const phases = ["data", "fetch", "compute", "eval", "upload"].filter((p) => seconds && p in seconds);
    if (!phases.length) return "–";
    return phases.map((p) => `${p} ${seconds[p] < 10 ? seconds[p].toFixed(2) : seconds[p].toFixed(0)}`).join(" · ");
  }

  function renderWorkers() {
    const { workers } = state.data;
    replace($("workers-table"), table("Workers", [
      { title: "Worker", render: (w) => w.worker_id },
      { title: "Live leases", num: true, render: (w) => String(w.live_leases) },
      { title: "Tasks done", num: true, render: (w) => String(w.tasks_done) },
      { title: "Tasks failed", num: true, render: (w) => String(w.tasks_failed) },
      { title: "Last finished", render: (w) => time(w.last_finished_at) },
      { title: "Median task time (s)", render: (w) => phaseTimes(w.task_seconds) },
    ], workers.workers, { empty: "No worker has leased a task yet." }));
    replace($("leases-table"), table("Live leases", [
      { title: "Worker", render: (l) => l.worker_id || "–" },
      { title: "Task", num: true, render: (l) => String(l.task_id) },
      { title: "Client", render: (l) => l.client_name },
      { title: "Round", render: (l) => `${l.stage} ${l.round_number} (${l.scope})` },
      { title: "Attempt", num: true, render: (l) => String(l.attempt) },
      { title: "Lease expires", render: (l) => time(l.lease_expires_at) },
    ], workers.leases, { empty: "No live lease." }));
    replace($("failures-table"), table("Recent failed or cancelled tasks", [
      { title: "When", render: (f) => time(f.finished_at) },
      { title: "Task", num: true, render: (f) => String(f.task_id) },
      { title: "Client", render: (f) => f.client_name },
      { title: "Worker", render: (f) => f.worker_id || "–" },
      { title: "Round", render: (f) => `${f.stage} ${f.round_number}` },
      { title: "Status", render: (f) => badge(f.status) },
      { title: "Attempt", num: true, render: (f) => String(f.attempt) },
      { title: "Why", render: (f) => f.error || "" },
    ], workers.failures, { empty: "No failure." }));
  }

  function renderUnseen() {
    replace($("unseen-table"), table("Unseen clients", [
      { title: "Client", render: (u) => u.name },
      { title: "Onboarding", render: (u) => badge(u.onboarding) },
      { title: "Cluster", num: true, render: (u) => u.cluster_label === null ? "–" : String(u.cluster_label) },
      { title: "Probe similarity", num: true, render: (u) => num(u.similarity, 3) },
      { title: "Zero-shot (root+cluster)", num: true, render: (u) => pct(u.zero_shot) },
      { title: "After leaf", num: true, render: (u) => pct(u.after_leaf) },
      { title: "Leaf rounds", num: true, render: (u) => String(u.leaf_rounds_done) },
      { title: "Registered", render: (u) => time(u.created_at) },
    ], state.data.unseen, { empty: "No client has registered since training ended." }));
  }

  function renderAudit() {
    replace($("audit-table"), table("Audit log", [
      { title: "When", render: (a) => time(a.at) },
      { title: "Action", render: (a) => a.action },
      { title: "Target", render: (a) => a.target || "" },
      { title: "Detail", render: (a) => el("code", { text: JSON.stringify(a.detail) }) },
    ], state.data.audit, { empty: "No admin action yet." }));
  }

  // ------------------------------------------------------------------ actions (each behind a confirm dialog)

  function confirmDialog({ title, text, fields, ok, danger }) {
    const dialog = $("confirm");
    $("confirm-title").textContent = title;
    $("confirm-text").textContent = text;
    const inputs = {};
    replace($("confirm-fields"), (fields || []).map((f) => {
      const id = "field-" + f.name;
      let input;
      if (f.options) {
        input = el("select", { id, name: f.name }, f.options.map(([value, label]) => el("option", { value, text: label })));
      } else {
        input = el("input", { id, name: f.name, type: f.type || "text", min: f.min, step: f.step, placeholder: f.placeholder || "" });
      }
      if (f.value !== undefined) input.value = String(f.value);
      inputs[f.name] = input;
      return [el("label", { for: id, text: f.label }), input];
    }));
    const okButton = $("confirm-ok");
    okButton.textContent = ok || "Confirm";
    okButton.className = danger ? "danger" : "";
    return new Promise((resolve) => {
      const done = (value) => {
        $("confirm-form").removeEventListener("submit", onSubmit);
        $("confirm-cancel").removeEventListener("click", onCancel);
        dialog.removeEventListener("cancel", onCancel);
        if (dialog.open) dialog.close();
        resolve(value);
      };
      const onSubmit = (e) => {
        e.preventDefault();
        const values = {};
        for (const [name, input] of Object.entries(inputs)) values[name] = input.value.trim();
        done(values);
      };
      const onCancel = (e) => { e.preventDefault(); done(null); };
      $("confirm-form").addEventListener("submit", onSubmit);
      $("confirm-cancel").addEventListener("click", onCancel);
      dialog.addEventListener("cancel", onCancel);
      dialog.showModal();
      (Object.values(inputs)[0] || okButton).focus();
    });
  }

  async function act(description, fn) {
    try {
      const result = await fn();
      toast(description(result));
    } catch (err) {
      if (err.status !== 401) toast(`Refused: ${err.code || err.status}: ${err.detail || ""}`, true);
    }
    await refresh();
  }

  async function recluster() {
    const id = state.view.id;
    const values = await confirmDialog({
      title: "Recluster this federation?",
      text: "LSAC runs again on the newest probe round of all clients. Matched clusters keep their adapters; " +
        "unmatched ones start at version 0. Open cluster, leaf and evaluation tasks of clients that move are cancelled.",
      fields: [
        { name: "force_k", label: "Force K (optional)", type: "number", min: 1, step: 1, placeholder: "eigengap rule" },
        { name: "features", label: "Features", options: [["", "federation setting"], ["update", "update"], ["subspace", "subspace"]] },
        { name: "knn", label: "k nearest neighbours (optional)", type: "number", min: 1, step: 1, placeholder: "federation setting" },
        { name: "reason", label: "Reason (audit log)", placeholder: "why" },
      ],
      ok: "Recluster",
    });
    if (!values) return;
    const body = { reason: values.reason };
    if (values.force_k) body.force_k = Number(values.force_k);
    if (values.knn) body.knn = Number(values.knn);
    if (values.features) body.features = values.features;
    await act((r) => {
      state.selectedRun = r.run.id;
      return `Run #${r.run.id}: K=${r.run.k}; kept clusters [${r.clusters_kept}], created [${r.clusters_created}], ` +
        `${r.moves.length} clients moved, ${r.tasks_cancelled} tasks cancelled.`;
    }, () => api(`/v1/federations/${id}/recluster`, { method: "POST", body }));
  }

  async function pauseOrResume() {
    const id = state.view.id;
    const paused = state.data.status && state.data.status.paused_at;
    if (paused) {
      const values = await confirmDialog({ title: "Resume this federation?", text: "Rounds open and close again and leases are handed out; " +
        "the deadlines of open rounds move back by the paused time.", ok: "Resume" });
      if (!values) return;
      await act(() => "Resumed.", () => api(`/v1/federations/${id}/resume`, { method: "POST" }));
    } else {
      const values = await confirmDialog({ title: "Pause this federation?", text: "No round opens or closes and no new lease is " +
        "handed out until you resume. Live leases may still finish.", fields: [{ name: "reason", label: "Reason (audit log)" }], ok: "Pause", danger: true });
      if (!values) return;
      await act(() => "Paused.", () => api(`/v1/federations/${id}/pause`, { method: "POST", body: { reason: values.reason } }));
    }
  }

  async function extendDeadline() {
    const open = openRounds();
    if (!open.length) { toast("No open round.", true); return; }
    const values = await confirmDialog({
      title: "Extend the deadline of an open round?",
      text: "The round is decided at its deadline: aggregated with its quorum, otherwise failed and reopened.",
      fields: [
        { name: "round", label: "Round", options: open.map((r) => [String(r.id), `#${r.id} ${r.stage} ${r.number} (${r.scope})` +
          (r.deadline_at ? `, due ${ago(r.deadline_at)}` : ", no deadline")]) },
        { name: "minutes", label: "Extend by (minutes)", type: "number", min: 1, step: 1, value: 10 },
      ],
      ok: "Extend",
    });
    if (!values) return;
    const minutes = Number(values.minutes);
    if (!(minutes > 0)) { toast("Give a positive number of minutes.", true); return; }
    await act((r) => `Round #${r.id} is now due ${ago(r.deadline_at)}.`,
      () => api(`/v1/rounds/${values.round}/deadline`, { method: "POST", body: { extend_seconds: minutes * 60 } }));
  }

  async function revoke(client) {
    const id = state.view.id;
    const values = await confirmDialog({
      title: `Revoke client ${client.name}?`,
      text: "Its token is refused from now on and its open tasks are cancelled. What it contributed stays. This cannot be undone.",
      fields: [{ name: "reason", label: "Reason (audit log)" }], ok: "Revoke", danger: true,
    });
    if (!values) return;
    await act((r) => `Revoked ${r.name}; ${r.tasks_cancelled} open tasks cancelled.`,
      () => api(`/v1/federations/${id}/clients/${client.client_id}/revoke`, { method: "POST", body: { reason: values.reason } }));
  }

  // ------------------------------------------------------------------ start

  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", login);
    $("logout").addEventListener("click", logout);
    window.addEventListener("hashchange", route);
    route();
  });
})();
