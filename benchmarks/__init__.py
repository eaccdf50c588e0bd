"""Benchmarks: side-by-side runs against the emulator, one `NAME key=value ...` line each."""
