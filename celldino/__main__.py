import sys

from celldino.cli import main

sys.exit(main())
