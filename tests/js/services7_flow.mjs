// Drives the gateway with @jupyterlab/services 7 (what JupyterLab 4 runs) in Node: kernel and
// session managers, the v1 websocket protocol, execute, complete, interrupt, restart, session
// rename, shutdown. One JSON line per step; non-zero exit on failure.
import WebSocket from "ws";
import services from "services7";

const { ServerConnection, KernelManager, SessionManager, KernelSpecManager } = services;
const BASE = process.env.BASE_URL;
const settings = ServerConnection.makeSettings({
  baseUrl: BASE,
  wsUrl: BASE.replace(/^http/, "ws"),
  token: process.env.TOKEN,
  appendToken: true,
  WebSocket,
});

const step = (name, data = {}) => console.log(JSON.stringify({ step: name, ok: true, ...data }));
const within = (ms, what, promise) =>
  Promise.race([promise, new Promise((_, reject) =>
    setTimeout(() => reject(new Error(`${what}: no answer within ${ms} ms`)), ms))]);

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

const kernels = new KernelManager({ serverSettings: settings });
const sessions = new SessionManager({ serverSettings: settings, kernelManager: kernels });
const specs = new KernelSpecManager({ serverSettings: settings });

async function main() {
  await within(10000, "kernelspecs", specs.ready);
  if (!specs.specs.kernelspecs.python3) throw new Error("no python3 kernelspec");
  step("kernelspecs", { default: specs.specs.default });

  const session = await within(30000, "startNew", sessions.startNew(
    { path: "nb.ipynb", type: "notebook", name: "nb.ipynb", kernel: { name: "python3" } }));
  const kernel = session.kernel;
  await within(30000, "kernel info", kernel.info);
  step("startNew", { kernel: kernel.id });

  let r = await within(20000, "execute", run(kernel, "x = 41\nprint(x + 1)"));
  if (r.out !== "42\n" || r.reply.status !== "ok") throw new Error(`execute: ${JSON.stringify(r)}`);
  const protocol = kernel._ws && kernel._ws.protocol;
  if (protocol !== "v1.kernel.websocket.jupyter.org") throw new Error(`protocol: ${protocol}`);
  step("execute", { out: r.out, protocol });

  const comp = await within(10000, "complete", kernel.requestComplete({ code: "import o", cursor_pos: 8 }));
  if (!comp.content.matches.includes("os")) throw new Error(`complete: ${JSON.stringify(comp.content)}`);
  step("complete", { matches: comp.content.matches.length });

  let started;
  const begun = new Promise((resolve) => { started = resolve; });
  const sleeping = run(kernel, "import time; print('sleeping', flush=True); time.sleep(30)",
    () => started());
  await within(20000, "sleep started", begun);
  await within(10000, "interrupt", kernel.interrupt());
  r = await within(15000, "interrupted reply", sleeping);
  if (r.reply.ename !== "KeyboardInterrupt") throw new Error(`interrupt: ${JSON.stringify(r.reply)}`);
  step("interrupt", { ename: r.reply.ename });

  await within(30000, "restart", kernel.restart());
  r = await within(20000, "execute after restart", run(kernel, "print('x' in globals())"));
  if (r.out !== "False\n") throw new Error(`after restart: ${JSON.stringify(r)}`);
  step("restart-then-execute", { out: r.out });

  await within(10000, "setPath", session.setPath("renamed.ipynb"));
  await within(10000, "refreshRunning", sessions.refreshRunning());
  const listed = [...sessions.running()].find((s) => s.id === session.id);
  if (!listed || listed.path !== "renamed.ipynb") throw new Error(`rename: ${JSON.stringify(listed)}`);
  step("rename", { path: listed.path });

  const id = kernel.id;
  await within(20000, "shutdown", session.shutdown());
  await within(10000, "refresh kernels", kernels.refreshRunning());
  if ([...kernels.running()].some((k) => k.id === id)) throw new Error("kernel still running");
  step("shutdown");
}

main().then(() => { sessions.dispose(); kernels.dispose(); specs.dispose(); process.exit(0); },
  (err) => {
    console.log(JSON.stringify({ step: "error", ok: false, message: String(err && err.stack || err) }));
    process.exit(1);
  });
