// pgjdbc in autocommit mode, its default, through pg_doorman: a query run on every
// server of a pool, a column added to its table, then the query again from
// connections that have not prepared it (pgjdbc parses it, as the unnamed statement,
// for the first four executions). PostgreSQL alone parses the text anew and returns
// the new column. Prints "ok <columns> <rows>".
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;

public class SchemaChange {
    static final String QUERY = "select * from jdbc_schema_change where id = ?";

    public static void main(String[] args) throws Exception {
        String url = args[0];
        try (Connection first = DriverManager.getConnection(url);
                Connection second = DriverManager.getConnection(url)) {
            // One server each: the first holds its transaction open meanwhile.
            first.setAutoCommit(false);
            run(first);
            run(second);
            first.commit();
            first.setAutoCommit(true);
            try (Statement st = second.createStatement()) {
                st.execute("alter table jdbc_schema_change add column b int default 2");
            }
        }
        int columns = 0;
        int rows = 0;
        for (int i = 0; i < 4; i++) {
            try (Connection conn = DriverManager.getConnection(url)) {
                int[] got = run(conn);
                columns = got[0];
                rows += got[1];
            }
        }
        System.out.println("ok " + columns + " " + rows);
    }

    static int[] run(Connection conn) throws SQLException {
        try (PreparedStatement ps = conn.prepareStatement(QUERY)) {
            ps.setInt(1, 1);
            try (ResultSet rs = ps.executeQuery()) {
                int rows = 0;
                while (rs.next()) rows++;
                return new int[] {rs.getMetaData().getColumnCount(), rows};
            }
        }
    }
}
