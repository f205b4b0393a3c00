"""posguard: a terminal-side transaction guard for card-payment terminals."""

__version__ = "0.1.0"
