// Open-loop load for any server speaking the chat protocol's core (docs/protocol.md): connect,
// room:join, message:send with ack, message:new. The same program drives the chat server and
// the Node reference, so the two sides differ only in the server.
//
//   node bench/node/loadgen.js --urls http://127.0.0.1:9001,http://127.0.0.1:9002 \
//     --secret S --clients 1000 --rooms 10 --rate 200 --duration 8
//
// Client i connects (websocket only) to urls[i % urls] and joins room i % rooms. The first
// --senders clients (default: one per room) take turns sending, --rate messages per second in
// all whatever the acks do, for --duration seconds. Each message carries its send time; every
// receiver measures send -> message:new on this process's single monotonic clock. After the
// last send it waits for every ack (each at most --ack-timeout s) and then for the missing
// deliveries (at most --drain s). Prints one JSON line:
//   delivered_per_s  deliveries received / (first send .. end of the wait)
//   lat_ms           send -> message:new, over every delivery
//   ack_ms           send -> ack of successful sends
//   loss             1 - received / expected (expected: room members other than the sender)
"use strict";

const { parseOptions, clock, pause, round2, quantile, openSocket } = require("./common");

function options(argv) {
  const opts = parseOptions(argv, {
    urls: "http://127.0.0.1:9001", secret: "", clients: 1000, rooms: 10, rate: 100,
    duration: 8, senders: 0, batch: 50, tag: "run", "ack-timeout": 10, drain: 10,
  });
  opts.senders = opts.senders || opts.rooms;
  return opts;
}

// Phase marks on stderr let a caller sample CPU and Redis counters between phases.
const phase = (name) => process.stderr.write(`phase ${name}\n`);

async function call(socket, event, payload, seconds) {
  try {
    return await socket.timeout(seconds * 1000).emitWithAck(event, payload);
  } catch {
    return null; // no ack in time
  }
}

async function main() {
  const opts = options(process.argv);
  const run = `${opts.tag}-${process.pid}`;

  // connect in batches, keeping each client's index (and so its room and instance)
  const began = clock();
  const members = []; // {socket, room}
  let connectErrors = 0;
  for (let first = 0; first < opts.clients; first += opts.batch) {
    const last = Math.min(opts.clients, first + opts.batch);
    const batch = [];
    for (let i = first; i < last; i++) {
      batch.push(openSocket(opts.urls[i % opts.urls.length], `lg${i}`, opts.secret).then((socket) => {
        if (socket) members.push({ index: i, socket, room: `lg-${run}-${i % opts.rooms}` });
        else connectErrors++;
      }));
    }
    await Promise.all(batch);
  }
  members.sort((a, b) => a.index - b.index);
  const connectSeconds = (clock() - began) / 1000;
  phase("connected");

  const latencies = [];
  let received = 0;
  for (const { socket } of members) {
    socket.on("message:new", (message) => {
      received++;
      const sentAt = parseFloat(String(message.text));
      if (sentAt > 0) latencies.push(clock() - sentAt);
    });
  }
  const joins = await Promise.all(members.map((m) => call(m.socket, "room:join", { room: m.room }, 20)));
  const joinErrors = joins.filter((ack) => !ack || !ack.ok).length;
  const roomSize = new Map();
  for (const m of members) roomSize.set(m.room, (roomSize.get(m.room) || 0) + 1);
  const senders = members.slice(0, Math.min(opts.senders, members.length));
  phase("joined");
  await pause(500);

  // open loop: every send that is due goes out, at most 50 per turn of the event loop
  const ackLatencies = [];
  const acks = [];
  let sent = 0, ackErrors = 0, expected = 0;
  const period = 1000 / opts.rate;
  phase("sending");
  const start = clock();
  const stop = start + opts.duration * 1000;
  let due = start;
  while (clock() < stop && senders.length) {
    let burst = 0;
    while (due <= clock() && burst < 50) {
      const sender = senders[sent % senders.length];
      const t = clock();
      const n = sent;
      expected += roomSize.get(sender.room) - 1;
      acks.push(call(sender.socket, "message:send",
        { room: sender.room, text: `${t}|load ${n}`, client_id: `${run}-${n}` }, opts["ack-timeout"])
        .then((ack) => { if (ack && ack.ok) ackLatencies.push(clock() - t); else ackErrors++; }));
      sent++;
      burst++;
      due += period;
    }
    await pause(Math.max(0, Math.min(due, stop) - clock()));
  }
  const sendSeconds = (clock() - start) / 1000;
  await Promise.all(acks);
  const drainUntil = clock() + opts.drain * 1000;
  while (received < expected && clock() < drainUntil) await pause(20);
  const seconds = (clock() - start) / 1000;
  phase("sent");

  for (const { socket } of members) socket.close();
  latencies.sort((a, b) => a - b);
  ackLatencies.sort((a, b) => a - b);
  console.log(JSON.stringify({
    urls: opts.urls.length, clients: members.length, connect_errors: connectErrors,
    join_errors: joinErrors, connect_s: round2(connectSeconds), rooms: opts.rooms,
    senders: senders.length, rate_target: opts.rate, sent, send_rate: round2(sent / sendSeconds),
    ack_errors: ackErrors, expected, received,
    loss: expected ? round2(1 - received / expected) : null,
    delivered_per_s: round2(received / seconds),
    lat_ms: {
      p50: round2(quantile(latencies, 0.5)), p90: round2(quantile(latencies, 0.9)),
      p99: round2(quantile(latencies, 0.99)), max: round2(latencies[latencies.length - 1]),
    },
    ack_ms: { p50: round2(quantile(ackLatencies, 0.5)), p99: round2(quantile(ackLatencies, 0.99)) },
  }));
  process.exit(0);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
