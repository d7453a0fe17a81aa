"""Tests of moec.runtime: artifact format, verification, loading and calling."""
