"""Deployment: verified ONNX export, runners and timing, kernel profiles, the dense-vs-slim comparison."""
