// node-postgres through pg_doorman: named prepared queries from many pool clients,
// transactions, and an error inside a transaction. Prints a JSON summary; exits 1 on
// any wrong result.
"use strict";
const { Pool } = require("pg");

const STATEMENTS = 30;
const pool = new Pool({ connectionString: process.env.DATABASE_URL, max: 10 });

async function worker(id) {
  let checked = 0;
  for (let i = 0; i < 60; i++) {
    const k = (id * 7 + i) % STATEMENTS;
    const res = await pool.query({
      name: `q${k}`,
      text: `select $1::int + ${k} as v`,
      values: [i],
    });
    if (res.rows[0].v !== i + k) throw new Error(`q${k}: got ${res.rows[0].v}, want ${i + k}`);
    checked++;
    if (i % 10 === 0) {
      const client = await pool.connect();
      try {
        await client.query("begin");
        const a = await client.query({ name: "txid", text: "select txid_current() as t" });
        const b = await client.query({ name: "txid", text: "select txid_current() as t" });
        if (a.rows[0].t !== b.rows[0].t) throw new Error("transaction moved between backends");
        let failed = false;
        try {
          await client.query({ name: "boom", text: "select 1 / $1::int as v", values: [0] });
        } catch (err) {
          failed = err.code === "22012";
        }
        if (!failed) throw new Error("expected division_by_zero");
        await client.query("rollback");
        const after = await client.query({ name: `q${k}`, text: `select $1::int + ${k} as v`, values: [1] });
        if (after.rows[0].v !== 1 + k) throw new Error("wrong result after rollback");
        checked++;
      } finally {
        client.release();
      }
    }
  }
  return checked;
}

(async () => {
  try {
    const counts = await Promise.all(Array.from({ length: 20 }, (_, id) => worker(id)));
    console.log(JSON.stringify({ ok: true, checked: counts.reduce((a, b) => a + b, 0) }));
  } catch (err) {
    console.log(JSON.stringify({ ok: false, error: String(err && err.message ? err.message : err) }));
    process.exitCode = 1;
  } finally {
    await pool.end();
  }
})();
