// Opens --clients idle websocket connections to --url (namespace /chat), 100 at a time, prints
// one JSON line {ok, bad, connect_s} once all have answered, then holds them until killed, so
// that the caller can read the server's memory with every connection open.
//
//   node bench/node/idle.js --url http://127.0.0.1:9001 --clients 5000 --secret S
"use strict";

const { io } = require("socket.io-client");
const jwt = require("jsonwebtoken");

const opts = { url: "http://127.0.0.1:9001", clients: 5000, secret: "", batch: 100 };
for (let i = 2; i < process.argv.length; i += 2) {
  const key = process.argv[i].replace(/^--/, "");
  if (!(key in opts)) throw new Error(`unknown option --${key}`);
  opts[key] = typeof opts[key] === "number" ? Number(process.argv[i + 1]) : process.argv[i + 1];
}

function hold(i) {
  const token = jwt.sign({ sub: `idle${i}` }, opts.secret, { algorithm: "HS256", expiresIn: "2h" });
  const socket = io(`${opts.url}/chat`, { transports: ["websocket"], reconnection: false, auth: { token } });
  return new Promise((resolve) => {
    socket.once("connect", () => resolve(true));
    socket.once("connect_error", () => resolve(false));
  });
}

(async () => {
  const began = Date.now();
  let ok = 0;
  let bad = 0;
  for (let first = 0; first < opts.clients; first += opts.batch) {
    const count = Math.min(opts.batch, opts.clients - first);
    const results = await Promise.all(Array.from({ length: count }, (_, k) => hold(first + k)));
    for (const connected of results) connected ? ok++ : bad++;
  }
  console.log(JSON.stringify({ ok, bad, connect_s: (Date.now() - began) / 1000 }));
  setInterval(() => {}, 1 << 30); // keep the sockets open until killed
})();
