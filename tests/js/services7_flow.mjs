// Drives the gateway with @jupyterlab/services 7 (what JupyterLab 4 runs) in Node, the way a
// JupyterLab front end does: kernelspecs, kernel and session managers, the v1 websocket protocol
// (checked on the socket itself), execute, complete, interrupt, restart then execute, session
// rename through PATCH, shutdown.
//
// Input: env BASE_URL (ends with '/') and TOKEN. Output: one JSON line per step on stdout
// ({"step", "ok", ...}); the library's own console chatter goes to stderr. Exit 0 only if every
// step passed; on failure a {"step":"error","ok":false,"message"} line, everything this script
// started is deleted through the REST API, and the exit code is 1 (2 for the global watchdog).
import { randomUUID } from "node:crypto";
import WebSocket from "ws";
import services from "services7";

const { ServerConnection, KernelManager, SessionManager, KernelSpecManager } = services;
const KERNEL = process.env.KERNEL_NAME || "python3"; // the kernelspec the flow runs on
const V1 = "v1.kernel.websocket.jupyter.org";
const BASE = process.env.BASE_URL;
const TOKEN = process.env.TOKEN;
if (!BASE || !BASE.endsWith("/") || TOKEN === undefined) {
  process.stderr.write("services7_flow: set BASE_URL (ending with '/') and TOKEN\n");
  process.exit(2);
}

// stdout carries only our JSON lines
for (const level of ["log", "info", "debug", "warn"]) {
  console[level] = (...args) => process.stderr.write(`[${level}] ${args.map(String).join(" ")}\n`);
}
const emit = (obj) => process.stdout.write(`${JSON.stringify(obj)}\n`);
const step = (name, data = {}) => emit({ step: name, ok: true, ...data });

// Every websocket the library opens, to check the negotiated protocol and count reconnections.
const sockets = [];
class TrackedWebSocket extends WebSocket {
  constructor(url, protocols) {
    super(url, protocols);
    const record = { url: String(url), offered: protocols, socket: this, closes: [] };
    this.on("close", (code) => record.closes.push(code));
    sockets.push(record);
  }
}
const socketsOf = (kernelId) => sockets.filter((s) => s.url.includes(`/api/kernels/${kernelId}/`));

const settings = ServerConnection.makeSettings({
  baseUrl: BASE,
  wsUrl: BASE.replace(/^http/, "ws"),
  token: TOKEN,
  appendToken: true, // Node's `ws` cannot carry the Authorization header of a browser session
  WebSocket: TrackedWebSocket,
  fetch, // Node 20's own
});

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

// Run code, collecting stream output; onStream sees each chunk as it arrives.
async function run(kernel, code, onStream) {
  const future = kernel.requestExecute({ code });
  let out = "";
  future.onIOPub = (msg) => {
    if (msg.header.msg_type === "stream") {
      out += msg.content.text;
      if (onStream) onStream(msg.content.text);
    }
  };
  const reply = await future.done;
  return { out, reply: reply.content };
}

// The socket the kernel connection is using now, and what the server selected on it.
function connectionFacts(kernel) {
  const ws = kernel._ws; // private, but the only place the negotiated subprotocol is visible
  return {
    connectionStatus: kernel.connectionStatus,
    protocol: ws ? ws.protocol : null,
    extensions: ws ? ws.extensions : null,
  };
}

function checkV1(kernel, what) {
  const facts = connectionFacts(kernel);
  check(facts.connectionStatus === "connected", `${what}: kernel connection not connected`, facts);
  check(facts.protocol === V1, `${what}: ${V1} was not negotiated`, facts);
  const offered = socketsOf(kernel.id).at(-1).offered;
  check(Array.isArray(offered) && offered.includes(V1), `${what}: client did not offer v1`, offered);
  return facts;
}

const kernels = new KernelManager({ serverSettings: settings });
const sessions = new SessionManager({ serverSettings: settings, kernelManager: kernels });
const specs = new KernelSpecManager({ serverSettings: settings });
const started = { kernels: new Set(), sessions: new Set() };

