// Two socket.io-client users chat in one room; prints everything they saw as JSON.
// Input (argv[2], JSON): {url, room, alice: {token, transports}, bob: {token, transports}}
const lib = require("./lib");

const input = JSON.parse(process.argv[2]);
const QUIET_MS = 300;

const connect = (who) => lib.connect(input.url, who);
const { waitFor } = lib;

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

(async () => {
  const room = input.room;
  const alice = await connect(input.alice);
  const bob = await connect(input.bob);
  const out = { sessions: { alice: alice.session, bob: bob.session } };
  out.transports = { alice: alice.socket.io.engine.transport.name, bob: bob.socket.io.engine.transport.name };
  out.sendBeforeJoin = await alice.socket.emitWithAck("message:send", { room, text: "early", client_id: "early" });
  out.joinAlice = await alice.socket.emitWithAck("room:join", { room });
  out.joinBob = await bob.socket.emitWithAck("room:join", { room });
  out.send = await alice.socket.emitWithAck("message:send", { room, text: "hello from js", client_id: "js-1" });
  out.bobReceived = await waitFor(bob, "message:new");
  out.repeat = await alice.socket.emitWithAck("message:send", { room, text: "hello from js", client_id: "js-1" });
  out.reply = await bob.socket.emitWithAck("message:send", { room, text: "hi alice", client_id: "js-2" });
  out.aliceReceived = await waitFor(alice, "message:new");
  out.typing = await bob.socket.emitWithAck("typing", { room, typing: true });
  out.aliceTyping = await waitFor(alice, "typing");
  out.read = await alice.socket.emitWithAck("message:read", { room, seq: 2 });
  out.bobRead = await waitFor(bob, "message:read");
  out.tooLong = await alice.socket.emitWithAck("message:send", { room, text: "x".repeat(4001), client_id: "js-3" });
  out.empty = await alice.socket.emitWithAck("message:send", { room, text: "   ", client_id: "js-4" });
  out.unknown = await alice.socket.emitWithAck("no:such:event", { room });
  out.notObject = await alice.socket.emitWithAck("room:join", "just a string");
  out.history = await bob.socket.emitWithAck("message:history", { room });
  out.historyBefore = await bob.socket.emitWithAck("message:history", { room, before: 2, limit: 1 });
  out.badLimit = await bob.socket.emitWithAck("message:history", { room, limit: 0 });
  out.members = await bob.socket.emitWithAck("room:members", { room });
  out.presence = await bob.socket.emitWithAck("presence:subscribe", { users: [alice.session.user.id] });
  out.leave = await bob.socket.emitWithAck("room:leave", { room });
  await alice.socket.emitWithAck("message:send", { room, text: "after bob left", client_id: "js-5" });
  await sleep(QUIET_MS);
  out.bobAllMessages = bob.seen["message:new"];
  out.aliceAllMessages = alice.seen["message:new"];
  out.aliceTypingAll = alice.seen["typing"];
  out.bobTypingAll = bob.seen["typing"] || [];
  alice.socket.close();
  bob.socket.close();
  process.stdout.write(JSON.stringify(out));
  process.exit(0);
})().catch((err) => { console.error(err); process.exit(1); });
