// pgx v4 through pg_doorman: pgxpool with pgx's statement cache, which prepares every
// query (named statements), many goroutines, dozens of distinct queries, transactions.
// Prints "ok <checked>"; exits 1 on any error or wrong result.
package main

import (
	"context"
	"fmt"
	"os"
	"sync"
	"sync/atomic"

	"github.com/jackc/pgx/v4/pgxpool"
)

const statements = 30

func main() {
	ctx := context.Background()
	config, err := pgxpool.ParseConfig(os.Args[1])
	if err != nil {
		fail(err)
	}
	config.MaxConns = 10
	pool, err := pgxpool.ConnectConfig(ctx, config)
	if err != nil {
		fail(err)
	}
	defer pool.Close()

	var checked int64
	var wg sync.WaitGroup
	errs := make(chan error, 20)
	for w := 0; w < 20; w++ {
		wg.Add(1)
		go func(worker int) {
			defer wg.Done()
			for i := 0; i < 60; i++ {
				k := (worker*7 + i) % statements
				var v int
				query := fmt.Sprintf("select $1::int + %d", k)
				if err := pool.QueryRow(ctx, query, i).Scan(&v); err != nil {
					errs <- err
					return
				}
				if v != i+k {
					errs <- fmt.Errorf("%s: got %d, want %d", query, v, i+k)
					return
				}
				atomic.AddInt64(&checked, 1)
				if i%10 == 0 {
					tx, err := pool.Begin(ctx)
					if err != nil {
						errs <- err
						return
					}
					var a, b int64
					if err := tx.QueryRow(ctx, "select txid_current()").Scan(&a); err != nil {
						errs <- err
						return
					}
					if err := tx.QueryRow(ctx, "select txid_current()").Scan(&b); err != nil {
						errs <- err
						return
					}
					if a != b {
						errs <- fmt.Errorf("transaction moved between backends")
						return
					}
					if err := tx.Commit(ctx); err != nil {
						errs <- err
						return
					}
					atomic.AddInt64(&checked, 1)
				}
			}
		}(w)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		fail(err)
	}
	fmt.Printf("ok %d\n", checked)
}

func fail(err error) {
	fmt.Printf("failed %v\n", err)
	os.Exit(1)
}
