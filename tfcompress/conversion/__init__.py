"""Post-training conversion and its checks: calibration data, the TFLite converter, verification in LiteRT.
Imports only `tfcompress.core`."""
