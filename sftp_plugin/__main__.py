"""`python -m sftp_plugin` runs the same entry point as the console script."""

import sys

from sftp_plugin.cli import main

sys.exit(main())
