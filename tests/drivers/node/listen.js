// node-postgres LISTEN through pg_doorman with listen_fanout: two clients listen, a
// third notifies through the pooler; each listener must hear every payload in order,
// and nothing after UNLISTEN. Prints a JSON summary; exits 1 on any wrong result.
"use strict";
const { Client } = require("pg");

const COUNT = 20;

function collect(client, want) {
  return new Promise((resolve, reject) => {
    const got = [];
    const timer = setTimeout(() => reject(new Error(`heard ${got.length} of ${want}`)), 10000);
    client.on("notification", (msg) => {
      got.push([msg.channel, msg.payload]);
      if (got.length === want) {
        clearTimeout(timer);
        resolve(got);
      }
    });
  });
}

(async () => {
  const url = process.env.DATABASE_URL;
  const listeners = [new Client(url), new Client(url)];
  const sender = new Client(url);
  try {
    for (const c of [...listeners, sender]) await c.connect();
    for (const c of listeners) await c.query('LISTEN "Node Jobs"');
    const heard = listeners.map((c) => collect(c, COUNT));
    for (let i = 0; i < COUNT; i++) {
      await sender.query("select pg_notify($1, $2)", ["Node Jobs", `n${i}`]);
    }
    const want = JSON.stringify(Array.from({ length: COUNT }, (_, i) => ["Node Jobs", `n${i}`]));
    for (const got of await Promise.all(heard)) {
      if (JSON.stringify(got) !== want) throw new Error(`heard ${JSON.stringify(got)}`);
    }
    await listeners[0].query('UNLISTEN "Node Jobs"');
    let late = 0;
    listeners[0].on("notification", () => late++);
    const last = collect(listeners[1], 1);
    await sender.query("select pg_notify($1, $2)", ["Node Jobs", "after"]);
    await last;
    if (late !== 0) throw new Error("heard a notification after UNLISTEN");
    console.log(JSON.stringify({ ok: true, heard: 2 * COUNT + 1 }));
  } catch (err) {
    console.log(JSON.stringify({ ok: false, error: String(err && err.message ? err.message : err) }));
    process.exitCode = 1;
  } finally {
    for (const c of [...listeners, sender]) await c.end().catch(() => {});
  }
})();
