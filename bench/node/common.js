// Shared by the load programs of bench/node: option parsing, sockets, figures.
"use strict";

const { io } = require("socket.io-client");
const jwt = require("jsonwebtoken");

// --key value pairs over `defaults` (numbers stay numbers); an unknown key is an error.
function parseOptions(argv, defaults) {
  const opts = { ...defaults };
  for (let i = 2; i < argv.length; i += 2) {
    const key = argv[i].replace(/^--/, "");
    if (!(key in defaults)) throw new Error(`unknown option --${key}`);
    opts[key] = typeof defaults[key] === "number" ? Number(argv[i + 1]) : argv[i + 1];
  }
  opts.urls = String(opts.urls).split(",").filter(Boolean);
  return opts;
}

const clock = () => performance.now();
const pause = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const round2 = (x) => (x == null || Number.isNaN(x) ? null : Math.round(x * 100) / 100);
const quantile = (sorted, q) =>
  sorted.length ? sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))] : null;

// A websocket-only /chat socket for `user` with a token signed by `secret`; null if refused.
function openSocket(url, user, secret) {
  const token = jwt.sign({ sub: user, name: user }, secret, { algorithm: "HS256", expiresIn: "2h" });
  const socket = io(`${url}/chat`, {
    transports: ["websocket"], auth: { token }, reconnection: false, timeout: 20000,
  });
  return new Promise((resolve) => {
    socket.once("connect", () => resolve(socket));
    socket.once("connect_error", () => { socket.close(); resolve(null); });
  });
}

module.exports = { parseOptions, clock, pause, round2, quantile, openSocket };
