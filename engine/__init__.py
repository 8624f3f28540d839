"""Hardware tokens-per-joule engine: synthetic decode steps of real model shapes, timed and
(later) energy-attributed on the device itself."""

__version__ = "0.1.0"
