"""What the examples share: the Llama-style configs, tiny (CPU) or large (hidden 2048, 16/4
heads), and the device and dtype to run on."""
import torch
import transformers


def device_and_dtype():
    """("cuda", bf16) when a GPU is there, else ("cpu", fp32)."""
    return ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)


def llama_config(size):
    if size == "large":
        return transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                        num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4)
    return transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2)
