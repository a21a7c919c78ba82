"""Deployment targets: TFLite Micro (C arrays, op resolver, arena, the TFLM check), the firmware export, Vela.
Imports `tfcompress.conversion` and `tfcompress.core`, never `tfcompress.analysis` or `tfcompress.runs`."""
