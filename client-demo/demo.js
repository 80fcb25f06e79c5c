// Demo client of the chat protocol (docs/protocol.md): token, session, rooms, messages,
// read markers, typing and presence. Plain browser JavaScript, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { socket: null, me: null, room: null, lastSeq: 0, typingTimer: null, typists: new Map() };

function setStatus(text, ok) {
  $("status").textContent = text;
  $("status").className = "status " + (ok ? "ok" : "bad");
}

function clientId() {
  return (crypto.randomUUID && crypto.randomUUID()) || String(Date.now()) + Math.random();
}

function showMessage(message) {
  if (message.room !== state.room || document.querySelector(`[data-seq="${message.seq}"]`)) return;
  const item = document.createElement("li");
  item.dataset.seq = message.seq;
  const who = document.createElement("b");
  who.textContent = message.sender.name;
  const time = document.createElement("time");
  time.textContent = new Date(message.created_at).toLocaleTimeString();
  item.append(who, " ", document.createTextNode(message.text), " ", time);
  const list = $("messages");
  const after = [...list.children].find((li) => Number(li.dataset.seq) > message.seq);
  list.insertBefore(item, after || null);
  list.scrollTop = list.scrollHeight;
  state.lastSeq = Math.max(state.lastSeq, message.seq);
}

async function call(event, payload) {
  const ack = await state.socket.timeout(10000).emitWithAck(event, payload);
  if (!ack.ok) throw new Error(`${event}: ${ack.error.code} — ${ack.error.message}`);
  return ack;
}

async function refreshMembers() {
  const { members } = await call("room:members", { room: state.room });
  const list = $("members");
  list.replaceChildren(...members.map((m) => {
    const li = document.createElement("li");
    li.dataset.user = m.id;
    li.textContent = `${m.id} — ${m.status}`;
    li.className = m.status;
    return li;
  }));
  await call("presence:subscribe", { users: members.map((m) => m.id).slice(0, 500) });
}

async function joinRoom(room) {
  const first = state.room !== room;
  if (first && state.room) await call("room:leave", { room: state.room });
  state.room = room;
  const since = first ? undefined : state.lastSeq;
  const joined = await call("room:join", since === undefined ? { room } : { room, since });
  if (first) {
    $("messages").replaceChildren();
    state.lastSeq = 0;
    const { messages } = await call("message:history", { room, limit: 50 });
    messages.forEach(showMessage);
  } else {
    joined.missed.forEach(showMessage);
  }
  $("room-info").textContent = `${joined.room.kind} · last seq ${joined.last_seq}`;
  $("text").disabled = false;
  document.querySelector("#send-form button").disabled = false;
  await refreshMembers();
  if (state.lastSeq > 0) await call("message:read", { room, seq: state.lastSeq });
}

function connect(token) {
  const socket = io("/chat", { auth: { token } });
  state.socket = socket;
  socket.on("session", async (session) => {
    state.me = session.user;
    setStatus(`${session.user.name} on ${session.instance_id}`, true);
    if (state.room) await joinRoom(state.room).catch(report);  // back after a reconnect
  });
  socket.on("connect_error", (err) => setStatus(`refused: ${err.message} ${JSON.stringify(err.data || {})}`, false));
  socket.on("disconnect", (reason) => setStatus(`disconnected (${reason}), reconnecting…`, false));
  socket.on("message:new", (message) => {
    if (message.room === state.room && message.seq > state.lastSeq + 1) {  // a hole: fetch it
      call("message:history", { room: state.room, after: state.lastSeq, limit: 100 })
        .then(({ messages }) => messages.forEach(showMessage)).catch(report);
    }
    showMessage(message);
    if (!document.querySelector(`#members [data-user="${CSS.escape(message.sender.id)}"]`)) {
      refreshMembers().catch(report);  // a member we have not listed yet
    }
    if (document.visibilityState === "visible") call("message:read", { room: message.room, seq: message.seq }).catch(() => {});
  });
  socket.on("typing", ({ room, user, typing }) => {
    if (room !== state.room) return;
    typing ? state.typists.set(user, Date.now()) : state.typists.delete(user);
    const names = [...state.typists.keys()];
    $("typing").textContent = names.length ? `${names.join(", ")} typing…` : "";
  });
  socket.on("presence", ({ user, status }) => {
    const li = document.querySelector(`#members [data-user="${CSS.escape(user)}"]`);
    if (li) { li.textContent = `${user} — ${status}`; li.className = status; }
  });
  socket.on("room:removed", ({ room }) => {
    if (room === state.room) { setStatus(`removed from ${room}`, false); state.room = null; }
  });
}

function report(error) {
  setStatus(error.message, false);
}

$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const body = { user: $("user").value.trim() };
  if ($("name").value.trim()) body.name = $("name").value.trim();
  const response = await fetch("/api/dev/token", {
    method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body),
  });
  if (!response.ok) return setStatus(`token refused (${response.status})`, false);
  const { token } = await response.json();
  $("login").hidden = true;
  $("chat").hidden = false;
  connect(token);
});

$("join-form").addEventListener("submit", (event) => {
  event.preventDefault();
  joinRoom($("room").value.trim()).catch(report);
});

$("send-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = $("text").value;
  if (!text.trim() || !state.room) return;
  const id = clientId();
  try {
    let ack = await state.socket.timeout(10000).emitWithAck("message:send", { room: state.room, text, client_id: id });
    if (!ack.ok && ack.error.code === "unavailable") {  // safe to retry with the same client_id
      ack = await state.socket.timeout(10000).emitWithAck("message:send", { room: state.room, text, client_id: id });
    }
    if (!ack.ok) throw new Error(`${ack.error.code}: ${ack.error.message}`);
    showMessage(ack.message);
    $("text").value = "";
    if (state.typingTimer) {  // sent: no longer typing
      clearTimeout(state.typingTimer);
      state.typingTimer = null;
      state.socket.emit("typing", { room: state.room, typing: false }, () => {});
    }
  } catch (error) {
    report(error);
  }
});

$("text").addEventListener("input", () => {
  if (!state.room) return;
  if (!state.typingTimer) state.socket.emit("typing", { room: state.room, typing: true }, () => {});
  clearTimeout(state.typingTimer);
  state.typingTimer = setTimeout(() => {
    state.typingTimer = null;
    state.socket.emit("typing", { room: state.room, typing: false }, () => {});
  }, 1500);
});
