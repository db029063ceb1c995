// scale.py's clients rounds through Node's `ws` (--client node): many websockets from one
// process whose own cost per execute is small, so a busy round is bound by the gateway rather
// than by the bench's client. Needs tests/js/node_modules (`./dev test` or `cd tests/js &&
// npm ci`).
//   node bench/scaleclient.js WS_URL TOKEN v1|legacy SECONDS RATE < kernel-ids.json
// Opens one websocket per kernel id (kernel_info answered on shell and iopub first), then all
// clients at once execute `pass` for SECONDS: back to back with RATE 0, else each one every
// 1/RATE s from a random phase. A round trip is execute_request -> execute_reply and iopub
// idle, as bench.py's WsKernel.execute. Prints {"round": "start"} as the round begins, then:
//   {"times_ms": [[...] per client], "wall_s": s, "cpu_s": s, "late": n}
// (cpu_s: this process's user + system CPU during the round; late: paced executes that were
// due while the previous one still ran).
"use strict";
const path = require("path");
const { randomUUID } = require("crypto");
const WebSocket = require(path.join(__dirname, "..", "tests", "js", "node_modules", "ws"));
const v1frame = require("./v1frame");

const [wsUrl, token, proto, seconds, rate] = process.argv.slice(2);
const V1 = "v1.kernel.websocket.jupyter.org";
const v1 = proto === "v1";
const session = randomUUID();

function encode(msg) {
  if (!v1) return JSON.stringify(msg);
  const parts = [msg.channel, JSON.stringify(msg.header), "{}", "{}", JSON.stringify(msg.content)]
    .map((p) => Buffer.from(p));
  return v1frame.encode(parts);
}

// Only what a round trip needs: the header, the parent's msg_id, and the content.
function decode(data, isBinary) {
  if (!isBinary) return JSON.parse(data.toString());
  const offsets = v1frame.offsets(data);
  const part = (i) => JSON.parse(data.toString("utf8", offsets[i], offsets[i + 1]));
  return { header: part(1), parent_header: part(2), content: part(4) };
}

class Client {
  constructor(kernelId) {
    this.ws = new WebSocket(`${wsUrl}api/kernels/${kernelId}/channels`, v1 ? [V1] : [], {
      headers: { Authorization: `token ${token}` }, maxPayload: 0, perMessageDeflate: false });
    this.ws.on("message", (data, isBinary) => this.onMessage(decode(data, isBinary)));
    this.waiting = null;
  }

  opened() {
    return new Promise((resolve, reject) => {
      this.ws.once("open", resolve);
      this.ws.once("error", reject);
    });
  }

  onMessage(m) {
    const w = this.waiting;
    if (!w || m.parent_header.msg_id !== w.id) return;
    const type = m.header.msg_type;
    if (type === w.reply) {
      w.replied = true;
      w.status = m.content.status;
    } else if (type === "status" && m.content.execution_state === "idle") w.idle = true;
    if (w.replied && w.idle) {
      this.waiting = null;
      w.resolve(w.status);
    }
  }

  request(msgType, content) {
    const id = randomUUID();
    this.ws.send(encode({ channel: "shell", content,
      header: { msg_id: id, msg_type: msgType, session, username: "bench", version: "5.3",
                date: new Date().toISOString() } }));
    return new Promise((resolve) => {
      this.waiting = { id, reply: msgType.replace("_request", "_reply"), replied: false,
                       idle: false, status: undefined, resolve };
    });
  }

  async execute() {
    const status = await this.request("execute_request", { code: "pass", silent: false,
      store_history: false, user_expressions: {}, allow_stdin: false, stop_on_error: true });
    if (status !== "ok") throw new Error(`execute_reply status ${status}`);
  }
}

async function loop(client, start, until, out) {
  while (performance.now() < until) {
    const t0 = performance.now();
    await client.execute();
    out.push(performance.now() - t0);
  }
  return 0;
}

async function paced(client, start, until, out) {
  const period = 1000 / Number(rate);
  let at = start + Math.random() * period;
  let late = 0;
  while (at < until) {
    const now = performance.now();
    if (at > now) await new Promise((r) => setTimeout(r, at - now));
    else late++;
    const t0 = performance.now();
    await client.execute();
    out.push(performance.now() - t0);
    at += period;
  }
  return late;
}

async function main() {
  const ids = JSON.parse(require("fs").readFileSync(0, "utf8"));
  const clients = [];
  for (let i = 0; i < ids.length; i += 20) {  // 20 handshakes at a time, as scale.py opens
    const batch = ids.slice(i, i + 20).map((id) => new Client(id));
    await Promise.all(batch.map((c) => c.opened()));
    await Promise.all(batch.map((c) => c.request("kernel_info_request", {})));
    clients.push(...batch);
  }
  for (let i = 0; i < 20; i++) await Promise.all(clients.map((c) => c.execute()));  // warm-up
  const times = clients.map(() => []);
  console.log(JSON.stringify({ round: "start" }));  // scale.py starts its CPU clocks here
  const cpu0 = process.cpuUsage();
  const start = performance.now();
  const until = start + 1000 * Number(seconds);
  const round = Number(rate) > 0 ? paced : loop;
  const lates = await Promise.all(clients.map((c, i) => round(c, start, until, times[i])));
  const wall = (performance.now() - start) / 1000;
  const cpu = process.cpuUsage(cpu0);
  const result = JSON.stringify({ times_ms: times, wall_s: wall,
    cpu_s: (cpu.user + cpu.system) / 1e6, late: lates.reduce((a, b) => a + b, 0) });
  for (const c of clients) c.ws.close();
  // exit only once the line is out: writes to a pipe are asynchronous, and exit() drops them
  process.stdout.write(result + "\n", () => process.exit(0));
}

main().catch((e) => { console.error(String(e && e.stack || e)); process.exit(2); });
