"""Analysis of what compression did: run reports, `.tflite` inspection, MAC counts, latency, the per-tensor
quantization debugger. Imports the floors below (conversion, training, models, core), never `tfcompress.targets`
or `tfcompress.runs`."""
