"""The bench's reference servers: the smallest correct echo server each stack allows.

Each is a script of its own that imports nothing from echoplex, so its memory and
CPU are the bare mechanism's. The bench runs them by path (`python FILE PORT`, so the
echoplex package is not imported into them); they ship in the package so that
`echoplex bench --baselines` works from an installed wheel.

socketserver_echo.py   stdlib socketserver.ThreadingTCPServer, a recv/sendall loop
protocol_echo.py       an asyncio Protocol whose data_received writes the data back, on
                       the stdlib event loop (`asyncio`) or on uvloop (`uvloop`)
"""
