"""`echoplex lesson`: the tutorial's experiment, replayed on this machine and measured.

Four steps, each a short live experiment with real servers (each in its own process,
`echoplex.lesson.servers`) and real clients (`echoplex.lesson.clients`):

1. waiting: the tutorial's nc and Hello-world client, against simple and threads;
2. work that waits (`--work io:...`), against every model;
3. work that computes (`--work cpu:...`), against every model;
4. many idle clients: memory and threads per connection, read from the server.

Each step says what it will show and what the textbook expects before it runs, and
what was measured after (`echoplex.lesson.steps`). The lesson runs on the standard
library alone; rich (a live view, tables) and matplotlib (a picture per step) are used
when they are installed (`pip install 'echoplex[lesson]'`), imported only then.
"""

from .config import LessonConfig
from .runner import run_lesson

__all__ = ["LessonConfig", "run_lesson"]
