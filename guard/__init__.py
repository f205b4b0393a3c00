"""posguard's guard: journal, transaction engine, policies and host uplink."""

import logging

# A library's loggers stay silent unless the application configures them (posguard run does).
logging.getLogger("posguard").addHandler(logging.NullHandler())
