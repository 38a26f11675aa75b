// node-postgres through pg_doorman, one pattern per mode (argv[2]):
// "samename": pooled clients give the same query name to different texts;
// "cursor": pg-cursor reads in pages from a portal inside a transaction.
// Prints a JSON summary; exits 1 on any wrong result.
"use strict";
const { Pool } = require("pg");
const Cursor = require("pg-cursor");

const pool = new Pool({ connectionString: process.env.DATABASE_URL, max: 4 });

function expect(ok, what) {
  if (!ok) throw new Error(what);
}

async function sameName(id) {
  // A connection of its own (node-postgres refuses two texts under one name on one
  // connection): odd and even clients give the name "shared" to different texts, and
  // each must get its own statement's rows, whichever server runs it.
  const own = new Pool({ connectionString: process.env.DATABASE_URL, max: 1 });
  let checked = 0;
  try {
    for (let i = 0; i < 30; i++) {
      const res = id % 2
        ? await own.query({ name: "shared", text: "select $1::int * 2 as v", values: [i] })
        : await own.query({ name: "shared", text: "select $1::text || '!' as v", values: [String(i)] });
      expect(res.rows[0].v === (id % 2 ? i * 2 : `${i}!`), `client ${id}: ${res.rows[0].v}`);
      checked++;
    }
  } finally {
    await own.end();
  }
  return checked;
}

function read(cursor, count) {
  return new Promise((resolve, reject) => cursor.read(count, (err, rows) => (err ? reject(err) : resolve(rows))));
}

async function cursor(id) {
  let checked = 0;
  for (let round = 0; round < 4; round++) {
    const client = await pool.connect();
    try {
      await client.query("begin");
      const big = client.query(new Cursor("select g, g * $1::int as h from generate_series(1, 50) g", [id]));
      let seen = 0;
      for (;;) {
        const rows = await read(big, 7);
        if (!rows.length) break;
        for (const row of rows) {
          seen++;
          expect(row.g === seen && row.h === seen * id, `cursor row ${JSON.stringify(row)}`);
        }
      }
      expect(seen === 50, `cursor saw ${seen}`);
      await new Promise((resolve) => big.close(resolve));
      const after = await client.query("select count(*)::int as n from generate_series(1, $1::int)", [id + 1]);
      expect(after.rows[0].n === id + 1, "query after the cursor");
      await client.query("commit");
      checked++;
    } finally {
      client.release();
    }
  }
  return checked;
}

const modes = { samename: sameName, cursor };

(async () => {
  try {
    const run = modes[process.argv[2]];
    const counts = await Promise.all(Array.from({ length: 8 }, (_, id) => run(id)));
    console.log(JSON.stringify({ ok: true, checked: counts.reduce((a, b) => a + b, 0) }));
  } catch (err) {
    console.log(JSON.stringify({ ok: false, error: String(err && err.message ? err.message : err) }));
    process.exitCode = 1;
  } finally {
    await pool.end();
  }
})();
