// The throughput workload through Node's `ws` (the websocket library Hydrogen and
// @jupyterlab/services use in Node), from tests/js/node_modules (installed by `./dev test`).
//   node bench/nodeclient.js URL TOKEN legacy|v1 REPEATS < code
// Asks for kernel_info (and waits for its iopub status, as the Python clients do), runs the
// code REPEATS times and prints one JSON line:
//   [{"stdout": characters, "display": characters, "seconds": s, "cpu": s}, ...]
// (cpu: this process's user + system CPU seconds during the run). With REPEATS `serve`
// (bench/profile_throughput.py), it runs each JSON-encoded code string read from a line of
// stdin as it comes and answers each with one JSON line of that run; EOF ends it.
"use strict";
const path = require("path");
const { randomUUID } = require("crypto");
const WebSocket = require(path.join(__dirname, "..", "tests", "js", "node_modules", "ws"));
const v1frame = require("./v1frame");

const [url, token, proto, repeats] = process.argv.slice(2);
const V1 = "v1.kernel.websocket.jupyter.org";
const v1 = proto === "v1";
const serve = repeats === "serve";
const code = serve ? "" : require("fs").readFileSync(0, "utf8");

function encode(msg) {
  if (!v1) return JSON.stringify(msg);
  const parts = [msg.channel, ...[msg.header, msg.parent_header, msg.metadata, msg.content]
    .map((p) => JSON.stringify(p))].map((p) => Buffer.from(p));
  return v1frame.encode(parts);
}

const text = new TextDecoder();
function decode(data, isBinary) {
  if (!isBinary) return JSON.parse(data.toString());
  if (!v1) throw new Error("legacy binary frame: not expected in this workload");
  const offsets = v1frame.offsets(data);
  const part = (i) => text.decode(data.subarray(offsets[i], offsets[i + 1]));
  return { header: JSON.parse(part(1)), parent_header: JSON.parse(part(2)),
           content: JSON.parse(part(4)) };
}

const ws = new WebSocket(url, v1 ? [V1] : [], {
  headers: { Authorization: `token ${token}` }, maxPayload: 0 });
let onMessage = () => {};
ws.on("message", (data, isBinary) => onMessage(decode(data, isBinary)));
ws.on("error", (err) => { console.error(String(err)); process.exit(2); });

function request(msgType, content, done) {
  const id = randomUUID();
  ws.send(encode({ channel: "shell", parent_header: {}, metadata: {},
    header: { msg_id: id, msg_type: msgType, session: randomUUID(), username: "bench",
              version: "5.3", date: new Date().toISOString() },
    content }));
  return new Promise((resolve) => {
    let idle = false;
    let replied = false;
    onMessage = (m) => {
      if (m.parent_header.msg_id !== id) return;
      const type = m.header.msg_type;
      if (type === msgType.replace("_request", "_reply")) replied = true;
      else if (type === "status" && m.content.execution_state === "idle") idle = true;
      else done(type, m.content);
      if (idle && replied) resolve();
    };
  });
}

async function execute(source) {
  const res = { stdout: 0, display: 0, seconds: 0, cpu: 0 };
  const cpu0 = process.cpuUsage();
  const t0 = performance.now();
  await request("execute_request", { code: source, silent: false, store_history: false,
    user_expressions: {}, allow_stdin: false, stop_on_error: true }, (type, content) => {
    if (type === "stream" && content.name === "stdout") res.stdout += content.text.length;
    else if (type === "display_data") res.display += (content.data["text/plain"] || "").length;
  });
  res.seconds = (performance.now() - t0) / 1000;
  const cpu = process.cpuUsage(cpu0);
  res.cpu = (cpu.user + cpu.system) / 1e6;
  return res;
}

ws.on("open", async () => {
  if ((ws.protocol === V1) !== v1) {
    console.error(`asked for ${proto}, server chose ${JSON.stringify(ws.protocol)}`);
    process.exit(2);
  }
  await request("kernel_info_request", {}, () => {});
  if (serve) {
    console.log(JSON.stringify({ ready: true }));
    const lines = require("readline").createInterface({ input: process.stdin });
    for await (const line of lines) console.log(JSON.stringify(await execute(JSON.parse(line))));
    ws.close();
    process.exit(0);
  }
  const runs = [];
  for (let i = 0; i < Number(repeats); i++) runs.push(await execute(code));
  console.log(JSON.stringify(runs));
  ws.close();
  process.exit(0);
});
