#!/usr/bin/env python3
"""The tutorial's echo client: sends `Hello, world` and prints the echo.

Standard library only; the work is done by the `echoplex` package beside this file.
"""

import sys

from echoplex.tutorial import client_main

if __name__ == "__main__":
    sys.exit(client_main())
