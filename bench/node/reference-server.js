// The Node yardstick of the side-by-side benchmark: Socket.IO 4.8 with @socket.io/redis-adapter,
// serving the part of docs/protocol.md that the load generator uses, and nothing more:
//   - namespace /chat, a JWT (HS256) in the handshake's auth.token, refused with
//     {code: missing_token | invalid_token | token_expired} like the chat server;
//   - room:join {room}              -> ack {ok, room, last_seq, missed: [], has_more: false}
//   - message:send {room, text, client_id} -> seq from Redis INCR (nothing is persisted),
//     message:new to the room's other sockets on every instance, then ack {ok, message};
//   - GET /api/health.
// Settings from the environment: PORT, REDIS_URL, JWT_SECRET, INSTANCE_ID.
"use strict";

const http = require("node:http");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");
const { createClient } = require("redis");
const jwt = require("jsonwebtoken");

const config = {
  port: Number(process.env.PORT || 9300),
  redisUrl: process.env.REDIS_URL || "redis://127.0.0.1:6379",
  secret: process.env.JWT_SECRET || "",
  instanceId: process.env.INSTANCE_ID || `node-ref-${process.pid}`,
};

function refusal(code) {
  const error = new Error("unauthorized");
  error.data = { code };
  return error;
}

function authenticate(socket, next) {
  const token = socket.handshake.auth && socket.handshake.auth.token;
  if (!token) return next(refusal("missing_token"));
  let claims;
  try {
    claims = jwt.verify(token, config.secret, { algorithms: ["HS256"] });
  } catch (err) {
    return next(refusal(err.name === "TokenExpiredError" ? "token_expired" : "invalid_token"));
  }
  socket.data.user = { id: claims.sub, name: claims.name || claims.sub };
  return next();
}

const badRequest = { ok: false, error: { code: "bad_request", message: "bad payload" } };
const channel = (room) => `room:${room}`;

function onConnection(socket, redis) {
  socket.emit("session", {
    user: socket.data.user,
    sid: socket.id,
    instance_id: config.instanceId,
    server_time: new Date().toISOString(),
  });

  socket.on("room:join", async (payload, ack) => {
    const reply = typeof ack === "function" ? ack : () => {};
    if (!payload || typeof payload.room !== "string" || !payload.room) return reply(badRequest);
    socket.join(channel(payload.room));
    const lastSeq = Number(await redis.get(`seq:${payload.room}`)) || 0;
    return reply({
      ok: true,
      room: { id: payload.room, kind: "public", name: payload.room },
      last_seq: lastSeq,
      missed: [],
      has_more: false,
    });
  });

  socket.on("message:send", async (payload, ack) => {
    const reply = typeof ack === "function" ? ack : () => {};
    const valid =
      payload && typeof payload.room === "string" && typeof payload.text === "string";
    if (!valid || !socket.rooms.has(channel(payload.room))) return reply(badRequest);
    const seq = await redis.incr(`seq:${payload.room}`);
    const message = {
      id: `${payload.room}:${seq}`,
      room: payload.room,
      seq,
      sender: socket.data.user,
      text: payload.text,
      client_id: payload.client_id,
      created_at: new Date().toISOString(),
    };
    socket.to(channel(payload.room)).emit("message:new", message);
    return reply({ ok: true, message });
  });
}

async function main() {
  const publisher = createClient({ url: config.redisUrl });
  const subscriber = publisher.duplicate();
  const commands = publisher.duplicate();
  await Promise.all([publisher.connect(), subscriber.connect(), commands.connect()]);

  const httpServer = http.createServer((req, res) => {
    if (req.method === "GET" && req.url === "/api/health") {
      res.writeHead(200, { "content-type": "application/json" });
      res.end(JSON.stringify({ status: "healthy", instance_id: config.instanceId }));
      return;
    }
    res.writeHead(404);
    res.end();
  });
  const io = new Server(httpServer, {
    adapter: createAdapter(publisher, subscriber),
    cors: { origin: "*" },
  });
  const chat = io.of("/chat");
  chat.use(authenticate);
  chat.on("connection", (socket) => onConnection(socket, commands));

  const stop = () => io.close(() => process.exit(0));
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
  httpServer.listen(config.port, "127.0.0.1", () =>
    console.log(JSON.stringify({ event: "listening", instance_id: config.instanceId, port: config.port })),
  );
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
