from mobilellm.cli import main

raise SystemExit(main())
