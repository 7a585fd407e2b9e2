"""Card readers and scanners: pure decoders and thin I/O shells that emit typed events."""
