import sys

from nup.cli import main

sys.exit(main())
