"""Reference models the demo, benchmarks and tests build (LeNet-5 on the shipped MNIST). Imports only
`tfcompress.core`."""
