"""The Llama-style configs the examples share: tiny (CPU) or large (hidden 2048, 16/4 heads)."""
import transformers


def llama_config(size):
    if size == "large":
        return transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                        num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4)
    return transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2)
