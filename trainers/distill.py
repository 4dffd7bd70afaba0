"""Knowledge distillation: the soft-target losses a student learns from its teacher with, and the
teacher's outputs precomputed once over the train split (`distill.teacher_outputs: precompute`)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from cluster.remote import local_dir
from dataprep import IGNORE


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      temperature: float, alpha: float) -> torch.Tensor:
    """alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(student, labels).
    The T^2 keeps the soft-target gradients on the same scale as the hard-label ones (Hinton et al., 2015).
    Rows labelled IGNORE (prompts, padding) count in neither term."""
    soft = F.kl_div(F.log_softmax(student_logits / temperature, dim=-1),
                    F.log_softmax(teacher_logits / temperature, dim=-1), log_target=True, reduction="none").sum(-1)
    return _combined(soft, student_logits, labels, temperature, alpha)


def topk_distillation_loss(student_logits: torch.Tensor, teacher_values: torch.Tensor, teacher_indices: torch.Tensor,
                           labels: torch.Tensor, temperature: float, alpha: float) -> torch.Tensor:
    """The same loss against a teacher kept as its top-k logits per position (a language model's
    precomputed outputs): both distributions renormalized over the teacher's k tokens, so the soft
    targets shape how the student ranks those tokens and the cross-entropy what it leaves to the
    rest. (Against the student's whole-vocabulary probabilities, the soft targets would push every
    other token towards zero, the right one too wherever the teacher did not rank it in its k.)"""
    teacher = F.log_softmax(teacher_values.float() / temperature, dim=-1)
    student = F.log_softmax(student_logits.gather(-1, teacher_indices.long()) / temperature, dim=-1)
    soft = (teacher.exp() * (teacher - student)).sum(-1)
    return _combined(soft, student_logits, labels, temperature, alpha)


def _combined(soft: torch.Tensor, student_logits: torch.Tensor, labels: torch.Tensor, temperature: float,
              alpha: float) -> torch.Tensor:
    # A mask, not a selection: selecting rows would wait for the device to count them.
    counted = (labels != IGNORE).to(soft.dtype)
    soft = (soft * counted).sum() / counted.sum().clamp(min=1)
    return alpha * temperature**2 * soft + (1 - alpha) * F.cross_entropy(student_logits, labels, ignore_index=IGNORE)


# ---------------------------------------------------------------------------------------------
# distill.teacher_outputs: precompute. The teacher runs once over the train split as Ray Data
# batch inference; the student's workers read its outputs with the rows and never hold it.

LOGITS, TOPK_VALUES, TOPK_INDICES = "teacher_logits", "teacher_topk_values", "teacher_topk_indices"
INPUTS = ("features", "label", "tokens", "labels", "positions", "key")
"""The columns of a cached split the teacher's input is made of."""


class TeacherOutputs:
    """A Ray Data actor: loads the teacher once, then adds its outputs to each batch of rows."""

    def __init__(self, teacher_dir: str, meta: dict, top_k: int):
        from trainers.modeldir import load_model_dir

        torch.set_num_threads(1)  # one actor per CPU
        self.model, _ = load_model_dir(local_dir(teacher_dir))
        self.meta, self.top_k = meta, top_k

    @torch.inference_mode()
    def __call__(self, batch: dict) -> dict:
        from trainers.batches import model_batch, model_kwargs

        inputs = {k: torch.from_numpy(v) for k, v in batch.items() if k in INPUTS}
        x, _ = model_batch(inputs, self.meta)
        logits = self.model(x, **model_kwargs(inputs)).float()  # packed examples: their own position ids
        if logits.dim() == 3:  # a language model: the top k per token
            values, indices = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1)
            return {**batch, TOPK_VALUES: values.numpy(), TOPK_INDICES: indices.to(torch.int32).numpy(),
                    "split": _train_split(batch)}
        return {**batch, LOGITS: logits.numpy(), "split": _train_split(batch)}


def _train_split(batch: dict):
    import numpy as np

    return np.zeros(len(next(iter(batch.values()))), dtype=np.int8)


def precompute_teacher_outputs(teacher_dir: str, data_dir: Path, target: Path, meta: dict, top_k: int, actors: int) -> int:
    """Write the train split with the teacher's outputs added to `target/train/` (Parquet, as the
    cache stores splits); returns the rows written. The folder appears whole or not at all."""
    import shutil

    import ray.data

    from dataprep.cache import write_splits
    from dataprep.stream import stream_split

    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    outputs = stream_split(data_dir, "train").map_batches(
        TeacherOutputs, fn_constructor_kwargs={"teacher_dir": teacher_dir, "meta": meta, "top_k": top_k},
        batch_size=256, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1,
        # An actor that dies fails the stage (a --resume computes the outputs again). With
        # restarts on, Ray logs an error line on the console for every actor pool whose
        # constructor arguments it keeps in the object store (ray-project/ray#53727).
        max_restarts=0)
    # Cut into files as the train split is (its rows in its order: by key), whatever order the actors finish in.
    rows, _ = write_splits(outputs, tmp, None)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return rows["train"]
