// pgx v4 through pg_doorman, one pattern per mode: "describe" (statement cache in
// describe mode: unnamed statements), "batch" (SendBatch, with an error mid-batch),
// "copy" (CopyFrom), "ddl" (a table gains a column under cached statements).
// Prints "ok <checked>"; exits 1 on any error or wrong result.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"

	"github.com/jackc/pgconn"
	"github.com/jackc/pgconn/stmtcache"
	"github.com/jackc/pgx/v4"
	"github.com/jackc/pgx/v4/pgxpool"
)

var checked int64

func check(ok bool, format string, args ...interface{}) error {
	if !ok {
		return fmt.Errorf(format, args...)
	}
	atomic.AddInt64(&checked, 1)
	return nil
}

func parallel(n int, body func(worker int) error) error {
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for w := 0; w < n; w++ {
		wg.Add(1)
		go func(worker int) {
			defer wg.Done()
			if err := body(worker); err != nil {
				errs <- fmt.Errorf("worker %d: %w", worker, err)
			}
		}(w)
	}
	wg.Wait()
	close(errs)
	return <-errs
}

func main() {
	ctx := context.Background()
	mode, dsn := os.Args[1], os.Args[2]
	config, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		fail(err)
	}
	config.MaxConns = 4
	if mode == "describe" {
		config.ConnConfig.BuildStatementCache = func(conn *pgconn.PgConn) stmtcache.Cache {
			return stmtcache.New(conn, stmtcache.ModeDescribe, 64)
		}
	}
	pool, err := pgxpool.ConnectConfig(ctx, config)
	if err != nil {
		fail(err)
	}
	defer pool.Close()
	switch mode {
	case "describe":
		err = queries(ctx, pool)
	case "batch":
		err = batch(ctx, pool)
	case "copy":
		err = copyFrom(ctx, pool)
	case "ddl":
		err = ddl(ctx, pool)
	default:
		err = fmt.Errorf("unknown mode %s", mode)
	}
	if err != nil {
		fail(err)
	}
	fmt.Printf("ok %d\n", atomic.LoadInt64(&checked))
}

func queries(ctx context.Context, pool *pgxpool.Pool) error {
	return parallel(8, func(w int) error {
		for i := 0; i < 30; i++ {
			k := (w*3 + i) % 10
			var v int
			var s string
			if err := pool.QueryRow(ctx, fmt.Sprintf("select $1::int + %d, $2::text", k), i, fmt.Sprint(w)).Scan(&v, &s); err != nil {
				return err
			}
			if err := check(v == i+k && s == fmt.Sprint(w), "got %d %s", v, s); err != nil {
				return err
			}
		}
		return nil
	})
}

func batch(ctx context.Context, pool *pgxpool.Pool) error {
	if _, err := pool.Exec(ctx, "drop table if exists gb; create table gb(w int, n int)"); err != nil {
		return err
	}
	return parallel(6, func(w int) error {
		for round := 0; round < 6; round++ {
			b := &pgx.Batch{}
			for n := 0; n < 20; n++ {
				b.Queue("insert into gb values ($1, $2)", w, round*20+n)
			}
			b.Queue("select count(*) from gb where w = $1", w)
			results := pool.SendBatch(ctx, b)
			for n := 0; n < 20; n++ {
				if _, err := results.Exec(); err != nil {
					return err
				}
			}
			var count int
			if err := results.QueryRow().Scan(&count); err != nil {
				return err
			}
			if err := results.Close(); err != nil {
				return err
			}
			if err := check(count == (round+1)*20, "count %d", count); err != nil {
				return err
			}
			// An error in the middle: the batch is one implicit transaction.
			bad := &pgx.Batch{}
			bad.Queue("insert into gb values ($1, $2)", w, -1)
			bad.Queue("select 1 / $1::int", 0)
			bad.Queue("insert into gb values ($1, $2)", w, -2)
			results = pool.SendBatch(ctx, bad)
			_, err1 := results.Exec()
			_, err2 := results.Exec()
			var pgErr *pgconn.PgError
			if err := results.Close(); err == nil {
				return fmt.Errorf("the failed batch closed without error")
			}
			if err := check(err1 == nil && errors.As(err2, &pgErr) && pgErr.Code == "22012", "mid-batch error %v %v", err1, err2); err != nil {
				return err
			}
			var negative int
			if err := pool.QueryRow(ctx, "select count(*) from gb where w = $1 and n < 0", w).Scan(&negative); err != nil {
				return err
			}
			if err := check(negative == 0, "rows of the failed batch kept: %d", negative); err != nil {
				return err
			}
		}
		return nil
	})
}

