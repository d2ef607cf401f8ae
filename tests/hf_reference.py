"""Hugging Face transformers' LlamaForCausalLM as the independent reference of the model tests."""

import numpy as np
import torch
import transformers

from jaxnvrar.models.llama import LlamaConfig, hf_config_dict


def save_reference(directory, config: LlamaConfig, prompts: np.ndarray, new_tokens: int, **save_kwargs):
    """Saves a random HF Llama of `config` to `directory`; returns its logits on `prompts` and
    its greedy continuation of `new_tokens` tokens."""
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config_dict(config),
                                                                attn_implementation="eager")).eval()
    hf.save_pretrained(directory, **save_kwargs)
    ids = torch.tensor(prompts)
    with torch.no_grad():
        logits = hf(ids).logits.numpy()
        tokens = hf.generate(ids, attention_mask=torch.ones(ids.shape, dtype=torch.long),
                             max_new_tokens=new_tokens, do_sample=False, pad_token_id=0).numpy()
    return logits, tokens
