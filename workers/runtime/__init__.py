"""ONNX Runtime plumbing: execution providers and per-process model sessions."""
