// The demo client of docs/protocol.md: rooms with unread badges, a conversation with
// optimistic sends, edits, deletes, reactions, replies and mentions, presence, typing,
// read markers across tabs, and recovery after a reconnect. Plain JavaScript, no build.
"use strict";

const $ = (id) => document.getElementById(id);
const QUICK_REACTIONS = ["👍", "❤️", "😂", "🎉"];
const GROUP_GAP_MS = 5 * 60 * 1000;

const S = {
  socket: null, me: null, instance: null, token: null, tokenExp: 0, devTokens: false,
  rooms: new Map(), current: null, views: new Map(), replyTo: null,
  typists: new Map(), typingSentAt: 0, typingStop: null, members: new Map(), followed: new Set(),
  readTimer: null, visible: new Set(), refreshTimer: null, membersTimer: null,
};
const MEMBERS_POLL_MS = 5000;  // public rooms announce no joins: the pane re-reads its list
window.chat = S;  // for the browser tests and the curious

// ------------------------------------------------------------------ helpers
function uuid() {
  return (crypto.randomUUID && crypto.randomUUID()) || `${Date.now()}-${Math.random()}`;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

async function call(event, payload, ms = 10000) {
  const ack = await S.socket.timeout(ms).emitWithAck(event, payload);
  if (!ack.ok) {
    const error = new Error(`${event}: ${ack.error.message}`);
    error.code = ack.error.code;
    throw error;
  }
  return ack;
}

function report(where, error) {
  $(where).textContent = error ? String(error.message || error) : "";
}

function banner(state) {
  const node = $("banner");
  node.className = `banner ${state}`;
  node.textContent = state;
}

function tokenExpiry(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part)).exp * 1000;
  } catch {
    return 0;
  }
}

function view(room) {
  if (!S.views.has(room)) {
    S.views.set(room, {
      room, messages: new Map(), lastSeq: 0, changeSeq: 0, hasOlder: true,
      loadingOlder: false, readSent: 0, joined: false, pending: new Map(), kind: "public",
    });
  }
  return S.views.get(room);
}

function roomLabel(entry) {
  if (!entry) return "";
  if (entry.peer) return entry.peer.name || entry.peer.id;
  return entry.room.name || entry.room.id;
}

// ------------------------------------------------------------------ sign-in and connection
async function devToken(user, name) {
  const response = await fetch("/api/dev/token", {
    method: "POST", headers: { "content-type": "application/json" },
    body: JSON.stringify(name ? { user, name } : { user }),
  });
  if (!response.ok) throw new Error(`development tokens: HTTP ${response.status}`);
  return (await response.json()).token;
}

function connect(token) {
  S.token = token;
  S.tokenExp = tokenExpiry(token);
  banner("connecting");
  const socket = io("/chat", { auth: (cb) => cb({ token: S.token }) });
  S.socket = socket;
  socket.on("session", (session) => onSession(session).catch((e) => report("sidebar-error", e)));
  socket.on("connect_error", (err) => {
    const code = err.data && err.data.code;
    report("login-error", code ? `refused: ${code}` : err);
    banner(willRetry(socket) ? "reconnecting" : "offline");
  });
  socket.on("disconnect", () => banner(willRetry(socket) ? "reconnecting" : "offline"));
  socket.io.on("reconnect_attempt", () => banner("reconnecting"));
  socket.on("session:closed", (data) => report("sidebar-error", `closed by the server: ${data.reason}`));
  socket.on("auth:expired", () => report("sidebar-error", "your token expired"));
  socket.on("room:activity", onActivity);
  socket.on("room:read", onRoomRead);
  socket.on("mention", onMention);
  socket.on("message:new", onMessage);
  socket.on("message:updated", (d) => onChange(d, applyUpdate));
  socket.on("message:deleted", (d) => onChange(d, applyDelete));
  socket.on("message:reactions", (d) => onChange(d, applyReactions));
  socket.on("message:read", () => {});
  socket.on("typing", onTyping);
  socket.on("presence", onPresence);
  socket.on("room:removed", ({ room }) => {
    S.rooms.delete(room);
    if (S.current === room) S.current = null;
    renderRooms();
    renderConversation();
  });
}

