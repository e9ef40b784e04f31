"""A ready locustfile: verified echo round trips against one echoplex (or any echo) server.

One machine:
    locust -f bench/locustfile.py --headless -u 10 -r 10 -t 10s --host tcp://127.0.0.1:12345

Many machines (Locust's distributed engine; workers take host and options from the master):
    locust -f bench/locustfile.py --master --headless --expect-workers 2 \\
        -u 100 -r 50 -t 30s --host tcp://SERVER:12345 --echo-size 4096
    locust -f bench/locustfile.py --worker --master-host MASTER    # on each load machine

Every echoed byte is checked; a corrupted, short or failed echo is a Locust failure
whose message names the connection and stream offset.
"""

from locust import constant

from echoplex.locust import EchoUser


class Echo(EchoUser):
    # Closed loop: each user starts its next round trip as soon as the last one is back.
    wait_time = constant(0)