func copyFrom(ctx context.Context, pool *pgxpool.Pool) error {
	if _, err := pool.Exec(ctx, "drop table if exists gc; create table gc(w int, n int, s text)"); err != nil {
		return err
	}
	return parallel(6, func(w int) error {
		for round := 0; round < 4; round++ {
			rows := make([][]interface{}, 300)
			for n := range rows {
				rows[n] = []interface{}{w, n, fmt.Sprintf("s%d", n)}
			}
			copied, err := pool.CopyFrom(ctx, pgx.Identifier{"gc"}, []string{"w", "n", "s"}, pgx.CopyFromRows(rows))
			if err != nil {
				return err
			}
			var count, sum int
			if err := pool.QueryRow(ctx, "select count(*), coalesce(sum(n), 0) from gc where w = $1", w).Scan(&count, &sum); err != nil {
				return err
			}
			if err := check(copied == 300 && count == 300 && sum == 299*300/2, "copy %d %d %d", copied, count, sum); err != nil {
				return err
			}
			if _, err := pool.Exec(ctx, "delete from gc where w = $1", w); err != nil {
				return err
			}
		}
		return nil
	})
}

// A column added under statements cached on every connection: pgx returns the
// server's 0A000 once, drops the statement and prepares it again on the next use.
func ddl(ctx context.Context, pool *pgxpool.Pool) error {
	if _, err := pool.Exec(ctx, "drop table if exists gd; create table gd(id int, a int); insert into gd values (1, 10)"); err != nil {
		return err
	}
	read := func() (int, error) {
		rows, err := pool.Query(ctx, "select * from gd where id = $1", 1)
		if err != nil {
			return 0, err
		}
		defer rows.Close()
		columns := 0
		for rows.Next() {
			values, err := rows.Values()
			if err != nil {
				return 0, err
			}
			columns = len(values)
		}
		return columns, rows.Err()
	}
	// Every pool connection prepares the statement, on whichever server it gets.
	if err := parallel(4, func(w int) error {
		for i := 0; i < 5; i++ {
			columns, err := read()
			if err != nil {
				return err
			}
			if err := check(columns == 2, "columns %d", columns); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		return err
	}
	if _, err := pool.Exec(ctx, "alter table gd add column b int"); err != nil {
		return err
	}
	// Other statements, so that a server keeping few of them lets this one go and
	// parses it again (under the new table) when it is next used.
	for k := 0; k < 4; k++ {
		var v int
		if err := pool.QueryRow(ctx, fmt.Sprintf("select $1::int + %d", k), k).Scan(&v); err != nil {
			return err
		}
	}
	return parallel(4, func(w int) error {
		failures := 0
		for i := 0; i < 8; i++ {
			columns, err := read()
			var pgErr *pgconn.PgError
			if errors.As(err, &pgErr) && pgErr.Code == "0A000" && failures < 4 {
				failures++ // as from PostgreSQL itself: at most once per pool connection
				atomic.AddInt64(&checked, 1)
				continue
			}
			if err != nil {
				return err
			}
			if err := check(columns == 3, "columns after alter %d", columns); err != nil {
				return err
			}
		}
		return nil
	})
}

func fail(err error) {
	fmt.Printf("failed %v\n", err)
	os.Exit(1)
}
