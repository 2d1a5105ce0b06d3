import sys

from hwledger.cli import main

sys.exit(main())
