"""Tiny transformers models for the tests, made here and saved to a folder (nothing downloaded):
a byte-level BPE tokenizer trained on this Python's own sources, and Llama- and GPT-2-shaped
causal LMs built from configs, written with `save_pretrained` as a model from the hub would be."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def train_tokenizer(folder: Path, vocab_size: int = 384, glob: str = "json/*.py"):
    """A byte-level BPE with start, end and padding tokens, saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=list(SPECIALS.values()), show_progress=False)
    tokenizer.train_from_iterator((p.read_text() for p in sorted(STDLIB.glob(glob))), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIALS)
    wrapped.save_pretrained(folder)
    return wrapped


LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64}


def save_model(folder: Path, architecture: dict = LLAMA, vocab_size: int = 384, seed: int = 0) -> Path:
    """A causal LM with fresh weights and its tokenizer, saved as a model folder: config.json,
    model.safetensors, generation_config.json and the tokenizer's files."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = train_tokenizer(folder, vocab_size)
    values = dict(architecture)
    config = AutoConfig.for_model(values.pop("model_type"), vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **values)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def hf_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


BERT = {"model_type": "bert", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "max_position_embeddings": 128}
BERT_SPECIALS = {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]"}


def save_classifier(folder: Path, classes: list[str], vocab_size: int = 512, seed: int = 0) -> Path:
    """A BERT-style sequence classifier with fresh weights and a WordPiece-free byte-level BPE that
    wraps each text as [CLS] text [SEP], saved as a model folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=list(BERT_SPECIALS.values()), show_progress=False)
    tokenizer.train_from_iterator((p.read_text() for p in sorted(STDLIB.glob("http/*.py"))), trainer=trainer)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls),
                                                                                                       ("[SEP]", sep)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **BERT_SPECIALS)
    wrapped.save_pretrained(folder)
    values = dict(BERT)
    config = AutoConfig.for_model(values.pop("model_type"), vocab_size=len(wrapped), pad_token_id=wrapped.pad_token_id,
                                  num_labels=len(classes), id2label=dict(enumerate(classes)),
                                  label2id={c: i for i, c in enumerate(classes)}, **values)
    torch.manual_seed(seed)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    return folder


CUSTOM_CONFIG = '''
from transformers import PretrainedConfig


class TinyLMConfig(PretrainedConfig):
    model_type = "tinylm"

    def __init__(self, vocab_size=384, width=16, **kwargs):
        self.vocab_size, self.width = vocab_size, width
        super().__init__(**kwargs)
'''

CUSTOM_MODEL = '''
import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_tinylm import TinyLMConfig


class TinyLM(PreTrainedModel):
    config_class = TinyLMConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.width)
        self.head = nn.Linear(config.width, config.vocab_size)
        self.post_init()

    def forward(self, input_ids, use_cache=None, **kwargs):
        return CausalLMOutput(logits=self.head(torch.tanh(self.embed(input_ids))))
'''


def save_custom_code_model(folder: Path) -> Path:
    """A causal LM whose architecture is the folder's own Python code (config.json's auto_map), as
    models that need trust_remote_code are, with fresh weights and a tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = train_tokenizer(folder)
    (folder / "configuration_tinylm.py").write_text(CUSTOM_CONFIG)
    (folder / "modeling_tinylm.py").write_text(CUSTOM_MODEL)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "tinylm", "vocab_size": len(tokenizer), "width": 16, "architectures": ["TinyLM"],
        "auto_map": {"AutoConfig": "configuration_tinylm.TinyLMConfig", "AutoModelForCausalLM": "modeling_tinylm.TinyLM"}}))
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    AutoModelForCausalLM.from_config(config, trust_remote_code=True).save_pretrained(folder)
    return folder
