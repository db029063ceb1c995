// The status page: reads api/status every 2 s and shows it; shuts down and interrupts kernels
// through the REST API. Every URL is relative to the page, which the gateway serves at its base
// URL, so the page works under --base-url and behind a proxy at a sub-path.
//
// The token: from ?token= (moved to sessionStorage and removed from the address bar) or from
// the form, kept for this tab only. Everything from the gateway goes into the page as text
// (textContent, never innerHTML): kernel names, users and errors are other people's strings.
"use strict";

(() => {
  const POLL_MS = 2000;
  const KEY = "rkg-token:" + location.pathname; // gateways on one origin keep theirs apart
  const $ = (id) => document.getElementById(id);

  let timer = 0;
  let generation = 0; // bumped on login and logout: an answer to an older request is dropped
  const kernelRows = new Map(); // kernel id -> {tr, update}: rows are kept, so are buttons
  let shownHosts = "";
  let shownFailures = "";

  // -- token ------------------------------------------------------------------------------

  function takeTokenFromUrl() {
    const url = new URL(location.href);
    const given = url.searchParams.get("token");
    if (given === null) return;
    sessionStorage.setItem(KEY, given);
    url.searchParams.delete("token");
    history.replaceState(history.state, "", url.pathname + url.search + url.hash);
  }

  const token = () => sessionStorage.getItem(KEY) || "";

  async function request(method, path) {
    const headers = {};
    const t = token();
    if (t) headers.Authorization = "token " + t;
    const resp = await fetch(path, { method, headers, cache: "no-store", credentials: "omit" });
    const text = await resp.text();
    let body = null;
    try {
      body = text ? JSON.parse(text) : null;
    } catch {
      body = null;
    }
    return { status: resp.status, body };
  }

  const messageOf = (r) =>
    r.body && typeof r.body.message === "string" ? r.body.message : "HTTP " + r.status;

  // -- what is shown ------------------------------------------------------------------------

  function banner(text) {
    $("banner").textContent = text || "";
    $("banner").hidden = !text;
  }

  function showLogin(why) {
    clearTimeout(timer);
    $("board").hidden = true;
    $("logout").hidden = true;
    $("updated").textContent = "";
    $("login").hidden = false;
    $("login-why").textContent = why;
    $("token").focus();
  }

  function showBoard() {
    $("login").hidden = true;
    $("board").hidden = false;
    $("logout").hidden = !token();
  }

  function el(tag, text, className) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (className) e.className = className;
    return e;
  }

  function clock(iso) {
    const t = Date.parse(iso);
    return Number.isNaN(t) ? "" : new Date(t).toLocaleString();
  }

  function duration(seconds) {
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
    if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
    return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
  }

  function ago(iso, now) {
    const t = Date.parse(iso);
    const n = Date.parse(now);
    return Number.isNaN(t) || Number.isNaN(n) ? "" : duration((n - t) / 1000) + " ago";
  }

  function bytes(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) {
      n /= 1024;
      i += 1;
    }
    return (i ? n.toFixed(1) : String(n)) + " " + units[i];
  }

  function renderFigures(g) {
    const states = Object.entries(g.kernels || {})
      .map(([state, n]) => n + " " + state)
      .join(", ");
    const figures = [
      ["Version", g.version],
      ["PID", g.pid],
      ["Up", duration(g.uptime)],
      ["Memory (RSS)", bytes(g.rss_bytes)],
      ["Kernels", states || "none"],
      ["Websocket clients", g.connections],
      ["Base URL", g.base_url],
    ];
    const dl = $("figures");
    dl.replaceChildren(
      ...figures.map(([name, value]) => {
        const div = el("div");
        div.dataset.figure = name;
        div.append(el("dt", name), el("dd", value));
        return div;
      })
    );
  }

  function kernelRow(id) {
    const tr = el("tr");
    tr.dataset.kernelId = id;
    const cells = {};
    const fields = ["kernel", "spec", "backend", "host", "user", "state", "execution"];
    for (const name of [...fields, "connections", "started", "activity"]) {
      cells[name] = el("td", "", name === "connections" ? "num" : "");
      cells[name].dataset.field = name;
      tr.append(cells[name]);
    }
    cells.kernel.append(el("code", id.slice(0, 8)));
    cells.kernel.title = id;
    const actions = el("td", "", "actions");
    const interrupt = el("button", "Interrupt");
    const shutdown = el("button", "Shut down", "danger");
    interrupt.type = shutdown.type = "button";
    interrupt.dataset.action = "interrupt";
    shutdown.dataset.action = "shutdown";
    actions.append(interrupt, shutdown);
    tr.append(actions);
    let current = {};

    interrupt.addEventListener("click", () =>
      act(interrupt, "POST", "api/kernels/" + encodeURIComponent(id) + "/interrupt", "Interrupting…")
    );
    shutdown.addEventListener("click", () => {
      if (!confirm("Shut down kernel " + id + " (" + current.spec + ")? Its clients lose it.")) return;
      act(shutdown, "DELETE", "api/kernels/" + encodeURIComponent(id), "Shutting down…");
    });

    function update(k, now, admin) {
      current = k;
      cells.spec.textContent = k.spec;
      cells.backend.textContent = k.backend;
      cells.host.textContent = k.host;
      cells.user.textContent = k.user;
      cells.state.replaceChildren(el("span", k.state, stateClass(k.state)));
      if (k.stage) cells.state.append(el("span", k.stage, "stage"));
      cells.execution.textContent = k.execution_state;
      cells.connections.textContent = k.connections;
      cells.started.textContent = clock(k.started);
      cells.activity.textContent = ago(k.last_activity, now);
      actions.hidden = !admin;
      if (!interrupt.dataset.busy) interrupt.disabled = k.state !== "running";
      if (!shutdown.dataset.busy) shutdown.disabled = k.state === "stopping";
    }
    return { tr, update };
  }

  function stateClass(state) {
    if (state === "running") return "ok";
    if (state === "dead") return "bad";
    return "warn";
  }

  async function act(button, method, path, busyText) {
    const label = button.textContent;
    button.disabled = true;
    button.dataset.busy = "1";
    button.textContent = busyText;
    try {
      const r = await request(method, path);
      if (r.status >= 400) banner("Could not " + label.toLowerCase() + ": " + messageOf(r));
    } catch (e) {
      banner("Could not " + label.toLowerCase() + ": " + e.message);
    } finally {
      delete button.dataset.busy;
      button.textContent = label;
      button.disabled = false;
    }
    poll();
  }

  function renderKernels(kernels, now, admin) {
    const tbody = $("kernels").tBodies[0];
    const seen = new Set();
    for (const k of kernels) {
      seen.add(k.id);
      let row = kernelRows.get(k.id);
      if (!row) {
        row = kernelRow(k.id);
        kernelRows.set(k.id, row);
        tbody.append(row.tr);
      }
      row.update(k, now, admin);
    }
    for (const [id, row] of kernelRows) {
      if (!seen.has(id)) {
        row.tr.remove();
        kernelRows.delete(id);
      }
    }
    $("kernels").hidden = kernels.length === 0;
    $("no-kernels").hidden = kernels.length !== 0;
  }

  function renderHosts(hosts) {
    const key = JSON.stringify(hosts);
    if (key === shownHosts) return; // unchanged: leave the text, and any selection, alone
    shownHosts = key;
    const rows = hosts.map((h) => {
      const tr = el("tr");
      tr.dataset.backend = h.backend;
      const reach = el("td");
      reach.dataset.field = "reachable";
      if (h.checks === null) {
        reach.append(el("span", "not checked yet", "quiet"));
      } else if (h.checks.length === 0) {
        reach.append(el("span", "nothing to check", "quiet"));
      } else {
        const ul = el("ul", null, "checks");
        for (const c of h.checks) {
          const li = el("li");
          li.append(el("span", c.label + ": "));
          li.append(c.error ? el("span", c.error, "bad") : el("span", "answers", "ok"));
          ul.append(li);
        }
        reach.append(ul);
      }
      tr.append(
        el("td", h.backend),
        el("td", h.kernelspecs.join(", ")),
        reach,
        el("td", h.checked ? clock(h.checked) : "")
      );
      return tr;
    });
    $("hosts").tBodies[0].replaceChildren(...rows);
    $("hosts").hidden = hosts.length === 0;
    $("no-hosts").hidden = hosts.length !== 0;
  }

  function renderFailures(failures) {
    const key = JSON.stringify(failures);
    if (key === shownFailures) return;
    shownFailures = key;
    const rows = failures.map((f) => {
      const tr = el("tr");
      tr.dataset.kernelId = f.id;
      const reason = el("td", f.reason);
      reason.dataset.field = "reason";
      if (f.stages) reason.append(el("span", f.stages, "stages"));
      tr.append(
        el("td", clock(f.at)),
        el("td", f.name),
        el("td", f.backend),
        el("td", f.host),
        el("td", f.user),
        el("td", f.outcome, "bad"),
        el("td", f.seconds + " s", "num"),
        reason
      );
      return tr;
    });
    $("failures").tBodies[0].replaceChildren(...rows);
    $("failures").hidden = failures.length === 0;
    $("no-failures").hidden = failures.length !== 0;
  }

  function render(s) {
    renderFigures(s.gateway);
    renderKernels(s.kernels, s.gateway.time, s.admin === true);
    renderHosts(s.hosts);
    renderFailures(s.failures);
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
  }

  // -- the loop -----------------------------------------------------------------------------

  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(poll, POLL_MS);
  }

  async function poll() {
    clearTimeout(timer);
    const mine = ++generation;
    let r;
    try {
      r = await request("GET", "api/status");
    } catch (e) {
      if (mine !== generation) return;
      banner("The gateway does not answer (" + e.message + "); trying again.");
      schedule();
      return;
    }
    if (mine !== generation) return; // a newer request is under way
    if (r.status === 401) {
      banner("");
      showLogin("This gateway needs a token. " + messageOf(r));
      return;
    }
    if (r.status === 403) {
      banner("That token is not valid for this gateway: " + messageOf(r));
      sessionStorage.removeItem(KEY);
      showLogin("Give the gateway's token.");
      return;
    }
    if (r.status !== 200 || !r.body || !r.body.gateway) {
      banner("The gateway answered " + r.status + ": " + messageOf(r) + "; trying again.");
      schedule();
      return;
    }
    banner("");
    showBoard();
    render(r.body);
    schedule();
  }

  function start() {
    takeTokenFromUrl();
    $("login").addEventListener("submit", (ev) => {
      ev.preventDefault();
      sessionStorage.setItem(KEY, $("token").value.trim());
      $("token").value = "";
      banner("");
      poll();
    });
    $("logout").addEventListener("click", () => {
      sessionStorage.removeItem(KEY);
      generation += 1;
      banner("");
      showLogin("The token is forgotten in this tab.");
    });
    poll();
  }

  start();
})();
