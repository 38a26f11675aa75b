// pgjdbc through pg_doorman, the patterns applications use, one per mode (the first
// argument, modes separated by commas): several connections share the pool's one or
// two servers. Prints "ok <checked>"; exits 1 on any error or wrong result.
import java.io.*;
import java.nio.charset.StandardCharsets;
import java.sql.*;
import java.util.*;
import java.util.concurrent.atomic.*;
import org.postgresql.PGConnection;
import org.postgresql.copy.CopyManager;

public class Patterns {
    interface Body { void run(Connection c, int worker) throws Exception; }
    static final AtomicInteger checked = new AtomicInteger();

    static void check(boolean ok, String what) throws SQLException { if (!ok) throw new SQLException("wrong: " + what); checked.incrementAndGet(); }

    static void parallel(String url, Properties props, int n, Body body) throws Exception {
        AtomicReference<Throwable> failure = new AtomicReference<>();
        List<Thread> ts = new ArrayList<>();
        for (int t = 0; t < n; t++) {
            final int w = t;
            Thread th = new Thread(() -> {
                try (Connection c = DriverManager.getConnection(url, props)) { body.run(c, w); }
                catch (Throwable e) { e.printStackTrace(); failure.compareAndSet(null, e); }
            });
            ts.add(th); th.start();
        }
        for (Thread th : ts) th.join();
        if (failure.get() != null) throw new Exception(failure.get());
    }

    static Properties props(String... kv) { Properties p = new Properties(); for (int i = 0; i < kv.length; i += 2) p.setProperty(kv[i], kv[i+1]); return p; }

    static void exec(Connection c, String sql) throws SQLException { try (Statement s = c.createStatement()) { s.execute(sql); } }

    public static void main(String[] args) throws Exception {
        String url = args[1];
        for (String mode : args[0].split(",")) run(mode, url);
        System.out.println("ok " + checked.get());
    }

    static void run(String mode, String url) throws Exception {
        switch (mode) {
            case "batch": batch(url); break;
            case "samename": sameName(url); break;
            case "autosave": autosave(url); break;
            case "cache": cache(url); break;
            case "deallocate": deallocate(url); break;
            case "binary": binary(url); break;
            case "fetch": fetch(url); break;
            case "rewrite": rewrite(url); break;
            case "copy": copy(url); break;
            case "reshape": reshape(url); break;
            default: throw new IllegalArgumentException(mode);
        }
    }

    static void batch(String url) throws Exception {
        try (Connection c = DriverManager.getConnection(url)) { exec(c, "drop table if exists jb"); exec(c, "create table jb(w int, n int, s text)"); }
        parallel(url, props(), 4, (c, w) -> {
            for (int round = 0; round < 8; round++) {
                boolean tx = round % 2 == 1;
                c.setAutoCommit(!tx);
                try (PreparedStatement ins = c.prepareStatement("insert into jb values (?, ?, ?)")) {
                    for (int n = 0; n < 100; n++) { ins.setInt(1, w); ins.setInt(2, round * 100 + n); ins.setString(3, "r" + n); ins.addBatch(); }
                    int[] counts = ins.executeBatch();
                    check(counts.length == 100, "batch counts");
                }
                if (tx) c.commit();
                try (PreparedStatement q = c.prepareStatement("select count(*), sum(n) from jb where w = ?")) {
                    q.setInt(1, w);
                    try (ResultSet rs = q.executeQuery()) { rs.next(); int rows = (round + 1) * 100; long sum = (long) rows * (rows - 1) / 2; check(rs.getInt(1) == rows && rs.getLong(2) == sum, "batch rows " + rs.getInt(1)); }
                }
            }
        });
    }

    // Two connections, prepareThreshold=1: both name their first statements S_1, S_2... with different texts.
    static void sameName(String url) throws Exception {
        parallel(url, props("prepareThreshold", "1"), 4, (c, w) -> {
            for (int i = 0; i < 40; i++) {
                for (int k = 0; k < 3; k++) {
                    String sql = w % 2 == 0 ? "select ?::int * " + (k + 2) : "select ?::text || '-" + w + "-" + k + "'";
                    try (PreparedStatement ps = c.prepareStatement(sql)) {
                        if (w % 2 == 0) { ps.setInt(1, i); try (ResultSet rs = ps.executeQuery()) { rs.next(); check(rs.getInt(1) == i * (k + 2), "int " + w); } }
                        else { ps.setString(1, "v" + i); try (ResultSet rs = ps.executeQuery()) { rs.next(); check(rs.getString(1).equals("v" + i + "-" + w + "-" + k), "text " + w + " got " + rs.getString(1)); } }
                    }
                }
            }
        });
    }

