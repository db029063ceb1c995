// Drives the gateway exactly as the Hydrogen editor plugin does: @jupyterlab/services 0.52 with
// the `xmlhttprequest` and `ws` packages, token in the settings (REST header, and ?token= on the
// websocket, where headers never reach). One JSON line per step; non-zero exit on failure.
"use strict";
const { XMLHttpRequest } = require("xmlhttprequest");
const WebSocket = require("ws");
const { Kernel, Session, ServerConnection } = require("services052");

const BASE = process.env.BASE_URL;
const TOKEN = process.env.TOKEN;
const settings = ServerConnection.makeSettings({
  baseUrl: BASE,
  wsUrl: BASE.replace(/^http/, "ws"),
  token: TOKEN,
  xhrFactory: () => new XMLHttpRequest(),
  wsFactory: (url, protocol) => new WebSocket(url, protocol),
});

const step = (name, data = {}) => console.log(JSON.stringify({ step: name, ok: true, ...data }));
const within = (ms, what, promise) =>
  Promise.race([promise, new Promise((_, reject) =>
    setTimeout(() => reject(new Error(`${what}: no answer within ${ms} ms`)), ms))]);

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

async function main() {
  if (process.argv[2] === "bad-token") {
    const bad = ServerConnection.makeSettings({ ...settings, token: "wrong" });
    try {
      await within(10000, "getSpecs", Kernel.getSpecs(bad));
      throw new Error("a wrong token was accepted");
    } catch (err) {
      const status = err.xhr ? err.xhr.status : undefined;
      if (status !== 403) throw err;
      step("bad-token-rejected", { status, body: err.xhr.responseText });
    }
    return;
  }
  const specs = await within(10000, "getSpecs", Kernel.getSpecs(settings));
  if (!specs.kernelspecs.python3) throw new Error("no python3 kernelspec");
  step("getSpecs", { default: specs.default });

  const path = `file.py-${Date.now()}`;
  const session = await within(30000, "Session.startNew",
    Session.startNew({ kernelName: "python3", path, serverSettings: settings }));
  const kernel = session.kernel;
  await within(30000, "kernel ready", kernel.ready);
  step("startNew", { kernel: kernel.id, path: session.path });

  let r = await within(20000, "execute", run(kernel, "x = 41\nprint(x + 1)"));
  if (r.out !== "42\n" || r.reply.status !== "ok") throw new Error(`execute: ${JSON.stringify(r)}`);
  step("execute", { out: r.out });

  let started;
  const begun = new Promise((resolve) => { started = resolve; });
  const sleeping = run(kernel, "import time; print('sleeping', flush=True); time.sleep(30)",
    () => started());
  await within(20000, "sleep started", begun);
  await within(10000, "interrupt", kernel.interrupt());
  r = await within(15000, "interrupted reply", sleeping);
  if (r.reply.ename !== "KeyboardInterrupt") throw new Error(`interrupt: ${JSON.stringify(r.reply)}`);
  step("interrupt", { ename: r.reply.ename });

  // restart, then execute at once on the same socket: the output must arrive
  await within(30000, "restart", kernel.restart());
  r = await within(20000, "execute after restart", run(kernel, "print('x' in globals())"));
  if (r.out !== "False\n") throw new Error(`after restart: ${JSON.stringify(r)}`);
  step("restart-then-execute", { out: r.out });

  await within(10000, "setPath", session.setPath("renamed.py"));
  const running = await within(10000, "listRunning", Session.listRunning(settings));
  const mine = running.find((s) => s.id === session.id);
  if (!mine || mine.notebook.path !== "renamed.py") {
    throw new Error(`setPath not seen in listing: ${JSON.stringify(running)}`);
  }
  step("setPath", { path: mine.notebook.path });

  await within(20000, "shutdown", session.shutdown());
  const kernels = await within(10000, "Kernel.listRunning", Kernel.listRunning(settings));
  if (kernels.some((k) => k.id === kernel.id)) throw new Error("kernel still running after shutdown");
  step("shutdown");
}

main().then(() => process.exit(0), (err) => {
  console.log(JSON.stringify({ step: "error", ok: false, message: String(err && err.stack || err) }));
  process.exit(1);
});