async function main() {
  // kernelspecs, and the logo resource it points to
  await within(10000, "kernelspecs", specs.ready);
  const all = specs.specs;
  check(all && all.kernelspecs.python3, "no python3 kernelspec", all);
  check(all.default in all.kernelspecs, "default is not one of the kernelspecs", all.default);
  // resources are URLs absolute on the server ("<base>/kernelspecs/NAME/FILE")
  const logoRef = all.kernelspecs.python3.resources["logo-64x64"];
  const logo = logoRef ? new URL(logoRef, BASE).href : null;
  let logoStatus = null;
  if (logo) {
    const r = await within(10000, "logo", ServerConnection.makeRequest(logo, {}, settings));
    logoStatus = r.status;
    check(r.status === 200 && (await r.arrayBuffer()).byteLength > 0, "logo not served", { logo, status: r.status });
  }
  step("kernelspecs", { default: all.default, names: Object.keys(all.kernelspecs).sort(), logoStatus });

  // a bare kernel through KernelManager: start, v1 socket, listed, shut down
  const bare = await within(30000, "KernelManager.startNew", kernels.startNew({ name: KERNEL }));
  started.kernels.add(bare.id);
  await within(30000, "kernel info (KernelManager)", bare.info);
  const bareFacts = checkV1(bare, "KernelManager kernel");
  await within(10000, "kernels.refreshRunning", kernels.refreshRunning());
  check([...kernels.running()].some((k) => k.id === bare.id), "started kernel not listed", bare.id);
  await within(20000, "kernel shutdown", bare.shutdown());
  await within(10000, "kernels.refreshRunning", kernels.refreshRunning());
  check(![...kernels.running()].some((k) => k.id === bare.id), "kernel still listed after shutdown", bare.id);
  started.kernels.delete(bare.id);
  step("kernel-manager", { kernel: bare.id, ...bareFacts });

  // a session, as a notebook panel opens one
  const path = `nb-${randomUUID()}.ipynb`;
  const session = await within(30000, "SessionManager.startNew", sessions.startNew(
    { path, type: "notebook", name: path, kernel: { name: KERNEL } }));
  started.sessions.add(session.id);
  const kernel = session.kernel;
  check(kernel, "session has no kernel", session.model);
  started.kernels.add(kernel.id);
  await within(30000, "kernel info", kernel.info);
  const facts = checkV1(kernel, "session kernel");
  step("startNew", { session: session.id, kernel: kernel.id, path: session.path, ...facts });

  let r = await within(20000, "execute", run(kernel, "x = 41\nprint(x + 1)"));
  check(r.out === "42\n" && r.reply.status === "ok", "execute", r);
  step("execute", { out: r.out, protocol: connectionFacts(kernel).protocol });

  // 4.8 MB outputs of 3-byte characters, three paddings: every character arrives
  const sizes = [];
  for (const pad of ["", "a", "aa"]) {
    r = await within(30000, "large output", run(kernel, `print('${pad}' + '\\u20ac' * 1600000)`));
    check(r.reply.status === "ok" && r.out === pad + "\u20ac".repeat(1600000) + "\n",
      "large output", { pad, length: r.out.length, status: r.reply.status });
    sizes.push(r.out.length);
  }
  step("large-output", { sizes });

  const comp = await within(10000, "complete",
    kernel.requestComplete({ code: "import o", cursor_pos: 8 }));
  check(comp.content.status === "ok" && comp.content.matches.includes("os"), "complete", comp.content);
  step("complete", { matches: comp.content.matches.length });

  // interrupt a sleep once it is known to run; the KeyboardInterrupt reply must come quickly
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

  // restart, then execute straight away: a fresh namespace, on a v1 socket again
  await within(30000, "restart", kernel.restart());
  r = await within(20000, "execute after restart", run(kernel, "print('x' in globals())"));
  check(r.out === "False\n" && r.reply.status === "ok", "after restart", r);
  const afterFacts = checkV1(kernel, "after restart");
  step("restart-then-execute", { out: r.out, ...afterFacts });

  // rename: PATCH api/sessions/ID, then the listing must show it
  const renamed = `renamed-${randomUUID()}.ipynb`;
  await within(10000, "setPath", session.setPath(renamed));
  check(session.path === renamed, "session model after PATCH", session.model);
  await within(10000, "sessions.refreshRunning", sessions.refreshRunning());
  const listed = [...sessions.running()].find((s) => s.id === session.id);
  check(listed && listed.path === renamed && listed.kernel && listed.kernel.id === kernel.id,
    "rename not seen in the listing", listed);
  step("rename", { path: listed.path });

  // the library opened one socket, and one more for the reconnection that follows a restart;
  // any other one means the gateway dropped a connection
  const count = socketsOf(kernel.id).length;
  check(count === 2, "unexpected websocket reconnections", socketsOf(kernel.id).map((s) => s.closes));

  await within(20000, "session shutdown", session.shutdown());
  await within(10000, "kernels.refreshRunning", kernels.refreshRunning());
  check(![...kernels.running()].some((k) => k.id === kernel.id), "kernel still listed after shutdown", kernel.id);
  await within(10000, "sessions.refreshRunning", sessions.refreshRunning());
  check(![...sessions.running()].some((s) => s.id === session.id), "session still listed after shutdown", session.id);
  started.sessions.delete(session.id);
  started.kernels.delete(kernel.id);
  step("shutdown", { sockets: count });
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
  if (err && err.response) { // ServerConnection.ResponseError
    return `HTTP ${err.response.status} from ${err.response.url}: ${err.stack}`;
  }
  return String((err && err.stack) || (err && err.message) || err);
}

function fail(err, code) {
  emit({ step: "error", ok: false, message: describe(err) });
  cleanup().finally(() => process.exit(code));
}

const watchdog = setTimeout(() => fail(new Error("whole flow: no end within 100 s"), 2), 100000);
main().then(() => {
  clearTimeout(watchdog);
  sessions.dispose();
  kernels.dispose();
  specs.dispose();
  process.exit(0);
}, (err) => {
  clearTimeout(watchdog);
  fail(err, 1);
});
