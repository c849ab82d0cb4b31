"""The model side of the merge-quality benchmark: zero-shot heads, scoring, LoRA training, adapter deltas.

The base model is an encoder (MiniLM) or a decoder LM (GPT-2, Llama-like); its family (config.model_type)
says which modules the task LoRAs adapt. Every adapter (trained, merged by `ctm`, or merged by PEFT) is loaded
with real PEFT, folded into the base weights, and kept as a per-weight delta ΔW; scoring sets
W = W_base + scale · ΔW in place, so one model on the device scores everything and a rule's λ can be swept on
validation without a new merge.
"""

from __future__ import annotations

import copy
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from quality_data import Tokens
from quality_metrics import label_words

BASE_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"  # the default model's name in the adapters' configs
MODEL_PREFIX = "base_model.model."


@dataclass(frozen=True)
class Architecture:
    """One model family: the modules the task LoRAs adapt, whether it is a decoder (it reads a start token first,
    see `embed`), and whether its linear weights are stored in × out (GPT-2's Conv1D, which PEFT must be told)."""

    target_modules: tuple[str, ...]
    decoder: bool
    fan_in_fan_out: bool = False


LLAMA_LIKE = Architecture(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), decoder=True)
ARCHITECTURES = {  # by config.model_type: every linear layer of attention and MLP, as for MiniLM
    "bert": Architecture(
        ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"), decoder=False
    ),
    "gpt2": Architecture(("c_attn", "c_proj", "c_fc"), decoder=True, fan_in_fan_out=True),
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "qwen3": LLAMA_LIKE,
}