/** Whether socket.io-client will try again by itself after a lost or refused connection. */
function willRetry(socket) {
  return socket.active && socket.io.reconnection() && navigator.onLine !== false;
}

window.addEventListener("offline", () => banner("offline"));
window.addEventListener("online", () => S.socket && !S.socket.connected && banner("reconnecting"));

async function onSession(session) {
  S.me = session.user;
  S.instance = session.instance_id;
  $("whoami").textContent = `${session.user.name} · instance ${session.instance_id}`;
  $("whoami").dataset.instance = session.instance_id;
  banner("connected");
  report("login-error");
  $("login").hidden = true;
  $("app").hidden = false;
  scheduleRefresh();
  for (const v of S.views.values()) v.joined = false;  // a new connection joined nothing
  S.followed = new Set();  // nor follows anyone's presence
  await loadRooms();
  if (S.current) await openRoom(S.current);  // recovers what it missed: since, changes_since
}

function scheduleRefresh() {
  clearTimeout(S.refreshTimer);
  if (!S.tokenExp) return;
  const wait = Math.max(1000, S.tokenExp - Date.now() - 60_000);
  S.refreshTimer = setTimeout(refreshToken, wait);
}

async function refreshToken() {
  if (!S.devTokens) {
    report("sidebar-error", "your token expires within a minute: sign in again");
    return;
  }
  try {
    const token = await devToken(S.me.id, S.me.name);
    await call("auth:refresh", { token });
    S.token = token;
    S.tokenExp = tokenExpiry(token);
  } catch (error) {
    report("sidebar-error", error);
  }
  scheduleRefresh();
}

// ------------------------------------------------------------------ room list
async function loadRooms() {
  const rooms = [];
  let cursor = null;
  do {
    const page = await call("rooms:list", cursor ? { limit: 100, cursor } : { limit: 100 });
    rooms.push(...page.rooms);
    cursor = page.cursor;
  } while (cursor && rooms.length < 500);
  S.rooms = new Map(rooms.map((r) => [r.room.id, r]));
  renderRooms();
}

function renderRooms() {
  const entries = [...S.rooms.values()].sort((a, b) =>
    (b.activity_at || "").localeCompare(a.activity_at || "") || a.room.id.localeCompare(b.room.id));
  $("rooms").replaceChildren(...entries.map((entry) => {
    const id = entry.room.id;
    const unread = S.current === id ? 0 : entry.unread;
    const mentions = S.current === id ? 0 : entry.unread_mentions;
    const preview = entry.last_message
      ? `${entry.last_message.sender.name}: ${entry.last_message.deleted ? "(deleted)" : entry.last_message.text}`
      : "no messages yet";
    const label = `${roomLabel(entry)}${unread ? `, ${unread} unread` : ""}${mentions ? `, ${mentions} mentions` : ""}`;
    return el("li", { dataset: { room: id } },
      el("button", {
        type: "button", "aria-current": S.current === id ? "true" : "false", "aria-label": label,
        onclick: () => openRoom(id).catch((e) => report("sidebar-error", e)),
      },
      el("span", { class: "name" }, entry.room.kind === "private" ? "🔒 " : entry.room.kind === "direct" ? "@ " : "# ",
        roomLabel(entry), el("span", { class: "preview" }, preview)),
      mentions ? el("span", { class: "badge mention", dataset: { kind: "mentions" } }, `@${mentions}`) : null,
      unread ? el("span", { class: "badge", dataset: { kind: "unread" } }, String(unread)) : null));
  }));
}

