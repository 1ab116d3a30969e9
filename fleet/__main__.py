from fleet.cli.app import main

raise SystemExit(main())
