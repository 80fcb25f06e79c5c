// Helpers shared by the JS client scripts: connect one user and wait for events.
const { io } = require("socket.io-client");

// Connects `who` ({token, transports?}) to `url`/chat; resolves once `session` arrived.
// `seen` records every event by name, in arrival order.
function connect(url, who) {
  return new Promise((resolve, reject) => {
    const socket = io(`${url}/chat`, {
      auth: { token: who.token }, transports: who.transports || ["websocket"],
      reconnection: false, forceNew: true,
    });
    const seen = {};
    socket.onAny((event, data) => { (seen[event] = seen[event] || []).push(data); });
    socket.once("session", (session) => resolve({ socket, seen, session }));
    socket.once("connect_error", (err) => reject(new Error(`connect_error ${err.message}`)));
  });
}

function waitFor(client, event, count = 1, ms = 10000) {
  return new Promise((resolve, reject) => {
    const started = Date.now();
    const poll = () => {
      const got = client.seen[event] || [];
      if (got.length >= count) return resolve(got.slice()); // what had arrived by then
      if (Date.now() - started > ms) return reject(new Error(`timeout waiting for ${event}`));
      setTimeout(poll, 10);
    };
    poll();
  });
}

module.exports = { connect, waitFor };
