"""Django-free worker side: task contract, ONNX runtime, batching, compile."""
