#!/usr/bin/env python3
"""The tutorial's echo server: `python3 ServerPython.py [--mode threads|simple]`.

Standard library only; the work is done by the `echoplex` package beside this file.
"""

import sys

from echoplex.tutorial import server_main

if __name__ == "__main__":
    sys.exit(server_main())
