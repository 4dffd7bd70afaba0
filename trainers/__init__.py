"""Models, the per-worker DeepSpeed train loop, distillation, quantization and evaluation."""

import sys


def import_deepspeed():
    """`import deepspeed`, minus two costs that training on raylaunch's workers never uses.

    - DeepSpeed's autotuner module (loaded by `import deepspeed` through its runtime config) tries
      `import mlflow` at import time, for the `deepspeed --autotuning` launcher. With mlflow
      installed (raylaunch's `output.mlflow`) that is 0.5-0.6 s of CPU in every process that imports
      DeepSpeed: each worker of each run and trial. mlflow is hidden for that one import; a later
      `import mlflow` in the same process works as before.
    - On CPU, DeepSpeed's comm backend builds a shared-memory all-reduce op when it starts, which
      JIT-compiles with g++ on a machine's first run (about 80 s). Only DeepSpeed's inference
      kernels (`module_inject`) call it; training all-reduces through torch.distributed (gloo). The
      op is marked incompatible in the table DeepSpeed keeps for such edits, and is never built.
    """
    if "deepspeed" in sys.modules or "mlflow" in sys.modules:
        import deepspeed
    else:
        sys.modules["mlflow"] = None  # `import mlflow` raises ImportError while this is here
        try:
            import deepspeed
        finally:
            if sys.modules.get("mlflow", 0) is None:
                del sys.modules["mlflow"]
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

        deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False
    return deepspeed
