"""Thin absl command-line scripts over the tfcompress library; each is also `tfcompress <verb>`."""
