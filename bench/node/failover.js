// Failover: --clients sockets on --url, whose instance the caller then kills; each socket that
// drops opens a new one to --fallback (what a load balancer does with a dead backend), after
// a random delay in [0, --spread-ms) like socket.io-client's randomized reconnection delay.
// An observer on --fallback follows the presence of the first --observe users from the start
// and counts every presence event about them until --watch seconds after the last socket
// came back: with no flap there is none (an instance that dies is detected after three
// missed heartbeats, and its users' connections elsewhere keep them online).
//
//   node bench/node/failover.js --url http://127.0.0.1:9001 --fallback http://127.0.0.1:9002 \
//     --clients 5000 --secret S --watch 150
//
// stderr: "phase ready" once every socket is connected (kill the instance then).
// stdout: one JSON line with the reconnection times and the presence events seen.
"use strict";

const { io } = require("socket.io-client");
const jwt = require("jsonwebtoken");

const opts = {
  url: "", fallback: "", clients: 5000, secret: "", observe: 500, watch: 150,
  "spread-ms": 1000, batch: 100, "give-up": 300,
};
for (let i = 2; i < process.argv.length; i += 2) {
  const key = process.argv[i].replace(/^--/, "");
  if (!(key in opts)) throw new Error(`unknown option --${key}`);
  opts[key] = typeof opts[key] === "number" ? Number(process.argv[i + 1]) : process.argv[i + 1];
}

const clock = () => performance.now();
const pause = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const round2 = (x) => (x == null ? null : Math.round(x * 100) / 100);
const quantile = (sorted, q) =>
  sorted.length ? sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))] : null;
const token = (user) => jwt.sign({ sub: user, name: user }, opts.secret, { algorithm: "HS256", expiresIn: "2h" });

function open(url, user) {
  const socket = io(`${url}/chat`, {
    transports: ["websocket"], auth: { token: token(user) }, reconnection: false, timeout: 60000,
  });
  return new Promise((resolve) => {
    // a server may close a transport whose namespace connect it could not answer in time;
    // the client then hears neither connect nor connect_error: give up on it after 30 s
    const timer = setTimeout(() => { socket.close(); resolve(null); }, 30000);
    socket.once("connect", () => { clearTimeout(timer); resolve(socket); });
    socket.once("connect_error", () => { clearTimeout(timer); socket.close(); resolve(null); });
  });
}

async function main() {
  const users = Array.from({ length: opts.clients }, (_, i) => `fo${i}`);
  const observed = new Set(users.slice(0, opts.observe));
  const presenceEvents = [];
  const observer = await open(opts.fallback, "fo-observer");
  if (!observer) throw new Error("the observer could not connect");
  observer.on("presence", (event) => {
    if (observed.has(event.user)) presenceEvents.push({ ...event, at_ms: clock() });
  });

  let firstDrop = null;
  let refused = 0;
  const back = []; // ms from the first drop to each reconnection
  let openFailures = 0;
  const watchOne = (socket, user) => {
    socket.once("disconnect", async () => {
      if (firstDrop === null) firstDrop = clock();
      await pause(Math.random() * opts["spread-ms"]);
      for (let attempt = 0; ; attempt++) {
        const again = await open(opts.fallback, user);
        if (again) { back.push(clock() - firstDrop); return; }
        refused++;
        if (clock() - firstDrop > opts["give-up"] * 1000) return;
        await pause(Math.min(5000, 500 * 2 ** attempt) * (0.5 + Math.random()));
      }
    });
  };
  for (let first = 0; first < users.length; first += opts.batch) {
    const batch = users.slice(first, first + opts.batch);
    const sockets = await Promise.all(batch.map((user) => open(opts.url, user)));
    sockets.forEach((socket, k) => (socket ? watchOne(socket, batch[k]) : openFailures++));
  }
  const list = [...observed];
  for (let first = 0; first < list.length; first += 500) {
    await observer.timeout(20000).emitWithAck("presence:subscribe", { users: list.slice(first, first + 500) });
  }
  const connected = users.length - openFailures;
  process.stderr.write("phase ready\n");

  while (back.length < connected && (firstDrop === null || clock() - firstDrop < opts["give-up"] * 1000)) {
    await pause(100);
  }
  const allBack = back.length ? Math.max(...back) : null;
  process.stderr.write("phase back\n");
  await pause(opts.watch * 1000);
  let online = 0;
  for (let first = 0; first < list.length; first += 500) {
    const ack = await observer.timeout(20000).emitWithAck("presence:subscribe", { users: list.slice(first, first + 500) });
    online += Object.values((ack && ack.presence) || {}).filter((p) => p.status === "online").length;
  }
  back.sort((a, b) => a - b);
  console.log(JSON.stringify({
    clients: connected, connect_failures: openFailures, reconnected: back.length, refused_attempts: refused,
    all_back_s: round2(allBack / 1000),
    back_ms: { p50: round2(quantile(back, 0.5)), p90: round2(quantile(back, 0.9)), p99: round2(quantile(back, 0.99)) },
    observed: list.length, presence_events: presenceEvents.length,
    offline_events: presenceEvents.filter((e) => e.status === "offline").length,
    online_after_watch: online, watch_s: opts.watch,
  }));
  process.exit(0);
}

main().catch((err) => { console.error(err); process.exit(1); });