    static void autosave(String url) throws Exception {
        try (Connection c = DriverManager.getConnection(url)) { exec(c, "drop table if exists ja"); exec(c, "create table ja(id int primary key, a int)"); exec(c, "insert into ja select g, g from generate_series(1, 10) g"); }
        // Errors inside transactions rolled back to the automatic savepoint.
        parallel(url, props("autosave", "always", "prepareThreshold", "1"), 4, (c, w) -> {
            c.setAutoCommit(false);
            for (int i = 0; i < 10; i++) {
                try (PreparedStatement ps = c.prepareStatement("select a from ja where id = ?")) { ps.setInt(1, 1 + (i % 10)); try (ResultSet rs = ps.executeQuery()) { rs.next(); check(rs.getInt(1) >= 1, "select"); } }
                try (PreparedStatement bad = c.prepareStatement("select 1 / ?::int")) { bad.setInt(1, 0); bad.executeQuery(); throw new Exception("no error"); }
                catch (SQLException e) { check("22012".equals(e.getSQLState()), "22012 got " + e.getSQLState()); }
                try (PreparedStatement ps = c.prepareStatement("select count(*) from ja")) { try (ResultSet rs = ps.executeQuery()) { rs.next(); check(rs.getInt(1) >= 10, "count after error"); } }
                c.commit();
            }
        });
    }

    static void cache(String url) throws Exception {
        Properties p = props("prepareThreshold", "1", "preparedStatementCacheQueries", "3");
        parallel(url, p, 4, (c, w) -> {
            for (int i = 0; i < 60; i++) {
                int k = (w * 3 + i) % 9;
                try (PreparedStatement ps = c.prepareStatement("select ?::int + " + k + " + " + (w % 2))) {
                    ps.setInt(1, i);
                    try (ResultSet rs = ps.executeQuery()) { rs.next(); check(rs.getInt(1) == i + k + w % 2, "cache"); }
                }
            }
        });
    }

    static void deallocate(String url) throws Exception {
        Properties p = props("prepareThreshold", "1");
        parallel(url, p, 4, (c, w) -> {
            for (int i = 0; i < 20; i++) {
                for (int k = 0; k < 3; k++) {
                    try (PreparedStatement ps = c.prepareStatement("select ?::int - " + k + " - " + w)) {
                        ps.setInt(1, i); try (ResultSet rs = ps.executeQuery()) { rs.next(); check(rs.getInt(1) == i - k - w, "dealloc"); }
                    }
                }
                if (i % 5 == 2) exec(c, (w % 2 == 0) ? "DEALLOCATE ALL" : "DISCARD ALL");
                if (i % 5 == 4) { c.setAutoCommit(false); exec(c, "DEALLOCATE ALL"); try (PreparedStatement ps = c.prepareStatement("select ?::int - 0 - " + w)) { ps.setInt(1, i); try (ResultSet rs = ps.executeQuery()) { rs.next(); check(rs.getInt(1) == i - w, "in tx"); } } c.commit(); c.setAutoCommit(true); }
            }
        });
    }

    static void binary(String url) throws Exception {
        Properties p = props("binaryTransfer", "true", "prepareThreshold", "-1");
        parallel(url, p, 4, (c, w) -> {
            for (int i = 0; i < 30; i++) {
                try (PreparedStatement ps = c.prepareStatement("select ?::int8 * 3, ?::float8, ?::timestamptz, ?::numeric, now()::date, array[1,2,?::int]")) {
                    ps.setLong(1, i); ps.setDouble(2, i + 0.5); ps.setTimestamp(3, new Timestamp(1000L * i)); ps.setBigDecimal(4, new java.math.BigDecimal(i + ".25")); ps.setInt(5, w);
                    try (ResultSet rs = ps.executeQuery()) {
                        rs.next();
                        check(rs.getLong(1) == 3L * i && rs.getDouble(2) == i + 0.5 && rs.getTimestamp(3).getTime() == 1000L * i && rs.getBigDecimal(4).compareTo(new java.math.BigDecimal(i + ".25")) == 0, "binary");
                        Integer[] arr = (Integer[]) rs.getArray(6).getArray(); check(arr[2] == w, "array");
                    }
                }
            }
        });
    }

    static void fetch(String url) throws Exception {
        Properties p = props("prepareThreshold", "1");
        parallel(url, p, 4, (c, w) -> {
            for (int round = 0; round < 5; round++) {
                c.setAutoCommit(false);
                try (PreparedStatement ps = c.prepareStatement("select g, g * " + w + " from generate_series(1, ?) g")) {
                    ps.setFetchSize(7);
                    ps.setInt(1, 100);
                    try (ResultSet rs = ps.executeQuery()) {
                        int n = 0;
                        while (rs.next()) { n++; if (rs.getInt(1) != n || rs.getInt(2) != n * w) throw new SQLException("fetch row"); }
                        check(n == 100, "fetch count " + n);
                    }
                    // A second cursor interleaved with the first.
                    try (PreparedStatement ps2 = c.prepareStatement("select g from generate_series(1, 20) g")) {
                        ps2.setFetchSize(3);
                        ps.setInt(1, 10);
                        try (ResultSet a = ps.executeQuery(); ResultSet b = ps2.executeQuery()) {
                            int n = 0; while (a.next() && b.next()) { n++; if (a.getInt(1) != b.getInt(1)) throw new SQLException("interleave"); }
                            check(n == 10, "interleave");
                        }
                    }
                }
                c.commit();
            }
        });
    }

