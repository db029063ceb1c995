// The v1 websocket frame (v1.kernel.websocket.jupyter.org) for the bench's Node clients:
// uint64 LE count n, n uint64 LE offsets, then the parts (channel, header, parent, metadata,
// content, buffers...).
"use strict";

function encode(parts) {
  const n = parts.length + 1;
  const head = Buffer.alloc(8 * (n + 1));
  head.writeBigUInt64LE(BigInt(n), 0);
  let offset = 8 * (n + 1);
  head.writeBigUInt64LE(BigInt(offset), 8);
  parts.forEach((p, i) => {
    offset += p.length;
    head.writeBigUInt64LE(BigInt(offset), 8 * (i + 2));
  });
  return Buffer.concat([head, ...parts]);
}

// The parts' offsets in `data` (the last one is the end of the frame).
function offsets(data) {
  const n = Number(data.readBigUInt64LE(0));
  const out = [];
  for (let i = 0; i < n; i++) out.push(Number(data.readBigUInt64LE(8 * (i + 1))));
  return out;
}

module.exports = { encode, offsets };
