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

const { io } = require("socket.io-client");
const jwt = require("jsonwebtoken");

function options(argv) {
  const defaults = {
    urls: "http://127.0.0.1:9001", secret: "", senders: 32, duration: 8, rooms: "own",
    window: 1, text: 64, tag: "snd", warmup: 1,
  };
  const opts = { ...defaults };
  for (let i = 2; i < argv.length; i += 2) {
    const key = argv[i].replace(/^--/, "");
    if (!(key in defaults)) throw new Error(`unknown option --${key}`);
    opts[key] = typeof defaults[key] === "number" ? Number(argv[i + 1]) : argv[i + 1];
  }
  opts.urls = opts.urls.split(",").filter(Boolean);
  return opts;
}

const clock = () => performance.now();
const round2 = (x) => (x == null || Number.isNaN(x) ? null : Math.round(x * 100) / 100);
const quantile = (sorted, q) =>
  sorted.length ? sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))] : null;

function openSocket(url, user, secret) {
  const token = jwt.sign({ sub: user, name: user }, secret, { algorithm: "HS256", expiresIn: "2h" });
  const socket = io(`${url}/chat`, {
    transports: ["websocket"], auth: { token }, reconnection: false, timeout: 20000,
  });
  return new Promise((resolve, reject) => {
    socket.once("connect", () => resolve(socket));
    socket.once("connect_error", (err) => { socket.close(); reject(err); });
  });
}

async function main() {
  const opts = options(process.argv);
  const run = `${opts.tag}-${process.pid}`;
  const pad = "x".repeat(Math.max(0, opts.text - 24));
  const senders = await Promise.all(
    Array.from({ length: opts.senders }, async (_, i) => {
      const socket = await openSocket(opts.urls[i % opts.urls.length], `${run}-u${i}`, opts.secret);
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