    static void rewrite(String url) throws Exception {
        try (Connection c = DriverManager.getConnection(url)) { exec(c, "drop table if exists jr"); exec(c, "create table jr(w int, n int)"); }
        parallel(url, props("reWriteBatchedInserts", "true"), 4, (c, w) -> {
            for (int round = 0; round < 8; round++) {
                try (PreparedStatement ins = c.prepareStatement("insert into jr(w, n) values (?, ?)")) {
                    int size = 1 + round * 37;
                    for (int n = 0; n < size; n++) { ins.setInt(1, w); ins.setInt(2, n); ins.addBatch(); }
                    ins.executeBatch();
                    try (PreparedStatement q = c.prepareStatement("select count(*) from jr where w = ?")) { q.setInt(1, w); try (ResultSet rs = q.executeQuery()) { rs.next(); check(rs.getInt(1) == size, "rewrite " + rs.getInt(1) + " != " + size); } }
                    exec(c, "delete from jr where w = " + w);
                }
            }
        });
    }

    static void copy(String url) throws Exception {
        try (Connection c = DriverManager.getConnection(url)) { exec(c, "drop table if exists jc"); exec(c, "create table jc(w int, n int, s text)"); }
        parallel(url, props("prepareThreshold", "1"), 4, (c, w) -> {
            CopyManager cm = c.unwrap(PGConnection.class).getCopyAPI();
            for (int round = 0; round < 5; round++) {
                boolean tx = round % 2 == 1;
                c.setAutoCommit(!tx);
                StringBuilder sb = new StringBuilder();
                for (int n = 0; n < 200; n++) sb.append(w).append('\t').append(n).append('\t').append("s").append(n).append('\n');
                long in = cm.copyIn("copy jc from stdin", new ByteArrayInputStream(sb.toString().getBytes(StandardCharsets.UTF_8)));
                check(in == 200, "copyIn");
                try (PreparedStatement q = c.prepareStatement("select count(*) from jc where w = ?")) { q.setInt(1, w); try (ResultSet rs = q.executeQuery()) { rs.next(); check(rs.getInt(1) == 200, "count"); } }
                ByteArrayOutputStream out = new ByteArrayOutputStream();
                long o = cm.copyOut("copy (select * from jc where w = " + w + " order by n) to stdout", out);
                check(o == 200 && out.toString(StandardCharsets.UTF_8).equals(sb.toString()), "copyOut");
                try { cm.copyIn("copy jc from stdin", new ByteArrayInputStream("1\tnotanint\tx\n".getBytes())); throw new Exception("bad copy accepted"); }
                catch (SQLException e) { check("22P02".equals(e.getSQLState()), "bad copy " + e.getSQLState()); }
                if (tx) c.rollback();
                exec(c, "delete from jc where w = " + w);
                if (tx) c.commit();
            }
        });
    }

    // A table gains a column under a statement the connection prepared (and described:
    // with binary transfer, its Binds name one result format per column). The server
    // lets it go meanwhile, other statements having taken its place, and parses it
    // again under the new table: pgjdbc must get PostgreSQL's 0A000 "cached plan must
    // not change result type", which it recovers from by preparing again (inside a
    // transaction with autosave=conservative), and then read the new column.
    static void reshape(String url) throws Exception {
        Properties p = props("autosave", "conservative", "prepareThreshold", "1");
        try (Connection other = DriverManager.getConnection(url); Connection c = DriverManager.getConnection(url, p)) {
            exec(other, "drop table if exists js");
            exec(other, "create table js(id int, a int)");
            exec(other, "insert into js values (1, 10)");
            try (PreparedStatement inTx = c.prepareStatement("select * from js where id = ?");
                 PreparedStatement autocommit = c.prepareStatement("select * from js where a = ?")) {
                for (int round = 0; round < 3; round++) {
                    c.setAutoCommit(false);
                    inTx.setInt(1, 1);
                    try (ResultSet rs = inTx.executeQuery()) { rs.next(); check(rs.getInt(2) == 10, "before"); }
                    c.commit();
                    c.setAutoCommit(true);
                    autocommit.setInt(1, 10);
                    try (ResultSet rs = autocommit.executeQuery()) { rs.next(); check(rs.getInt(1) == 1, "before"); }
                }
                exec(other, "alter table js add column b int default 7");
                for (int k = 0; k < 4; k++) {
                    try (PreparedStatement ps = other.prepareStatement("select " + k + " + ?")) { ps.setInt(1, k); ps.executeQuery().close(); }
                }
                c.setAutoCommit(false);
                try (ResultSet rs = inTx.executeQuery()) {
                    rs.next();
                    check(rs.getMetaData().getColumnCount() == 3 && rs.getInt(3) == 7, "in a transaction after the change");
                }
                c.commit();
                c.setAutoCommit(true);
                try (ResultSet rs = autocommit.executeQuery()) {
                    rs.next();
                    check(rs.getMetaData().getColumnCount() == 3 && rs.getInt(3) == 7, "autocommit after the change");
                }
            }
        }
    }
}