/**
 * A new message in a room, for the sidebar: from room:activity (rooms this tab has not
 * joined), message:new (rooms it has) or the ack of its own send; the server sends each
 * message to a connection one of these ways, never two.
 */
function onActivity({ room, last_seq, message }) {
  const entry = S.rooms.get(room);
  if (!entry) {
    loadRooms().catch((e) => report("sidebar-error", e));
    return;
  }
  if (last_seq <= entry.last_seq) return;  // heard of already, or an older one filled in after a gap
  entry.last_seq = last_seq;
  entry.last_message = message;
  entry.activity_at = message.created_at;
  const mine = message.sender.id === S.me.id;
  const reading = S.current === room && document.visibilityState === "visible";
  if (!mine && !reading && message.seq > entry.read_seq) entry.unread += 1;
  renderRooms();
}

function onRoomRead({ room, seq, unread, unread_mentions }) {
  const entry = S.rooms.get(room);
  if (!entry) return;
  entry.read_seq = Math.max(entry.read_seq, seq);
  entry.unread = unread;
  entry.unread_mentions = unread_mentions;
  const v = S.views.get(room);
  if (v) v.readSent = Math.max(v.readSent, seq);
  renderRooms();
}

function onMention({ room, message }) {
  const entry = S.rooms.get(room);
  if (entry && !(S.current === room && document.visibilityState === "visible")) {
    entry.unread_mentions += 1;
    renderRooms();
  }
  if (S.current !== room) report("sidebar-error", `${message.sender.name} mentioned you in ${roomLabel(entry) || room}`);
}

// ------------------------------------------------------------------ opening a room
async function openRoom(room) {
  const v = view(room);
  const switching = S.current !== room;
  if (switching && S.current && S.views.get(S.current)?.joined) {
    await call("room:leave", { room: S.current }).catch(() => {});
    S.views.get(S.current).joined = false;
  }
  S.current = room;
  S.replyTo = null;
  $("sidebar").classList.remove("open");
  const payload = v.lastSeq ? { room, since: v.lastSeq, changes_since: v.changeSeq } : { room };
  const joined = await call("room:join", payload);
  v.joined = true;
  v.kind = joined.room.kind;
  if (!S.rooms.has(room)) await loadRooms();
  if (!v.lastSeq) {
    const { messages, has_more } = await call("message:history", { room, limit: 50 });
    messages.forEach((m) => put(v, m));
    v.hasOlder = has_more;
    v.changeSeq = joined.change_seq;
  } else {
    joined.missed.forEach((m) => put(v, m));
    joined.changes.forEach((m) => put(v, m));
    v.changeSeq = Math.max(v.changeSeq, joined.change_seq);
    if (joined.has_more) await fillAfter(v);
    if (joined.changes_has_more) await fetchChanges(v);
  }
  v.lastSeq = Math.max(v.lastSeq, joined.last_seq);
  renderConversation(true);
  renderRooms();
  await loadMembers(room);
}

async function fillAfter(v) {
  for (;;) {
    const { messages, has_more } = await call("message:history", { room: v.room, after: v.lastSeq, limit: 100 });
    messages.forEach((m) => put(v, m));
    if (!has_more || !messages.length) break;
  }
}

async function fetchChanges(v) {
  for (;;) {
    const page = await call("message:changes", { room: v.room, after: v.changeSeq, limit: 100 });
    page.changes.forEach((m) => put(v, m));
    v.changeSeq = Math.max(v.changeSeq, page.change_seq);
    if (!page.has_more) break;
  }
}

/** Keep ``message`` unless a newer state of it is held (recovery rule 3). */
function put(v, message) {
  const held = v.messages.get(message.seq);
  if (held && (held.change_seq || 0) > (message.change_seq || 0)) return;
  v.messages.set(message.seq, message);
  v.lastSeq = Math.max(v.lastSeq, message.seq);
}

