"""The reader side: serial link protocol (sans-I/O), pyserial adapter and reference reader."""
