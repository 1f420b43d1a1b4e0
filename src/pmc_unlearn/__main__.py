from pmc_unlearn.cli import main

raise SystemExit(main())