async function loadOlder() {
  const v = S.current && S.views.get(S.current);
  if (!v || v.loadingOlder || !v.hasOlder || !v.messages.size) return;
  v.loadingOlder = true;
  $("history-state").textContent = "loading older messages…";
  try {
    const oldest = Math.min(...v.messages.keys());
    const { messages, has_more } = await call("message:history", { room: v.room, before: oldest, limit: 50 });
    const scroller = $("scroller");
    const fromBottom = scroller.scrollHeight - scroller.scrollTop;
    messages.forEach((m) => put(v, m));
    v.hasOlder = has_more;
    renderConversation();
    scroller.scrollTop = scroller.scrollHeight - fromBottom;
  } finally {
    v.loadingOlder = false;
    $("history-state").textContent = v.hasOlder ? "" : "the beginning of the room";
  }
}

// ------------------------------------------------------------------ live events
function onMessage(message) {
  const v = S.views.get(message.room);
  if (!v || !v.joined) return;
  const gap = message.seq > v.lastSeq + 1 && v.lastSeq > 0;
  put(v, message);
  onActivity({ room: message.room, last_seq: message.seq, message });
  if (gap) fillAfter(v).then(() => renderConversation()).catch(() => {});
  if (message.room === S.current) renderConversation();
}

function onChange(data, apply) {
  const v = S.views.get(data.room);
  if (!v || !v.joined) return;
  if (data.change_seq > v.changeSeq + 1) {  // one was missed: fetch what changed
    fetchChanges(v).then(() => data.room === S.current && renderConversation()).catch(() => {});
    return;
  }
  v.changeSeq = Math.max(v.changeSeq, data.change_seq);
  const held = v.messages.get(data.seq);
  if (held && (held.change_seq || 0) < data.change_seq) {
    v.messages.set(data.seq, { ...apply(held, data), change_seq: data.change_seq });
    if (data.room === S.current) renderConversation();
  }
}

function applyUpdate(m, d) {
  return { ...m, text: d.text, mentions: d.mentions, edited_at: d.edited_at, revision: d.revision };
}

function forgetPreview(room, id) {
  const entry = S.rooms.get(room);
  if (entry && entry.last_message && entry.last_message.id === id) {
    entry.last_message = { ...entry.last_message, deleted: true, text: "" };
    renderRooms();
  }
}

function applyDelete(m) {
  forgetPreview(m.room, m.id);
  return { ...m, deleted: true, text: "", mentions: [], reactions: [] };
}

function applyReactions(m, d) {
  const mine = new Map((m.reactions || []).map((r) => [r.emoji, r.me]));
  if (d.user === S.me.id) mine.set(d.emoji, d.reacted);
  return { ...m, reactions: d.reactions.map((r) => ({ ...r, me: Boolean(mine.get(r.emoji)) })) };
}

function onTyping({ room, user, typing }) {
  if (room !== S.current || user === S.me.id) return;
  clearTimeout(S.typists.get(user));
  if (typing) S.typists.set(user, setTimeout(() => { S.typists.delete(user); renderTyping(); }, 6000));
  else S.typists.delete(user);
  renderTyping();
}

function renderTyping() {
  const names = [...S.typists.keys()];
  $("typing").textContent = names.length ? `${names.join(", ")} ${names.length > 1 ? "are" : "is"} typing…` : "";
}

function onPresence({ user, status }) {
  if (!S.members.has(user)) return;
  S.members.set(user, status);
  renderMembers();
}

async function loadMembers(room) {
  clearTimeout(S.membersTimer);
  S.membersTimer = setTimeout(() => {
    if (S.current === room && S.socket.connected) loadMembers(room);
  }, MEMBERS_POLL_MS);
  try {
    const { members } = await call("room:members", { room });
    S.members = new Map(members.map((m) => [m.id, m.status]));
    renderMembers();
    const ids = members.map((m) => m.id).filter((id) => !S.followed.has(id)).slice(0, 500);
    if (ids.length) {
      ids.forEach((id) => S.followed.add(id));
      const { presence } = await call("presence:subscribe", { users: ids });
      for (const [id, p] of Object.entries(presence)) S.members.set(id, p.status);
      renderMembers();
    }
  } catch (error) {
    S.members = new Map();
    renderMembers();
  }
}

