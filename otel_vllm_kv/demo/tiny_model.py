"""A tiny model directory that vLLM can load on CPU with no download.

Weights are never read (``load_format="dummy"`` fills them at random), so the
directory holds only a config and a byte-level tokenizer: one token per byte,
which makes prompt lengths in tokens exactly the byte length of the prompt.
"""

from __future__ import annotations

import json
from pathlib import Path

#: vLLM's CPU attention kernel rejects head_dim 16; 2 heads of 64 pass.
HIDDEN_SIZE = 128
NUM_HEADS = 2
MAX_MODEL_LEN = 2048
#: 256 byte tokens, then BOS and EOS.
BOS_TOKEN_ID = 256
EOS_TOKEN_ID = 257
VOCAB_SIZE = 258


def _llama_config(max_model_len: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN_SIZE,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": NUM_HEADS,
        "num_key_value_heads": NUM_HEADS,
        "head_dim": HIDDEN_SIZE // NUM_HEADS,
        "hidden_act": "silu",
        "max_position_embeddings": max_model_len,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "vocab_size": VOCAB_SIZE,
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }


#: Tokens each sliding-window layer of the hybrid tiny model attends to.
SLIDING_WINDOW = 256


def _gemma2_config(max_model_len: int) -> dict:
    """Gemma 2's layout: sliding-window and full-attention layers alternate, so vLLM builds two KV-cache groups."""
    return {
        **_llama_config(max_model_len),
        "architectures": ["Gemma2ForCausalLM"],
        "model_type": "gemma2",
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": HIDDEN_SIZE // NUM_HEADS,
        "sliding_window": SLIDING_WINDOW,
        "layer_types": ["sliding_attention", "full_attention"],
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "tie_word_embeddings": True,
    }


def _byte_alphabet() -> list[str]:
    """GPT-2's byte-to-unicode table: the printable stand-in of each byte, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return [chars[byte] for byte in range(256)]


def _write_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in enumerate(_byte_alphabet())}
    vocab["<s>"] = BOS_TOKEN_ID
    vocab["</s>"] = EOS_TOKEN_ID
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<s>", "</s>"])
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<s>",
                "add_bos_token": False,
                "model_max_length": MAX_MODEL_LEN,
                "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
            }
        )
    )


#: Cache blocks the demo and the tests give the engine: 63 allocatable blocks of 128 tokens on CPU.
NUM_GPU_BLOCKS = 64

#: The one dtype of every engine on the tiny model (the demo, the tests, the examples, the
#: benchmarks). vLLM's ``dtype="auto"`` turns a float32 config into bfloat16 on CPU, and in
#: bfloat16 on an Intel CPU with AMX, vLLM's attention takes its AMX kernel, whose tile
#: instructions need a Linux permission that vLLM never asks for (only oneDNN does, lazily):
#: the worker then dies with SIGILL at random. float32 selects the vector kernel on every
#: CPU. Evidence and details: docs/cpu-paths.md.
DTYPE = "float32"


def engine_kwargs(directory: str | Path, served_model_name: str = "tiny", **overrides) -> dict:
    """Arguments for ``LLM`` / ``EngineArgs`` that start the tiny model quickly with a small cache."""
    kwargs = dict(
        model=str(directory),
        served_model_name=served_model_name,
        load_format="dummy",
        max_model_len=MAX_MODEL_LEN,
        num_gpu_blocks_override=NUM_GPU_BLOCKS,
        dtype=DTYPE,
        enforce_eager=True,
        seed=0,
    )
    kwargs.update(overrides)
    return kwargs


def server_arguments(directory: str | Path, served_model_name: str = "tiny", **overrides) -> list[str]:
    """``engine_kwargs`` as command-line options of ``vllm serve`` and vLLM's OpenAI server module.

    A flag set to False is left out: vLLM's flags such as ``--disable-log-stats`` are off by default.
    """
    arguments = []
    for name, value in engine_kwargs(directory, served_model_name, **overrides).items():
        option = "--" + name.replace("_", "-")
        if value is True:
            arguments.append(option)
        elif value is not False:
            arguments += [option, str(value)]
    return arguments


def build_tiny_model(directory: str | Path, max_model_len: int = MAX_MODEL_LEN, hybrid: bool = False) -> Path:
    """Write a Llama-style config (Gemma2-style with ``hybrid``) and a byte-level tokenizer into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = _gemma2_config(max_model_len) if hybrid else _llama_config(max_model_len)
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "generation_config.json").write_text(
        json.dumps({"bos_token_id": BOS_TOKEN_ID, "eos_token_id": EOS_TOKEN_ID})
    )
    _write_tokenizer(directory)
    return directory
