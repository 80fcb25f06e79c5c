// Edits, deletions, reactions, replies, mentions and the room list through socket.io-client.
// Input (argv[2], JSON): {url, room, alice: {token, transports?}, bob: {...}, carol: {...}}
// Carol joins no room: mentions still reach her. Prints everything seen as JSON.
const lib = require("./lib");

const input = JSON.parse(process.argv[2]);

const connect = (who) => lib.connect(input.url, who);
const { waitFor } = lib;

(async () => {
  const room = input.room;
  const alice = await connect(input.alice);
  const bob = await connect(input.bob);
  const carol = await connect(input.carol);
  const a = alice.session.user.id;
  const c = carol.session.user.id;
  const out = {};
  await alice.socket.emitWithAck("room:join", { room });
  out.joinBob = await bob.socket.emitWithAck("room:join", { room });
  out.send = await alice.socket.emitWithAck("message:send", { room, text: "hello", client_id: "s1" });
  const first = out.send.message;
  await waitFor(bob, "message:new");
  out.reply = await bob.socket.emitWithAck("message:send", {
    room, text: `yes @${a} and @${c}`, client_id: "s2", reply_to: first.id,
  });
  out.aliceMention = await waitFor(alice, "mention");
  out.carolMention = await waitFor(carol, "mention");
  out.edit = await alice.socket.emitWithAck("message:edit", { room, id: first.id, text: "hello, edited" });
  out.editAgain = await alice.socket.emitWithAck("message:edit", { room, id: first.id, text: "hello, edited" });
  out.bobUpdated = await waitFor(bob, "message:updated");
  out.bobReact = await bob.socket.emitWithAck("reaction:add", { room, id: first.id, emoji: "👍" });
  out.aliceReactions = await waitFor(alice, "message:reactions");
  out.aliceReact = await alice.socket.emitWithAck("reaction:add", { room, id: first.id, emoji: "👍" });
  out.delete = await bob.socket.emitWithAck("message:delete", { room, id: out.reply.message.id });
  out.aliceDeleted = await waitFor(alice, "message:deleted");
  out.editOthers = await alice.socket.emitWithAck("message:edit", { room, id: out.reply.message.id, text: "x" });
  out.editMissingRoom = await alice.socket.emitWithAck("message:edit", { room: `${room}-none`, id: first.id, text: "x" });
  out.longEmoji = await bob.socket.emitWithAck("reaction:add", { room, id: first.id, emoji: "x".repeat(33) });
  out.badId = await bob.socket.emitWithAck("message:delete", { room, id: "not an id" });
  out.history = await alice.socket.emitWithAck("message:history", { room });
  out.rooms = await bob.socket.emitWithAck("rooms:list", { limit: 5 });
  out.changes = await bob.socket.emitWithAck("message:changes", { room, after: 0 });
  await new Promise((r) => setTimeout(r, 300));
  out.bobUpdatedAll = bob.seen["message:updated"];
  out.carolNew = carol.seen["message:new"] || [];
  out.carolActivity = carol.seen["room:activity"] || [];
  out.bobActivity = bob.seen["room:activity"] || [];
  for (const client of [alice, bob, carol]) client.socket.close();
  process.stdout.write(JSON.stringify(out));
  process.exit(0);
})().catch((err) => { console.error(err); process.exit(1); });