function renderMembers() {
  $("members").replaceChildren(...[...S.members.entries()].sort().map(([id, status]) =>
    el("li", { class: status, dataset: { user: id }, "aria-label": `${id}, ${status}` }, id)));
}

// ------------------------------------------------------------------ conversation rendering
function textWithMentions(message) {
  const fragment = document.createDocumentFragment();
  const mentions = new Set(message.mentions || []);
  const parts = message.text.split(/(@[A-Za-z0-9_.:@-]+)/);
  for (const part of parts) {
    const id = part.startsWith("@") ? part.slice(1).replace(/[.:]+$/, "") : null;
    if (id && mentions.has(id)) {
      const tail = part.slice(1 + id.length);
      fragment.append(el("span", { class: id === S.me.id ? "mention-me" : "mention" }, `@${id}`), tail);
    } else {
      fragment.append(part);
    }
  }
  return fragment;
}

function dayOf(iso) {
  return new Date(iso).toLocaleDateString(undefined, { weekday: "long", day: "numeric", month: "long" });
}

function messageItem(v, m) {
  const mine = m.sender.id === S.me.id;
  const classes = ["msg", mine && "mine", m.deleted && "deleted", m.pending && "pending", m.failed && "failed"];
  const item = el("li", {
    class: classes.filter(Boolean).join(" "),
    dataset: { seq: m.pending ? "" : m.seq, id: m.id || "", clientId: m.client_id },
  });
  if (m.reply_to) {
    item.append(el("div", { class: "quote" },
      `${m.reply_to.sender.name}: ${m.reply_to.deleted ? "(deleted)" : m.reply_to.text}`));
  }
  item.append(el("span", { class: "text" }, m.deleted ? "message deleted" : textWithMentions(m)));
  if (m.edited_at && !m.deleted) item.append(el("span", { class: "edited" }, " (edited)"));
  item.append(el("time", { class: "time", datetime: m.created_at },
    new Date(m.created_at).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })));
  if (m.failed) {
    item.append(" ", el("button", { class: "link", type: "button", onclick: () => retry(v, m.client_id) }, "retry"));
  }
  if ((m.reactions || []).length) {
    item.append(el("div", { class: "reactions" }, ...m.reactions.map((r) =>
      el("button", {
        type: "button", class: r.me ? "me" : "", "aria-pressed": r.me ? "true" : "false",
        "aria-label": `${r.emoji} ${r.count}`, dataset: { emoji: r.emoji },
        onclick: () => react(v, m, r.emoji, !r.me),
      }, `${r.emoji} ${r.count}`))));
  }
  if (!m.pending && !m.deleted) {
    const actions = el("div", { class: "actions" },
      el("button", { type: "button", "aria-label": "reply", onclick: () => startReply(m) }, "↩"),
      ...QUICK_REACTIONS.map((emoji) => el("button", {
        type: "button", "aria-label": `react ${emoji}`, dataset: { react: emoji },
        onclick: () => react(v, m, emoji, !(m.reactions || []).some((r) => r.emoji === emoji && r.me)),
      }, emoji)),
      mine ? el("button", { type: "button", "aria-label": "edit", class: "edit", onclick: () => edit(v, m) }, "✎") : null,
      mine ? el("button", { type: "button", "aria-label": "delete", class: "delete", onclick: () => remove(v, m) }, "🗑") : null);
    item.append(actions);
  }
  return item;
}

