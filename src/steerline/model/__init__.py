"""The model layer: architecture knowledge (arch), checkpoint loading (load), the embedded default
model (gguf: the dense SmolLM2 from its GGUF file; moefy: its MoEfication)."""
