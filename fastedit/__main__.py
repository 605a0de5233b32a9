import sys

from fastedit.cli import main

sys.exit(main())
