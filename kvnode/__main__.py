from kvnode.cli import main

raise SystemExit(main())