def architecture(model_type: str) -> Architecture:
    """The LoRA targets of a model family; a family not in the table is refused with the ones that are."""
    if model_type not in ARCHITECTURES:
        raise ValueError(f"no LoRA targets known for model type {model_type!r} (known: {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[model_type]


@dataclass(frozen=True)
class TrainConfig:
    """The training protocol of the benchmark's task adapters."""

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    learning_rate: float = 5e-4
    epochs: int = 3
    batch_size: int = 32


def load_base_model(folder: Path, device: torch.device):
    """The base model without any head, in float32 (whatever dtype it is stored in), and its tokenizer."""
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    model.config.use_cache = False  # nothing is generated: a decoder need not keep its keys and values
    return model, prepare_tokenizer(AutoTokenizer.from_pretrained(folder))


def prepare_tokenizer(tokenizer):
    """Pad on the right (`embed` takes the first `length` tokens as the real ones), with end-of-text where the
    model has no pad token (GPT-2); padded positions are masked, so the pad id never matters."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def embed(model, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings as MiniLM's own recipe makes them, for every model: mean over real tokens, L2-normalised.

    A decoder reads each text after one start token whose state is left out of the mean: a causal model's first
    position sees nothing before it and ends in nearly the same state for every input (mean-pooled label words
    of SmolLM2 were 0.9999 alike without it); right padding keeps the real tokens' states unchanged.
    """
    start = start_token_id(model.config)
    if start is not None:
        ids = torch.cat([ids.new_full((len(ids), 1), start), ids], dim=1)
        lengths = lengths + 1
    width = int(lengths.max())
    ids = ids[:, :width].to(torch.long)
    mask = (torch.arange(width, device=ids.device) < lengths.unsqueeze(1)).to(torch.long)
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    if start is not None:
        weights[:, 0] = 0.0
    pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
    return F.normalize(pooled, dim=-1)


def start_token_id(config) -> int | None:
    """The token a decoder reads first (its beginning-of-text, else end-of-text token); None for an encoder."""
    if not architecture(config.model_type).decoder:
        return None
    start = config.bos_token_id if config.bos_token_id is not None else config.eos_token_id
    if start is None:
        raise ValueError(f"the {config.model_type} model names no bos_token_id or eos_token_id to start a text with")
    return start


@torch.no_grad()
def label_head(model, tokenizer, class_names: list[str], temperature: float) -> torch.Tensor:
    """Frozen zero-shot head W = normalize(embed(label words)) / τ, one row per class, no bias."""
    device = next(model.parameters()).device
    encoded = tokenizer([label_words(n) for n in class_names], padding=True, return_tensors="pt")
    lengths = encoded["attention_mask"].sum(dim=1)
    return embed(model, encoded["input_ids"].to(device), lengths.to(device)) / temperature


@dataclass(frozen=True)
class Pool:
    """One split of all tasks as one set on the device: length-sorted batches, labels, each task's span."""

    batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (positions, ids, lengths)
    labels: torch.Tensor
    spans: dict[str, slice]


def pool_split(tasks, split: str, device: torch.device, batch_size: int) -> Pool:
    """Concatenate every task's `split` and cut it into batches of similar lengths (less padding, fewer calls)."""
    ids = torch.cat([t.splits[split].tokens.ids for t in tasks])
    lengths = torch.cat([t.splits[split].tokens.lengths for t in tasks])
    labels = torch.cat([t.splits[split].labels for t in tasks]).to(device)
    spans, start = {}, 0
    for task in tasks:
        spans[task.name] = slice(start, start + len(task.splits[split].labels))
        start = spans[task.name].stop
    order = torch.argsort(lengths, descending=True)
    batches = []
    for positions in order.split(batch_size):
        width = int(lengths[positions].max())
        batches.append((positions.to(device), ids[positions, :width].to(device), lengths[positions].to(device)))
    return Pool(batches=batches, labels=labels, spans=spans)


@torch.no_grad()
def pooled_accuracy(model, pool: Pool, heads: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each task's accuracy: the share of its examples whose highest cosine logit is the true class."""
    embeddings = None
    for positions, ids, lengths in pool.batches:
        batch = embed(model, ids, lengths)
        if embeddings is None:
            embeddings = batch.new_empty((len(pool.labels), batch.shape[1]))
        embeddings[positions] = batch
    return {
        task: float(((embeddings[span] @ heads[task].T).argmax(dim=1) == pool.labels[span]).float().mean())
        for task, span in pool.spans.items()
    }


def lora_config(model_type: str, config: TrainConfig, base_model_id: str):
    """The PEFT LoraConfig of the task adapters for a model family, naming the base model `base_model_id`."""
    from peft import LoraConfig

    family = architecture(model_type)
    extra = {"fan_in_fan_out": True} if family.fan_in_fan_out else {}  # MiniLM's config stays as it was
    return LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(family.target_modules),
        base_model_name_or_path=base_model_id,
        **extra,
    )


def train_adapter(
    base,
    tokens: Tokens,
    labels: torch.Tensor,
    head: torch.Tensor,
    config: TrainConfig,
    seed: int,
    output: Path,
    base_model_id: str,
) -> Path:
    """Train one LoRA against the frozen head (cross-entropy on cosine logits) and save it as a PEFT folder.

    AdamW with a one-cycle schedule; the seed fixes the LoRA initialisation, dropout and the shuffles.
    """
    from peft import get_peft_model

    torch.manual_seed(seed)
    device = head.device
    lora = lora_config(base.config.model_type, config, base_model_id)
    model = get_peft_model(copy.deepcopy(base), lora).to(device)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)
    steps_per_epoch = math.ceil(len(labels) / config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.learning_rate, total_steps=config.epochs * steps_per_epoch
    )
    shuffle = torch.Generator().manual_seed(seed)
    for _ in range(config.epochs):
        for index in torch.randperm(len(labels), generator=shuffle).split(config.batch_size):
            logits = embed(model, tokens.ids[index].to(device), tokens.lengths[index].to(device)) @ head.T
            loss = F.cross_entropy(logits, labels[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.peft_config["default"].base_model_name_or_path = base_model_id
    partial = output.with_name(output.name + ".partial")  # the folder appears whole or not at all
    for folder in (partial, output):
        if folder.exists():
            shutil.rmtree(folder)
    model.save_pretrained(partial)
    partial.rename(output)
    return output


def is_saved_adapter(folder: Path) -> bool:
    """Whether `folder` holds an adapter saved by `train_adapter` (written whole, then renamed into place)."""
    return (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()


@dataclass(frozen=True)
class TrainJob:
    """One adapter to train in a worker process: everything `train_adapter` needs, as picklable data."""

    model_folder: Path
    tokens: Tokens
    labels: torch.Tensor
    head: torch.Tensor  # on the CPU; moved to `device` in the worker
    config: TrainConfig
    seed: int
    output: Path
    device: str
    base_model_id: str


def run_train_job(job: TrainJob) -> Path:
    """Train one adapter in a fresh process (the benchmark's --train-jobs), on the job's device."""
    device = torch.device(job.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as the main process sets it
    base, _ = load_base_model(job.model_folder, torch.device("cpu"))
    head = job.head.to(device)
    return train_adapter(base, job.tokens, job.labels, head, job.config, job.seed, job.output, job.base_model_id)


class AdapterReader:
    """Reads adapters with real PEFT into per-weight deltas ΔW, through one PeftModel kept for the purpose.

    Each folder is loaded as a named adapter, each LoRA layer's own `get_delta_weight` gives its ΔW (the
    same update PEFT adds when merging), and the adapter is deleted again.
    """

    def __init__(self, base_cpu, anchor: Path, device: torch.device):
        from peft import PeftModel

        base = copy.deepcopy(base_cpu).to(device)
        self.model = PeftModel.from_pretrained(base, str(anchor), adapter_name="anchor").to(device)
        self.device = device
        self._count = 0

    @torch.no_grad()
    def delta(self, folder: Path) -> dict[str, torch.Tensor]:
        """ΔW by base-model weight name for every module the adapter in `folder` changes."""
        from peft.tuners.lora import LoraLayer

        self._count += 1
        name = f"read{self._count}"
        self.model.load_adapter(str(folder), adapter_name=name, torch_device=str(self.device))
        try:
            return {
                f"{module_name.removeprefix(MODEL_PREFIX)}.weight": module.get_delta_weight(name).detach().clone()
                for module_name, module in self.model.named_modules()
                if isinstance(module, LoraLayer) and name in module.lora_A
            }
        finally:
            self.model.delete_adapter(name)


class Scorer:
    """One model on the device whose weights are set to W_base + scale · ΔW before each scoring."""

    def __init__(self, model, tasks, heads: dict[str, torch.Tensor], batch_size: int):
        self.model = model
        self.heads = heads
        device = next(model.parameters()).device
        self.pools = {split: pool_split(tasks, split, device, batch_size) for split in ("val", "test")}
        self._params = dict(model.named_parameters())
        self._base = {name: p.detach().clone() for name, p in self._params.items()}
        self._touched: set[str] = set()

    @torch.no_grad()
    def apply(self, delta: dict[str, torch.Tensor] | None, scale: float = 1.0) -> None:
        """Set the weights to the base plus `scale` times `delta` (None: the base alone)."""
        delta = delta or {}
        for name in self._touched - set(delta):
            self._params[name].copy_(self._base[name])
        for name, change in delta.items():
            self._params[name].copy_(self._base[name] + scale * change.to(self._base[name].device))
        self._touched = set(delta)

    def score(self, split: str) -> dict[str, float]:
        """Accuracy on every task's `split` with the weights as last applied."""
        return pooled_accuracy(self.model, self.pools[split], self.heads)
