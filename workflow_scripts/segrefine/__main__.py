import sys

from segrefine.cli import main

sys.exit(main())