function renderConversation(toBottom = false) {
  const v = S.current && S.views.get(S.current);
  const entry = S.current && S.rooms.get(S.current);
  $("room-title").textContent = v ? roomLabel(entry) || v.room : "Pick a room";
  $("room-meta").textContent = v ? `${v.kind} · last seq ${v.lastSeq}` : "";
  $("text").disabled = $("send").disabled = !v;
  if (!v) {
    $("messages").replaceChildren();
    return;
  }
  const scroller = $("scroller");
  const nearBottom = toBottom || scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 80;
  const ordered = [...v.messages.values()].sort((a, b) => a.seq - b.seq).concat([...v.pending.values()]);
  const items = [];
  let day = null;
  let previous = null;
  let group = null;
  for (const m of ordered) {
    const thisDay = dayOf(m.created_at);
    if (thisDay !== day) {
      items.push(el("li", { class: "day", role: "separator" }, thisDay));
      day = thisDay;
      previous = null;
    }
    const sameGroup = previous && previous.sender.id === m.sender.id
      && new Date(m.created_at) - new Date(previous.created_at) < GROUP_GAP_MS;
    if (!sameGroup) {
      group = el("li", { class: "group", dataset: { sender: m.sender.id } },
        el("div", { class: "who" }, m.sender.name), el("ol", { class: "messages" }));
      items.push(group);
    }
    group.querySelector("ol").append(messageItem(v, m));
    previous = m;
  }
  $("messages").replaceChildren(...items);
  if (nearBottom) scroller.scrollTop = scroller.scrollHeight;
  observeReads(v);
}

// ------------------------------------------------------------------ read markers
let observer = null;

function observeReads(v) {
  if (observer) observer.disconnect();
  observer = new IntersectionObserver((seen) => {
    for (const e of seen) {
      const seq = Number(e.target.dataset.seq);
      if (!seq) continue;
      if (e.isIntersecting) S.visible.add(seq);
      else S.visible.delete(seq);
    }
    scheduleRead(v);
  }, { root: $("scroller"), threshold: 0.6 });
  S.visible = new Set();
  document.querySelectorAll("#messages .msg[data-seq]").forEach((node) => observer.observe(node));
}

function scheduleRead(v) {
  clearTimeout(S.readTimer);
  S.readTimer = setTimeout(() => {
    if (document.visibilityState !== "visible" || S.current !== v.room || !S.visible.size) return;
    const seq = Math.max(...S.visible);
    if (seq <= v.readSent) return;
    v.readSent = seq;
    call("message:read", { room: v.room, seq }).catch(() => { v.readSent = 0; });
  }, 250);
}

document.addEventListener("visibilitychange", () => {
  const v = S.current && S.views.get(S.current);
  if (v) scheduleRead(v);
});

// ------------------------------------------------------------------ sending and changing
async function send(text) {
  const v = S.views.get(S.current);
  const clientId = uuid();
  const draft = {
    client_id: clientId, room: v.room, text, pending: true, sender: S.me,
    created_at: new Date().toISOString(), reactions: [], mentions: [],
    reply_to: S.replyTo ? { id: S.replyTo.id, seq: S.replyTo.seq, sender: S.replyTo.sender, text: S.replyTo.text.slice(0, 100), deleted: false } : null,
    replyId: S.replyTo ? S.replyTo.id : null,
  };
  v.pending.set(clientId, draft);
  cancelReply();
  renderConversation(true);
  await deliver(v, draft);
}

async function deliver(v, draft) {
  draft.failed = false;
  draft.pending = true;
  const payload = { room: v.room, text: draft.text, client_id: draft.client_id };
  if (draft.replyId) payload.reply_to = draft.replyId;
  try {
    const { message } = await call("message:send", payload);
    v.pending.delete(draft.client_id);
    put(v, message);
    onActivity({ room: v.room, last_seq: message.seq, message });
  } catch (error) {
    draft.failed = true;
    report("sidebar-error", error);
  }
  if (v.room === S.current) renderConversation(true);
}

