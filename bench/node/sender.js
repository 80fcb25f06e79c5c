// Closed-loop acked sends: each of --senders clients sends message:send and the next one as
// soon as its ack arrives, for --duration seconds; the Node counterpart of
// bench/send_throughput.py, used by it with --client node (a Python client process runs out
// of CPU near 4 000 sends/s, well before the server does).
//
//   node bench/node/sender.js --urls http://127.0.0.1:9001 --secret S --senders 64 \
//     --duration 8 --rooms own
//
// Sender i connects (websocket only) to urls[i % urls] and joins room "own": its own room,
// so nobody receives its messages; "shared": one room for all, each send delivered to the
// other senders. --window sends may be in flight per sender (default 1). Prints one JSON line:
//   sends, sends_per_s, ack_ms {p50, p99, max}, errors {code: count}
// and marks the counted window on stderr ("phase counting", "phase done").
"use strict";

const { parseOptions, clock, round2, quantile, openSocket } = require("./common");

const DEFAULTS = {
  urls: "http://127.0.0.1:9001", secret: "", senders: 32, duration: 8, rooms: "own",
  window: 1, text: 64, tag: "snd", warmup: 1,
};

async function main() {
  const opts = parseOptions(process.argv, DEFAULTS);
  const run = `${opts.tag}-${process.pid}`;
  const pad = "x".repeat(Math.max(0, opts.text - 24));
  const senders = await Promise.all(
    Array.from({ length: opts.senders }, async (_, i) => {
      const socket = await openSocket(opts.urls[i % opts.urls.length], `${run}-u${i}`, opts.secret);
      if (!socket) throw new Error(`sender ${i} could not connect`);
      const room = opts.rooms === "own" ? `${run}-r${i}` : `${run}-r`;
      const ack = await socket.timeout(20000).emitWithAck("room:join", { room });
      if (!ack || !ack.ok) throw new Error(`join refused: ${JSON.stringify(ack)}`);
      return { socket, room, index: i };
    }),
  );

  const latencies = [];
  const errors = {};
  let counting = false;
  let sends = 0;
  async function loop(sender, lane, stopAt) {
    for (let n = 0; clock() < stopAt; n++) {
      const t = clock();
      let ack;
      try {
        ack = await sender.socket.timeout(30000).emitWithAck("message:send", {
          room: sender.room, text: `${n} ${lane} ${sender.index} ${pad}`,
          client_id: `${run}-${sender.index}-${lane}-${n}`,
        });
      } catch {
        ack = { error: { code: "ack_timeout" } };
      }
      if (!counting) continue;
      if (ack && ack.ok) {
        sends++;
        latencies.push(clock() - t);
      } else {
        const code = (ack && ack.error && ack.error.code) || "no_ack";
        errors[code] = (errors[code] || 0) + 1;
      }
    }
  }
  const warmEnd = clock() + opts.warmup * 1000;
  const stopAt = warmEnd + opts.duration * 1000;
  const lanes = [];
  for (const sender of senders) {
    for (let lane = 0; lane < opts.window; lane++) lanes.push(loop(sender, lane, stopAt));
  }
  while (clock() < warmEnd) await new Promise((r) => setTimeout(r, 5));
  counting = true;
  process.stderr.write("phase counting\n"); // a caller samples CPU between the phase marks
  const start = clock();
  await Promise.all(lanes);
  const seconds = (Math.min(clock(), stopAt) - start) / 1000;
  process.stderr.write("phase done\n");
  for (const { socket } of senders) socket.close();
  latencies.sort((a, b) => a - b);
  console.log(JSON.stringify({
    senders: senders.length, window: opts.window, sends, sends_per_s: round2(sends / seconds),
    ack_ms: {
      p50: round2(quantile(latencies, 0.5)), p99: round2(quantile(latencies, 0.99)),
      max: round2(latencies[latencies.length - 1]),
    },
    errors,
  }));
  process.exit(0);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
