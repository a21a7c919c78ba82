"""Reference models the demo, benchmarks and tests build (LeNet-5 on the shipped MNIST; the test model zoo).
Imports only `tfcompress.core`."""