function retry(v, clientId) {
  const draft = v.pending.get(clientId);
  if (draft) deliver(v, draft);  // the same client_id: stored at most once
}

async function react(v, m, emoji, add) {
  try {
    const { message } = await call(add ? "reaction:add" : "reaction:remove", { room: v.room, id: m.id, emoji });
    put(v, message);
    renderConversation();
  } catch (error) {
    report("sidebar-error", error);
  }
}

async function edit(v, m) {
  const text = prompt("Edit message", m.text);
  if (text === null || !text.trim() || text === m.text) return;
  try {
    const { message } = await call("message:edit", { room: v.room, id: m.id, text });
    put(v, message);
    renderConversation();
  } catch (error) {
    report("sidebar-error", error);
  }
}

async function remove(v, m) {
  if (!confirm("Delete this message?")) return;
  try {
    const { message } = await call("message:delete", { room: v.room, id: m.id });
    put(v, message);
    renderConversation();
  } catch (error) {
    report("sidebar-error", error);
  }
}

function startReply(m) {
  S.replyTo = m;
  $("reply-text").textContent = `Replying to ${m.sender.name}: ${m.text.slice(0, 80)}`;
  $("reply-bar").hidden = false;
  $("text").focus();
}

function cancelReply() {
  S.replyTo = null;
  $("reply-bar").hidden = true;
}

function typingInput() {
  if (!S.current) return;
  const now = Date.now();
  if (now - S.typingSentAt > 2500) {
    S.typingSentAt = now;
    call("typing", { room: S.current, typing: true }).catch(() => {});
  }
  clearTimeout(S.typingStop);
  S.typingStop = setTimeout(() => {
    S.typingSentAt = 0;
    if (S.current) call("typing", { room: S.current, typing: false }).catch(() => {});
  }, 3000);
}

// ------------------------------------------------------------------ forms
$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  try {
    const token = await devToken($("user").value.trim(), $("name").value.trim());
    S.devTokens = true;
    connect(token);
  } catch (error) {
    report("login-error", error);
  }
});

$("jwt-form").addEventListener("submit", (event) => {
  event.preventDefault();
  S.devTokens = false;
  connect($("jwt").value.trim());
});

$("send-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("text").value.trim();
  if (!text || !S.current) return;
  $("text").value = "";
  send(text).catch((e) => report("sidebar-error", e));
});

$("text").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("send-form").requestSubmit();
  }
});
$("text").addEventListener("input", typingInput);
$("reply-cancel").addEventListener("click", cancelReply);
$("scroller").addEventListener("scroll", () => {
  if ($("scroller").scrollTop < 40) loadOlder().catch(() => {});
});

async function submitRoom(event, make) {
  event.preventDefault();
  report("sidebar-error");
  const form = event.target;
  const typed = () => [...form.elements].map((field) => field.value).join("\u0000");
  const submitted = typed();
  try {
    const room = await make();
    await loadRooms();
    await openRoom(room);
    // Clear the form only if nothing new was typed into it while the room opened.
    if (typed() === submitted) form.reset();
  } catch (error) {
    report("sidebar-error", error);
  }
}

$("join-form").addEventListener("submit", (e) => submitRoom(e, async () => $("join-room").value.trim()));
$("dm-form").addEventListener("submit", (e) => submitRoom(e, async () => {
  const ids = [S.me.id, $("dm-user").value.trim()].sort();
  return `dm:${ids[0]}:${ids[1]}`;
}));
$("private-form").addEventListener("submit", (e) => submitRoom(e, async () => {
  const room = $("private-room").value.trim();
  const members = $("private-members").value.split(",").map((s) => s.trim()).filter(Boolean);
  await call("room:create", { room, private: true, members });
  return room;
}));

const toggle = $("toggle-sidebar");
toggle.hidden = false;
toggle.addEventListener("click", () => {
  const open = $("sidebar").classList.toggle("open");
  toggle.setAttribute("aria-expanded", String(open));
});
