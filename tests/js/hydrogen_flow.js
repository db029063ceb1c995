// Drives the gateway exactly as the Hydrogen editor plugin does (lib/ws-kernel-picker.ts and
// lib/ws-kernel.ts): @jupyterlab/services 0.52 with a global XMLHttpRequest from the
// `xmlhttprequest` package and WebSockets from `ws`; the gateway options {baseUrl, wsUrl, token}
// plus xhrFactory/wsFactory as serverSettings. The token travels as an Authorization header on
// REST and as `&token=` in the websocket URL (0.52 adds it there; headers never reach the socket).
// Flow: getSpecs, list sessions (a 403 is tolerated, as Hydrogen does), Session.startNew with a
// `<file>-<uuid>` path, execute, interrupt a sleep, restart then execute at once on the SAME
// socket, setPath, shutdown.
//
// Input: env BASE_URL (ends with '/') and TOKEN; argv[2] === "bad-token" checks instead that a
// wrong token is refused clearly. Output: one JSON line per step on stdout; exit 0 only if all
// passed; on failure an {"step":"error","ok":false,"message"} line, what was started is deleted,
// exit code 1 (2 for the global watchdog).
"use strict";
const { randomUUID } = require("crypto");
const { XMLHttpRequest } = require("xmlhttprequest");
const WebSocket = require("ws");

global.XMLHttpRequest = XMLHttpRequest; // a global one, as in Hydrogen's Electron renderer
const { Kernel, Session, ServerConnection } = require("services052");

const KERNEL = process.env.KERNEL_NAME || "python3"; // the kernelspec the flow runs on
const BASE = process.env.BASE_URL;
const TOKEN = process.env.TOKEN;
if (!BASE || !BASE.endsWith("/") || TOKEN === undefined) {
  process.stderr.write("hydrogen_flow: set BASE_URL (ending with '/') and TOKEN\n");
  process.exit(2);
}

// stdout carries only our JSON lines (0.52 console.logs every websocket it starts)
for (const level of ["log", "info", "debug", "warn"]) {
  console[level] = (...args) => process.stderr.write(`[${level}] ${args.map(String).join(" ")}\n`);
}
const emit = (obj) => process.stdout.write(`${JSON.stringify(obj)}\n`);
const step = (name, data = {}) => emit({ step: name, ok: true, ...data });

// Every websocket 0.52 opens, through the factory Hydrogen passes.
const sockets = [];
function makeSettings(token) {
  return ServerConnection.makeSettings({
    baseUrl: BASE,
    wsUrl: BASE.replace(/^http/, "ws"),
    token,
    xhrFactory: () => new XMLHttpRequest(),
    wsFactory: (url, protocol) => {
      const ws = new WebSocket(url, protocol);
      const record = { url, socket: ws, closes: [] };
      ws.on("close", (code) => record.closes.push(code));
      sockets.push(record);
      return ws;
    },
  });
}
const settings = makeSettings(TOKEN);

