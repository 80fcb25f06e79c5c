// Runs the in-memory Firestore emulator (@firestore-emulator/server) on one port.
//
//   node tests/support/firestore_emulator.js PORT [--exit-with-stdin]
//
// Prints "firestore-emulator listening on 127.0.0.1:PORT" once the port is bound and
// stops on SIGTERM / SIGINT. With --exit-with-stdin it also stops when its stdin closes, so
// it never outlives the test process that started it. State lives in memory: every start
// begins empty.
"use strict";

const { FirestoreServer } = require("@firestore-emulator/server");

const port = Number.parseInt(process.argv[2] ?? "", 10);
const exitWithStdin = process.argv.includes("--exit-with-stdin");
if (!Number.isInteger(port) || port <= 0 || port > 65535) {
  console.error("usage: node firestore_emulator.js PORT [--exit-with-stdin]");
  process.exit(2);
}

const server = new FirestoreServer();

function stop() {
  try {
    server.stop();
  } finally {
    process.exit(0);
  }
}

process.on("SIGTERM", stop);
process.on("SIGINT", stop);
if (exitWithStdin) {
  process.stdin.on("end", stop);
  process.stdin.on("error", stop);
  process.stdin.resume();
}

server.start(port).then(
  () => console.log(`firestore-emulator listening on 127.0.0.1:${port}`),
  (err) => {
    console.error(`firestore-emulator could not bind port ${port}: ${err}`);
    process.exit(1);
  },
);
