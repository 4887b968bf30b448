import sys

from grootfs_py.cli import main

sys.exit(main())
