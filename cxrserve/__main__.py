from cxrserve.tools.cli import main

raise SystemExit(main())
