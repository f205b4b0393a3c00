"""posguard's guard: journal, transaction engine, policies and host uplink."""
