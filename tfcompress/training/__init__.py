"""Training-time compression: pruning, weight clustering, quantization-aware training, distillation and low-rank
factorization. Keras model in, Keras model out; imports only `tfcompress.core`."""
