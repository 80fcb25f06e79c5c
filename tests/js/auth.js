// Connection attempts with socket.io-client; prints one JSON result per case.
// Input (argv[2], JSON): {url, cases: [{name, token, via: "auth"|"query"|"header"|"none", transports?}]}
const { io } = require("socket.io-client");

const input = JSON.parse(process.argv[2]);

function attempt(url, c) {
  return new Promise((resolve) => {
    const options = { transports: c.transports || ["websocket"], reconnection: false, timeout: 10000, forceNew: true };
    if (c.via === "auth") options.auth = { token: c.token };
    if (c.via === "query") options.query = { token: c.token };
    if (c.via === "header") options.extraHeaders = { Authorization: `Bearer ${c.token}` };
    const socket = io(`${url}/chat`, options);
    const timer = setTimeout(() => { socket.close(); resolve({ name: c.name, timeout: true }); }, 15000);
    socket.on("connect_error", (err) => {
      clearTimeout(timer);
      socket.close();
      resolve({ name: c.name, connected: false, message: err.message, data: err.data === undefined ? null : err.data,
                active: socket.active });
    });
    socket.on("session", (session) => {
      clearTimeout(timer);
      const id = socket.id;
      if (!c.waitDisconnect) {
        socket.close();
        resolve({ name: c.name, connected: true, session, id });
        return;
      }
      // Stay connected until the server ends the connection (e.g. at the token's exp).
      const expired = [];
      socket.on("auth:expired", (data) => expired.push(data));
      const connectedAt = Date.now() / 1000;
      socket.on("disconnect", (reason) => {
        resolve({ name: c.name, connected: true, session, id, disconnectReason: reason,
                  connectedAt, disconnectedAt: Date.now() / 1000, expired, active: socket.active });
        socket.close();
      });
    });
  });
}

(async () => {
  const results = [];
  for (const c of input.cases) results.push(await attempt(input.url, c));
  process.stdout.write(JSON.stringify(results));
  process.exit(0);
})().catch((err) => { console.error(err); process.exit(1); });
