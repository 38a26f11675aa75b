// pgjdbc through pg_doorman with prepareThreshold=1: every statement becomes a
// server-side prepared statement on its first use. Several threads, dozens of distinct
// statements, batches, autocommit and explicit transactions. Prints "ok <checked>".
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.concurrent.atomic.AtomicReference;

public class Workload {
    static final int STATEMENTS = 30;

    public static void main(String[] args) throws Exception {
        String url = args[0];
        AtomicInteger checked = new AtomicInteger();
        AtomicReference<Throwable> failure = new AtomicReference<>();
        try (Connection setup = DriverManager.getConnection(url)) {
            try (Statement st = setup.createStatement()) {
                st.execute("create table if not exists jdbc_batch(worker int, n int)");
                st.execute("truncate jdbc_batch");
            }
        }
        List<Thread> threads = new ArrayList<>();
        for (int t = 0; t < 8; t++) {
            final int worker = t;
            Thread thread = new Thread(() -> {
                try {
                    run(url, worker, checked);
                } catch (Throwable e) {
                    failure.compareAndSet(null, e);
                }
            });
            threads.add(thread);
            thread.start();
        }
        for (Thread thread : threads) thread.join();
        if (failure.get() != null) {
            System.out.println("failed " + failure.get());
            System.exit(1);
        }
        System.out.println("ok " + checked.get());
    }

    static void run(String url, int worker, AtomicInteger checked) throws SQLException {
        try (Connection conn = DriverManager.getConnection(url)) {
            for (int i = 0; i < 60; i++) {
                int k = (worker * 7 + i) % STATEMENTS;
                try (PreparedStatement ps = conn.prepareStatement("select ?::int + " + k)) {
                    ps.setInt(1, i);
                    try (ResultSet rs = ps.executeQuery()) {
                        rs.next();
                        if (rs.getInt(1) != i + k) throw new SQLException("wrong result for " + k);
                    }
                }
                checked.incrementAndGet();
            }
            conn.setAutoCommit(false);
            try (PreparedStatement ins = conn.prepareStatement("insert into jdbc_batch values (?, ?)")) {
                for (int n = 0; n < 50; n++) {
                    ins.setInt(1, worker);
                    ins.setInt(2, n);
                    ins.addBatch();
                }
                ins.executeBatch();
            }
            try (PreparedStatement sum = conn.prepareStatement(
                    "select count(*), sum(n) from jdbc_batch where worker = ?")) {
                sum.setInt(1, worker);
                try (ResultSet rs = sum.executeQuery()) {
                    rs.next();
                    if (rs.getInt(1) != 50 || rs.getInt(2) != 1225) throw new SQLException("batch lost rows");
                }
            }
            conn.commit();
            checked.incrementAndGet();
        }
    }
}