function within(ms, what, promise) {
  let timer;
  return Promise.race([
    promise,
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${what}: no answer within ${ms} ms`)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

function check(cond, what, detail) {
  if (!cond) throw new Error(`${what}: ${JSON.stringify(detail)}`);
}

// ws-kernel.ts _execute: onIOPub for the output, done for the reply
function run(kernel, code, onStream) {
  const future = kernel.requestExecute({ code });
  let out = "";
  future.onIOPub = (msg) => {
    if (msg.header.msg_type === "stream") {
      out += msg.content.text;
      if (onStream) onStream(msg.content.text);
    }
  };
  return future.done.then((reply) => ({ out, reply: reply.content }));
}

const started = { kernels: new Set(), sessions: new Set() };

async function flow() {
  const specs = await within(10000, "getSpecs", Kernel.getSpecs(settings));
  check(specs.kernelspecs.python3, "no python3 kernelspec", specs);
  step("getSpecs", { default: specs.default });

  // Hydrogen lists sessions to offer existing ones, and carries on after a 403
  let listed;
  try {
    listed = (await within(10000, "Session.listRunning", Session.listRunning(settings))).length;
  } catch (err) {
    if (!err.xhr || err.xhr.status !== 403) throw err;
    listed = "403";
  }
  step("listSessions", { listed });

  const path = `file.py-${randomUUID()}`;
  const session = await within(30000, "Session.startNew",
    Session.startNew({ kernelName: KERNEL, path, serverSettings: settings }));
  started.sessions.add(session.id);
  const kernel = session.kernel;
  started.kernels.add(kernel.id);
  await within(30000, "kernel ready", kernel.ready);
  check(session.path === path, "session path", session.path);
  check(sockets.length === 1, "expected one websocket", sockets.map((s) => s.url));
  const ws = sockets[0];
  const query = new URL(ws.url).searchParams;
  check(query.get("token") === TOKEN && query.get("session_id"), "websocket URL", ws.url);
  // 0.52 offers no subprotocol, so the gateway must select none (legacy JSON frames)
  check(ws.socket.protocol === "", "a subprotocol was selected for a client that offered none",
    ws.socket.protocol);
  step("startNew", { session: session.id, kernel: kernel.id, path: session.path });

  let r = await within(20000, "execute", run(kernel, "x = 41\nprint(x + 1)"));
  check(r.out === "42\n" && r.reply.status === "ok", "execute", r);
  step("execute", { out: r.out });

  // 4.8 MB outputs of 3-byte characters, three paddings: every character arrives
  const sizes = [];
  for (const pad of ["", "a", "aa"]) {
    r = await within(30000, "large output", run(kernel, `print('${pad}' + '\\u20ac' * 1600000)`));
    check(r.reply.status === "ok" && r.out === pad + "\u20ac".repeat(1600000) + "\n",
      "large output", { pad, length: r.out.length, status: r.reply.status });
    sizes.push(r.out.length);
  }
  step("large-output", { sizes });

  let begin;
  const begun = new Promise((resolve) => { begin = resolve; });
  const sleeping = run(kernel, "import time; print('sleeping', flush=True); time.sleep(30)",
    () => begin());
  await within(20000, "sleep started", begun);
  const t0 = Date.now();
  await within(10000, "interrupt", kernel.interrupt());
  r = await within(10000, "interrupted reply", sleeping);
  const ms = Date.now() - t0;
  check(r.reply.status === "error" && r.reply.ename === "KeyboardInterrupt", "interrupt", r.reply);
  step("interrupt", { ename: r.reply.ename, ms });

  // ws-kernel.ts restart(): kernel.restart(), then the user runs code at once. 0.52 keeps its
  // socket and holds the request until an iopub status arrives on it: the new kernel's iopub
  // must flow on the old socket.
  await within(30000, "restart", kernel.restart());
  r = await within(20000, "execute after restart (same socket)",
    run(kernel, "print('x' in globals())"));
  check(r.out === "False\n" && r.reply.status === "ok", "after restart", r);
  check(sockets.length === 1 && ws.socket.readyState === WebSocket.OPEN,
    "the restart cost the websocket", sockets.map((s) => ({ url: s.url, closes: s.closes })));
  step("restart-then-execute", { out: r.out, sockets: sockets.length });

  // the file was renamed: PATCH api/sessions/ID {"path"}
  const renamed = `renamed.py-${randomUUID()}`;
  await within(10000, "setPath", session.setPath(renamed));
  check(session.path === renamed, "session path after setPath", session.path);
  const running = await within(10000, "Session.listRunning", Session.listRunning(settings));
  const mine = running.find((s) => s.id === session.id);
  check(mine && mine.notebook.path === renamed && mine.kernel.id === kernel.id,
    "setPath not seen in the listing", running);
  step("setPath", { path: mine.notebook.path });

  await within(20000, "session shutdown", session.shutdown());
  const kernels = await within(10000, "Kernel.listRunning", Kernel.listRunning(settings));
  check(!kernels.some((k) => k.id === kernel.id), "kernel still listed after shutdown", kernels);
  const left = await within(10000, "Session.listRunning", Session.listRunning(settings));
  check(!left.some((s) => s.id === session.id), "session still listed after shutdown", left);
  started.sessions.delete(session.id);
  started.kernels.delete(kernel.id);
  step("shutdown");
}

// A wrong token must fail fast with a status and a non-empty body: Hydrogen's
// ws-kernel-picker.ts shows its token prompt only when error.xhr.responseText is non-empty.
async function badToken() {
  const bad = makeSettings(`${TOKEN}-wrong`);
  const t0 = Date.now();
  let err = null;
  try {
    await within(10000, "getSpecs with a wrong token", Kernel.getSpecs(bad));
  } catch (e) {
    err = e;
  }
  check(err !== null, "a wrong token was accepted", null);
  if (!err.xhr) throw err; // a timeout or a network error, not an answer
  const status = err.xhr.status;
  const body = err.xhr.responseText;
  let message = null;
  try {
    message = JSON.parse(body).message;
  } catch (e) { /* checked below */ }
  check([401, 403].includes(status) && message, "wrong token: expected 401/403 with a JSON message",
    { status, body });
  step("bad-token-rest", { status, body, ms: Date.now() - t0 });

  // The websocket of a live kernel, with the URL 0.52 builds but a wrong token: refused with
  // 401/403 at the upgrade, not accepted and not left hanging.
  const kernel = await within(30000, "Kernel.startNew", Kernel.startNew({ name: KERNEL, serverSettings: settings }));
  started.kernels.add(kernel.id);
  await within(30000, "kernel ready", kernel.ready);
  const url = `${bad.wsUrl}api/kernels/${encodeURIComponent(kernel.id)}/channels` +
    `?session_id=${randomUUID()}&token=${encodeURIComponent(bad.token)}`;
  const outcome = await within(10000, "websocket with a wrong token", new Promise((resolve) => {
    const ws = new WebSocket(url);
    ws.on("unexpected-response", (req, res) => { resolve({ status: res.statusCode }); req.destroy(); });
    ws.on("open", () => { resolve({ opened: true }); ws.close(); });
    ws.on("error", (e) => resolve({ error: String(e) }));
  }));
  check([401, 403].includes(outcome.status), "websocket with a wrong token", outcome);
  step("bad-token-websocket", outcome);

  await within(20000, "kernel shutdown", kernel.shutdown());
  started.kernels.delete(kernel.id);
}

// After a failure: delete whatever is still ours, straight through the REST API.
async function cleanup() {
  const del = async (what) => {
    try {
      await within(10000, `DELETE ${what}`, fetch(`${BASE}api/${what}`,
        { method: "DELETE", headers: { Authorization: `token ${TOKEN}` } }));
    } catch (err) {
      process.stderr.write(`cleanup: ${err}\n`);
    }
  };
  for (const id of started.sessions) await del(`sessions/${id}`);
  for (const id of started.kernels) await del(`kernels/${id}`);
}

function describe(err) {
  if (err && err.xhr) { // 0.52 rejects with {xhr, message, ...}, not an Error
    return `HTTP ${err.xhr.status} from ${err.request && err.request.method} ${err.request && err.request.url}: ` +
      `${err.message || ""} ${err.xhr.responseText}`;
  }
  return String((err && err.stack) || (err && err.message) || err);
}

function fail(err, code) {
  emit({ step: "error", ok: false, message: describe(err) });
  cleanup().finally(() => process.exit(code));
}

const watchdog = setTimeout(() => fail(new Error("whole flow: no end within 100 s"), 2), 100000);
(process.argv[2] === "bad-token" ? badToken() : flow()).then(() => {
  clearTimeout(watchdog);
  process.exit(0);
}, (err) => {
  clearTimeout(watchdog);
  fail(err, 1);
});
