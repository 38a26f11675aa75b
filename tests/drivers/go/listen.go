// pgx v4 LISTEN through pg_doorman with listen_fanout: a listener hears payloads
// another connection sends through the pooler, in order, and nothing after UNLISTEN.
// Prints "ok <heard>"; exits 1 on any error or wrong result. Built on its own:
// `go build listen.go`.
package main

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/jackc/pgx/v4"
)

const count = 20

func main() {
	ctx := context.Background()
	listener, err := pgx.Connect(ctx, os.Args[1])
	if err != nil {
		fail(err)
	}
	defer listener.Close(ctx)
	sender, err := pgx.Connect(ctx, os.Args[1])
	if err != nil {
		fail(err)
	}
	defer sender.Close(ctx)
	if _, err := listener.Exec(ctx, `LISTEN "Pgx Jobs"`); err != nil {
		fail(err)
	}
	for i := 0; i < count; i++ {
		if _, err := sender.Exec(ctx, "select pg_notify($1, $2)", "Pgx Jobs", fmt.Sprintf("g%d", i)); err != nil {
			fail(err)
		}
	}
	for i := 0; i < count; i++ {
		wait, cancel := context.WithTimeout(ctx, 10*time.Second)
		n, err := listener.WaitForNotification(wait)
		cancel()
		if err != nil {
			fail(err)
		}
		if n.Channel != "Pgx Jobs" || n.Payload != fmt.Sprintf("g%d", i) {
			fail(fmt.Errorf("heard %s %s", n.Channel, n.Payload))
		}
	}
	if _, err := listener.Exec(ctx, `UNLISTEN "Pgx Jobs"`); err != nil {
		fail(err)
	}
	if _, err := sender.Exec(ctx, `NOTIFY "Pgx Jobs", 'after'`); err != nil {
		fail(err)
	}
	wait, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
	defer cancel()
	if n, err := listener.WaitForNotification(wait); err == nil {
		fail(fmt.Errorf("heard after UNLISTEN: %s", n.Payload))
	}
	fmt.Printf("ok %d\n", count)
}

func fail(err error) {
	fmt.Printf("failed %v\n", err)
	os.Exit(1)
}
