from pg_doorman.app.cli import main

raise SystemExit(main())
