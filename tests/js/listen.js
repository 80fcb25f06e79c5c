// One socket.io-client user joins a room, prints "ready", then prints the first
// `count` events named `event` as JSON (or exits 1 after `ms`).
// Input (argv[2], JSON): {url, token, room, event, count, ms, transports}
const { io } = require("socket.io-client");

const input = JSON.parse(process.argv[2]);
const socket = io(`${input.url}/chat`, {
  auth: { token: input.token }, transports: input.transports || ["websocket"],
  reconnection: false, forceNew: true,
});
const seen = [];
socket.on(input.event, (data) => {
  seen.push(data);
  if (seen.length >= (input.count || 1)) {
    process.stdout.write(JSON.stringify(seen) + "\n");
    socket.close();
    process.exit(0);
  }
});
socket.once("connect_error", (err) => { console.error(`connect_error ${err.message}`); process.exit(1); });
socket.once("session", async () => {
  const ack = await socket.emitWithAck("room:join", { room: input.room });
  if (!ack.ok) { console.error(JSON.stringify(ack)); process.exit(1); }
  process.stdout.write("ready\n");
});
setTimeout(() => { console.error(`timeout: ${JSON.stringify(seen)}`); process.exit(1); }, input.ms || 15000);
