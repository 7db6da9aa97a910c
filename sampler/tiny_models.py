"""Small random-weight model pairs for tests and the demo.

Nothing may be downloaded here, so the pair is built locally: one byte-level BPE
tokenizer trained on local text, a ChatML chat template, and two Qwen2 checkpoints of
different sizes and seeds whose vocabularies are padded differently (as real Qwen2.5
checkpoints of different sizes are). The output layers are scaled up so that the two
models' next-token distributions are peaked and clearly different from each other,
which is what the mixing tests need to have power.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of one tiny Qwen2 checkpoint."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    padded_vocab_size: int
    seed: int
    logit_scale: float


TEACHER_SPEC = TinyModelSpec(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                             padded_vocab_size=576, seed=1, logit_scale=12.0)
THETA_SPEC = TinyModelSpec(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                           padded_vocab_size=544, seed=2, logit_scale=12.0)
MAX_POSITIONS = 1024


def train_tokenizer(corpus: Iterable[str], vocab_size: int, out_dir: Path) -> int:
    """Train a byte-level BPE tokenizer and save it in Hugging Face format; return its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )
    fast.save_pretrained(str(out_dir))
    return len(fast)


def _write_model(spec: TinyModelSpec, tokenizer_dir: Path, out_dir: Path, eos_id: int,
                 pad_id: int) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=spec.padded_vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.hidden_size * 2,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.hidden_size // spec.num_heads,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        bos_token_id=None,
        torch_dtype="float32",
    )
    torch.manual_seed(spec.seed)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(spec.logit_scale)
    model.save_pretrained(str(out_dir))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja"):
        source = tokenizer_dir / name
        if source.exists():
            (out_dir / name).write_bytes(source.read_bytes())
    (out_dir / "generation_config.json").write_text(
        json.dumps({"eos_token_id": eos_id, "pad_token_id": pad_id}))


def make_tiny_pair(root: Path, corpus: Iterable[str], vocab_size: int = 512) -> tuple[Path, Path]:
    """Build (or reuse) a tiny teacher/theta pair under `root`; return their paths.

    A finished pair is marked by a `.complete` file, so an interrupted build is redone
    rather than half-used.
    """
    root = Path(root)
    teacher_dir, theta_dir = root / "teacher", root / "theta"
    marker = root / ".complete"
    if marker.exists():
        return teacher_dir, theta_dir
    from transformers import AutoTokenizer

    logger.info("building tiny model pair under %s", root)
    tokenizer_dir = root / "tokenizer"
    for folder in (tokenizer_dir, teacher_dir, theta_dir):
        folder.mkdir(parents=True, exist_ok=True)
    train_tokenizer(corpus, vocab_size, tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    _write_model(TEACHER_SPEC, tokenizer_dir, teacher_dir, eos_id, pad_id)
    _write_model(THETA_SPEC, tokenizer_dir, theta_dir, eos_id, pad_id)
    marker.touch()
    return teacher_dir, theta_dir
