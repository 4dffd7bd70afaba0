"""Models, the per-worker DeepSpeed train loop, distillation, quantization and evaluation."""
