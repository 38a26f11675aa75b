// pgjdbc LISTEN through pg_doorman with listen_fanout: a listener (extended protocol,
// as pgjdbc sends every statement) hears payloads another connection sends through
// the pooler, in order, and nothing after UNLISTEN. Prints "ok <heard>".
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.List;
import org.postgresql.PGConnection;
import org.postgresql.PGNotification;

public class Listen {
    static final int COUNT = 20;

    public static void main(String[] args) throws Exception {
        String url = args[0];
        try (Connection listener = DriverManager.getConnection(url);
                Connection sender = DriverManager.getConnection(url)) {
            try (Statement st = listener.createStatement()) {
                st.execute("LISTEN \"Jdbc Jobs\"");
            }
            try (PreparedStatement notify = sender.prepareStatement("select pg_notify(?, ?)")) {
                for (int i = 0; i < COUNT; i++) {
                    notify.setString(1, "Jdbc Jobs");
                    notify.setString(2, "j" + i);
                    notify.execute();
                }
            }
            PGConnection pg = listener.unwrap(PGConnection.class);
            List<String> heard = new ArrayList<>();
            long deadline = System.currentTimeMillis() + 10000;
            while (heard.size() < COUNT && System.currentTimeMillis() < deadline) {
                PGNotification[] got = pg.getNotifications(1000);
                if (got == null) continue;
                for (PGNotification n : got) {
                    if (!n.getName().equals("Jdbc Jobs")) throw new SQLException("channel " + n.getName());
                    heard.add(n.getParameter());
                }
            }
            for (int i = 0; i < COUNT; i++) {
                if (heard.size() <= i || !heard.get(i).equals("j" + i)) {
                    throw new SQLException("heard " + heard);
                }
            }
            try (Statement st = listener.createStatement()) {
                st.execute("UNLISTEN \"Jdbc Jobs\"");
            }
            try (Statement st = sender.createStatement()) {
                st.execute("NOTIFY \"Jdbc Jobs\", 'after'");
            }
            PGNotification[] late = pg.getNotifications(500);
            if (late != null && late.length > 0) throw new SQLException("heard after UNLISTEN");
            System.out.println("ok " + heard.size());
        }
    }
}
