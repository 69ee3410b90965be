"""Shared ground of every layer: the named errors, input checks, atomic files and the safe
.npz reader, one rule per option, number formatting, timing, the device mesh and the study's
published numbers. Imports nothing else of the package."""
