from parrot_edge.cli import main

raise SystemExit(main())
