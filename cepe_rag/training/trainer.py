"""Train CEPE cross-attention on a frozen decoder: one loop for every stage, resumable, multi-GPU via accelerate.

    loss = lm_cof * CE(target tokens) + kl_cof * KL(teacher || student)
           (teacher: ceped's stored top-k; else, with kl_cof > 0, the frozen decoder reading the gold chunk alone
            in its prompt, computed each step for the examples that know their gold chunk)
           + attn_cof * -log(cross-attention mass on the gold chunk)  (examples that know their gold chunk)
           + copy_cof * -log(copy pointer mass on the target token's occurrences in the gold chunk)
             (the answer's first token weighted copy_first_weight times the others: where to start copying is the
              hard part; later tokens follow their predecessor; with copy_spans, only the occurrences that continue
              into the whole answer count)

Losses are computed in fp32 on the target positions only (padding and prompt never count), each logged
separately. The decoder is frozen; cross-attention layers are trained; the encoder only with
`train_encoder`. A loaded checkpoint is never re-initialised.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cepe_rag.cepe import CepeForCausalLM, ChunkStateCache
from cepe_rag.cepe.cross_attention import CrossContext
from cepe_rag.cepe.model import group_by_request
from cepe_rag.padding import pad_id_of, pad_token_ids
from cepe_rag.readers.base import passage_block
from cepe_rag.training.examples import TrainingExample
from cepe_rag.types import CepeRagError

CHECKPOINT_DIR = "checkpoint"


@dataclass
class TrainConfig:
    stage: str = "read"
    steps: int = 1000
    batch_size: int = 8
    lr: float = 3e-4
    warmup_ratio: float = 0.04
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lm_cof: float = 1.0
    kl_cof: float = 0.0
    attn_cof: float = 0.0  # gold-attention loss: make the cross-attention pick the passage that holds the answer
    copy_cof: float = 0.0  # copy loss: make the copy pointer point at the answer's tokens in that passage
    relevance_temperature: float = 0.0  # > 0: the cepe reader's relevance prior on the chunks, as it reads them
    sentence_temperature: float = 0.0  # > 0: the cepe reader's sentence prior inside each chunk, as it reads them
    copy_first_weight: float = 1.0  # the copy loss's weight on each answer's first token (1: a plain mean)
    copy_spans: bool = False  # copy targets: the answer's whole occurrence in the gold chunk, not any equal token
    train_encoder: bool = False
    bf16: bool = False
    gradient_checkpointing: bool = False
    save_every: int = 100
    eval_every: int = 100
    seed: int = 0
    max_minutes: float = 0.0  # stop (validated, checkpointed, model saved) after this much training; 0 = no limit
    curriculum: bool = False  # first epoch in the examples' own (easy-to-hard) order, shuffled within blocks
    schedule: str = "cosine"  # or "constant" (after the warmup): a run continued session after session


@dataclass
class Batch:
    chunks: list[list[str]]
    input_ids: torch.Tensor  # (batch, length), right-padded
    attention_mask: torch.Tensor
    labels: torch.Tensor  # -100 on prompt and padding
    teacher_ids: torch.Tensor | None  # (target tokens, top-k), in the row-major order of the labels
    teacher_probs: torch.Tensor | None
    gold_chunks: list[int | None]
    questions: list[str]  # the user turns without passages: the gold-passage teacher's prompt adds the gold chunk
    targets: list[list[int]]

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(examples: Sequence[TrainingExample], pad_id: int) -> Batch:
    ids, mask = pad_token_ids([e.prompt_ids + e.target_ids for e in examples], pad_id, side="right")
    labels = torch.full_like(ids, -100)
    for row, example in enumerate(examples):
        labels[row, len(example.prompt_ids): example.length] = torch.tensor(example.target_ids)
    teacher_ids = teacher_probs = None
    if all(e.teacher_ids for e in examples):
        teacher_ids = torch.tensor([t for e in examples for t in e.teacher_ids], dtype=torch.long)
        teacher_probs = torch.tensor([p for e in examples for p in e.teacher_probs], dtype=torch.float32)
    return Batch([e.chunks for e in examples], ids, mask, labels, teacher_ids, teacher_probs,
                 [e.gold_chunk for e in examples], [e.question for e in examples], [e.target_ids for e in examples])


def distillation_kl(student_logits: torch.Tensor, teacher_ids: torch.Tensor,
                    teacher_probs: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) over the teacher's top-k tokens plus one bucket for the rest of the mass."""
    log_probs = torch.log_softmax(student_logits.to(torch.promote_types(student_logits.dtype, torch.float32)), dim=-1)
    student_top = log_probs.gather(-1, teacher_ids)
    student_rest = torch.log1p(-student_top.exp().sum(-1).clamp(max=1 - 1e-6))
    teacher_rest = (1 - teacher_probs.sum(-1)).clamp(min=0)
    teacher = torch.cat([teacher_probs, teacher_rest[:, None]], dim=-1)
    student = torch.cat([student_top, student_rest[:, None]], dim=-1)
    return (teacher * (teacher.clamp(min=1e-12).log() - student)).sum(-1).mean()


def full_kl(student_logits: torch.Tensor, teacher_log_probs: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) over the whole vocabulary, mean over rows; fp32."""
    student = torch.log_softmax(student_logits.float(), dim=-1)
    return (teacher_log_probs.exp() * (teacher_log_probs - student)).sum(-1).mean()


@torch.no_grad()
def gold_passage_teacher(model: CepeForCausalLM, prompt_ids: Callable[[str], list[int]], batch: Batch
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen decoder reading each example's gold chunk alone in its prompt (what `concat` at k=1 reads),
    teacher-forced on the target: (log probs (teacher rows, vocab) in fp32, which of the batch's target rows have
    one, in the row-major order of the labels)."""
    has_teacher, sequences, spans = [], [], []
    for chunks, gold, question, target in zip(batch.chunks, batch.gold_chunks, batch.questions, batch.targets):
        usable = gold is not None and bool(question)
        has_teacher += [usable] * len(target)
        if usable:
            prompt = prompt_ids(passage_block(chunks[gold]) + question)
            sequences.append(prompt + target)
            spans.append((len(prompt) - 1, len(prompt) - 1 + len(target)))
    rows = torch.tensor(has_teacher, dtype=torch.bool, device=model.device)
    if not sequences:
        return torch.zeros((0, 1), device=model.device), rows
    ids, mask = pad_token_ids(sequences, pad_id_of(model.decoder_tokenizer), side="right")
    logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits  # no context
    picked = torch.cat([logits[row, start:end] for row, (start, end) in enumerate(spans)])
    return torch.log_softmax(picked.float(), dim=-1), rows


def gold_token_mask(states_per_request: Sequence[Sequence[torch.Tensor]], gold_chunks: Sequence[int | None],
                    width: int) -> torch.Tensor:
    """(batch, width) True on the context tokens of each request's gold chunk, laid out as CrossContext.from_chunks
    concatenates the chunks; a row without a gold chunk is all False."""
    mask = torch.zeros((len(states_per_request), width), dtype=torch.bool)
    for row, (states, gold) in enumerate(zip(states_per_request, gold_chunks)):
        if gold is not None:
            start = sum(s.shape[-2] for s in states[:gold])
            mask[row, start:start + states[gold].shape[-2]] = True
    return mask


def gold_attention_mass(attention: nn.Module, hidden_states: torch.Tensor, context: CrossContext,
                        gold: torch.Tensor) -> torch.Tensor:
    """(batch, heads, length): the share of each query's cross-attention softmax that falls on the gold tokens,
    computed as the layer computes its attention (same projections, scale and padding bias) but in fp32 at least."""
    batch, length, _ = hidden_states.shape
    query = attention.q_proj(attention.layernorm(hidden_states)).view(batch, length, attention.num_kv_heads, -1,
                                                                      attention.head_dim)
    key, _ = context.key_values(attention)  # (batch, kv_heads, tokens, head_dim)
    dtype = torch.promote_types(query.dtype, torch.float32)
    scores = torch.einsum("blkgd,bktd->bkglt", query.to(dtype), key.to(dtype)) * attention.head_dim ** -0.5
    if context.prior is not None:
        scores = scores + context.prior[:, None, None, None, :].to(dtype)
    scores = scores.masked_fill(~context.mask[:, None, None, None, :], float("-inf"))
    mass = (scores.softmax(-1) * gold[:, None, None, None, :]).sum(-1)
    return mass.reshape(batch, -1, length)


def pointer_log_probs(model: CepeForCausalLM, hidden: torch.Tensor, input_ids: torch.Tensor, context: CrossContext,
                      predicting: torch.Tensor, logits: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The copy mixture at the predicting positions only (rows, vocab), as the model's forward gives it, the
    pointer's attention there (rows, context tokens), and the vocabulary id each context token is copied as there
    (rows, context tokens)."""
    pointer = model.pointer
    embeds = model.decoder.get_input_embeddings()(input_ids)
    attention = pointer.attention(hidden[:, :-1], embeds[:, :-1], context.pointer_keys(pointer), context.mask,
                                  context.pointer_prior())
    rows = predicting.nonzero()[:, 0]
    copied_as = model.copy_token_ids(context.token_ids[rows], input_ids[:, :-1][predicting])
    return pointer.mix(logits, hidden[:, :-1][predicting], attention[predicting], copied_as,
                       context.mask.any(-1)[rows]), attention[predicting], copied_as


def answer_span_targets(copied_as: torch.Tensor, targets: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """For one example's answer rows (its target tokens in order; each row's context ids as copied there), the
    context positions from which each answer token is copied as part of one whole occurrence of the answer inside
    `allowed` (the gold chunk): the i-th token from start + i. A first token that occurs all over the passage (a
    digit, a single letter) then points at the answer's own start. Trailing tokens that no position holds (the end
    of turn) are left out of the match; where the answer does not occur whole, `allowed` is returned."""
    n = len(targets)
    while n and not bool((allowed[n - 1] & (copied_as[n - 1] == targets[n - 1])).any()):
        n -= 1
    if n == 0:
        return allowed
    width = allowed.shape[-1]
    spans = torch.zeros_like(allowed)
    offsets = torch.arange(n, device=allowed.device)
    for start in (allowed[0] & (copied_as[0] == targets[0])).nonzero()[:, 0].tolist():
        if start + n > width:
            continue
        positions = start + offsets
        if bool((allowed[offsets, positions] & (copied_as[offsets, positions] == targets[:n])).all()):
            spans[offsets, positions] = True
    return spans if bool(spans.any()) else allowed


def copy_loss(attention: torch.Tensor, token_ids: torch.Tensor, targets: torch.Tensor,
              allowed: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """-log of the pointer's mass on the context tokens equal to each target token among `allowed` (the gold
    chunk's tokens), averaged over the target tokens that occur there (weighted by `weights`, one per target token,
    if given); 0 if none does."""
    hits = (token_ids == targets[:, None]) & allowed
    found = hits.any(-1)
    if not bool(found.any()):
        return attention.new_zeros(())
    nll = -(attention * hits).sum(-1)[found].clamp_min(1e-6).log()
    if weights is None:
        return nll.mean()
    weights = weights[found].to(nll.dtype)
    return (nll * weights).sum() / weights.sum()


class CepeTrainingModule(nn.Module):
    """The model plus its losses in one forward, so accelerate/DDP can wrap it."""

    def __init__(self, model: CepeForCausalLM, *, train_encoder: bool = False,
                 state_cache: ChunkStateCache | None = None, gold_attention: bool = False,
                 teacher_prompt: Callable[[str], list[int]] | None = None,
                 relevance: Callable[[str, list[str]], list[float]] | None = None, copy_first_weight: float = 1.0,
                 copy_spans: bool = False):
        super().__init__()
        self.copy_first_weight = copy_first_weight
        self.copy_spans = copy_spans  # copy targets: the answer's own occurrence, not any equal token in the gold
        self.model = model
        self.relevance = relevance  # (question, chunks) -> log weights: the relevance prior the reader will apply
        self.teacher_prompt = teacher_prompt  # given: distil from the decoder reading the gold chunk in its prompt
        self.train_encoder = train_encoder
        self.gold_attention = gold_attention  # compute the gold-attention loss (costs one more K projection a layer)
        # A frozen encoder gives every passage the same states in every example it appears in.
        self.state_cache = state_cache if not train_encoder else None

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.train_encoder:
            self.model.encoder.eval()  # no dropout in a frozen encoder
        return self

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(CE, KL, gold-attention loss, copy loss); a loss that does not apply to the batch is 0."""
        model = self.model
        flat = [text for chunks in batch.chunks for text in chunks]
        if self.state_cache is not None:
            dtype = model.cross_attention_layers()[0].cross_attn.k_proj.weight.dtype
            states = [state.to(dtype=dtype, device=model.device) for state in self.state_cache.lookup(flat)]
        else:
            with torch.set_grad_enabled(self.train_encoder and torch.is_grad_enabled()):
                states = model.encode_token_chunks(model.tokenize_chunks(flat)) if flat else []
        per_request = group_by_request(states, batch.chunks)
        token_ids = group_by_request(model.tokenize_chunks(flat), batch.chunks) if model.pointer is not None else None
        log_weights = None
        if self.relevance is not None:  # examples without a question (the corpus stages) get weights of 1
            log_weights = [self.relevance(question, chunks) if question and chunks else [0.0] * len(chunks)
                           for question, chunks in zip(batch.questions, batch.chunks)]
        context = model.context_from_states(per_request, cross_kv="project", token_ids=token_ids,
                                            chunk_log_weights=log_weights) if flat else None
        device = model.device
        labels = batch.labels.to(device)[:, 1:]
        predicting = labels != -100
        masses, hooks = [], []
        # The gold chunk's context tokens: what the gold-attention and copy losses point at.
        gold = (None if context is None else
                gold_token_mask(per_request, batch.gold_chunks, context.mask.shape[1]).to(device))
        if self.gold_attention and context is not None and any(g is not None for g in batch.gold_chunks):

            def record_mass(attention, args, output):
                masses.append(gold_attention_mass(attention, args[0], args[1], gold))

            hooks = [layer.cross_attn.register_forward_hook(record_mass) for layer in model.cross_attention_layers()]
        try:
            hidden = model.decoder.base_model(input_ids=batch.input_ids.to(device),
                                              attention_mask=batch.attention_mask.to(device),
                                              cross_context=context, use_cache=False).last_hidden_state
        finally:
            for hook in hooks:
                hook.remove()
        # The LM head only where a target token is predicted: fp32 logits for a few hundred rows, not all.
        logits = model.decoder.get_output_embeddings()(hidden[:, :-1][predicting])
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        zero = torch.zeros((), device=device)
        copy = zero
        if model.pointer is not None and context is not None:  # log p of the copy mixture: CE and KL read it as logits
            logits, pointed, copied_as = pointer_log_probs(model, hidden, batch.input_ids.to(device), context,
                                                           predicting, logits)
            rows = predicting.nonzero()[:, 0]
            weights = None
            if self.copy_first_weight != 1.0:  # each row's first predicting position is its answer's first token
                first = (predicting.cumsum(-1) == 1)[predicting]
                weights = 1.0 + (self.copy_first_weight - 1.0) * first.float()
            targets, allowed = labels[predicting], gold[rows]
            if self.copy_spans:
                allowed = torch.cat([answer_span_targets(copied_as[rows == row], targets[rows == row],
                                                         allowed[rows == row]) for row in rows.unique_consecutive()])
            copy = copy_loss(pointed, copied_as, targets, allowed, weights)
        ce = F.cross_entropy(logits, labels[predicting])
        kl = zero
        if batch.teacher_ids is not None:
            kl = distillation_kl(logits, batch.teacher_ids.to(device), batch.teacher_probs.to(device))
        elif self.teacher_prompt is not None:
            teacher, rows_with_teacher = gold_passage_teacher(model, self.teacher_prompt, batch)
            if bool(rows_with_teacher.any()):
                kl = full_kl(logits[rows_with_teacher], teacher)
        rows = torch.tensor([g is not None for g in batch.gold_chunks], device=device)
        where = predicting & rows[:, None]
        if not masses or not bool(where.any()):
            return ce, kl, zero, copy
        # At the positions that predict an answer token of a row whose gold chunk is encoded; mean over heads,
        # positions and layers.
        mass = torch.stack(masses)[..., :-1]  # (layers, batch, heads, length - 1)
        nll = -mass.clamp_min(1e-6).log().mean(2)  # (layers, batch, length - 1)
        return ce, kl, nll[:, where].mean(), copy


def trainable_parameters(model: CepeForCausalLM, train_encoder: bool) -> dict[str, nn.Parameter]:
    """Freeze everything, then unfreeze cross-attention (and the encoder if asked)."""
    model.requires_grad_(False)
    chosen = {}
    for name, parameter in model.named_parameters():
        if ".cross_attn." in name or (train_encoder and name.startswith("encoder.")):
            parameter.requires_grad_(True)
            chosen[name] = parameter
    if not chosen:
        raise CepeRagError("the model has no cross-attention layers to train")
    return chosen


def train(model: CepeForCausalLM, examples: Sequence[TrainingExample], config: TrainConfig, out_dir: str | Path, *,
          validation: Sequence[TrainingExample] = (), save_model: Callable[[CepeForCausalLM, Path], None] | None = None,
          state_cache: ChunkStateCache | None = None, progress: bool = True,
          on_step: Callable[[dict], None] | None = None,
          teacher_prompt: Callable[[str], list[int]] | None = None,
          relevance: Callable[[str, list[str]], list[float]] | None = None) -> list[dict]:
    """Run (or resume) `config.steps` optimiser steps; returns the log records. Writes to `out_dir`:
    train_config.json, log.jsonl, checkpoint/ (trainable weights, optimiser, step) and, at the end,
    `save_model(model, out_dir / "model")`. An interrupted run resumes from its last checkpoint."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    if not examples:
        raise CepeRagError("no training examples")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_same_config(out, config)
    accelerator = Accelerator(mixed_precision="bf16" if config.bf16 else "no",
                              cpu=not torch.cuda.is_available() or model.device.type == "cpu")
    torch.manual_seed(config.seed)
    params = trainable_parameters(model, config.train_encoder)
    if config.gradient_checkpointing:
        model.decoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(list(params.values()), lr=config.lr, weight_decay=config.weight_decay)
    warmup_steps = math.ceil(config.warmup_ratio * config.steps)
    scheduler = (get_constant_schedule_with_warmup(optimizer, warmup_steps) if config.schedule == "constant" else
                 get_cosine_schedule_with_warmup(optimizer, warmup_steps, config.steps))
    step = _load_checkpoint(out / CHECKPOINT_DIR, params, optimizer, scheduler)
    module, optimizer, scheduler = accelerator.prepare(
        CepeTrainingModule(model, train_encoder=config.train_encoder, state_cache=state_cache,
                           gold_attention=config.attn_cof > 0,
                           teacher_prompt=teacher_prompt if config.kl_cof > 0 else None,
                           relevance=relevance if config.relevance_temperature > 0 or config.sentence_temperature > 0
                           else None,
                           copy_first_weight=config.copy_first_weight, copy_spans=config.copy_spans).train(),
        optimizer, scheduler)
    pad_id = pad_id_of(model.decoder_tokenizer)
    order = _order(len(examples), config, accelerator.num_processes, accelerator.process_index)
    log_path = out / "log.jsonl"
    records = []
    bar = tqdm(total=config.steps, initial=step, disable=not progress or not accelerator.is_main_process,
               desc=f"train {config.stage}")
    started, tokens_seen = time.perf_counter(), 0
    while step < config.steps:
        batch = collate([examples[i] for i in order(step)], pad_id)
        ce, kl, attn, copy = module(batch)
        loss = config.lm_cof * ce + config.kl_cof * kl + config.attn_cof * attn + config.copy_cof * copy
        if loss.requires_grad:
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(list(params.values()), config.max_grad_norm)
            optimizer.step()
        else:  # no example of the batch has an encoder chunk (all its passages in the prompt): nothing to learn
            grad_norm = torch.zeros(())
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += batch.n_tokens
        elapsed = time.perf_counter() - started
        rate = tokens_seen / elapsed
        last = step == config.steps or bool(config.max_minutes and elapsed > 60 * config.max_minutes)
        record = {"step": step, "loss": loss.item(), "ce": ce.item(), "kl": kl.item(), "attn": attn.item(),
                  "copy": copy.item(),
                  "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm), "tokens_per_s": round(rate, 1),
                  "elapsed_s": round(elapsed, 2)}
        if validation and (step % config.eval_every == 0 or last):
            record.update(evaluate(module, validation, config, pad_id))
        records.append(record)
        bar.set_postfix(ce=f"{record['ce']:.3f}", kl=f"{record['kl']:.3f}", tok_s=f"{rate:.0f}")
        bar.update(1)
        if accelerator.is_main_process:
            with log_path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            if step % config.save_every == 0 or last:
                _save_checkpoint(out / CHECKPOINT_DIR, params, optimizer, scheduler, step)
        if on_step is not None:
            on_step(record)
        if last:
            break
    bar.close()
    if accelerator.is_main_process and save_model is not None:
        model.eval()
        save_model(accelerator.unwrap_model(module).model, out / "model")
    return records


@torch.no_grad()
def evaluate(module: nn.Module, examples: Sequence[TrainingExample], config: TrainConfig, pad_id: int) -> dict:
    """Mean validation losses (per batch), with the model in eval mode."""
    module.eval()
    sums = [0.0, 0.0, 0.0, 0.0]
    batches = 0
    for start in range(0, len(examples), config.batch_size):
        losses = module(collate(examples[start:start + config.batch_size], pad_id))
        sums = [total + loss.item() for total, loss in zip(sums, losses)]
        batches += 1
    module.train()
    return {"val_ce": sums[0] / batches, "val_kl": sums[1] / batches, "val_attn": sums[2] / batches,
            "val_copy": sums[3] / batches}


def _order(n: int, config: TrainConfig, world: int, rank: int) -> Callable[[int], list[int]]:
    """Example indices for a step: a fresh seeded shuffle per epoch, so a resumed run sees the same data. With a
    curriculum the first epoch keeps the examples' order, shuffled only within blocks of 32 steps."""
    per_step = config.batch_size * world
    cache: dict[int, list[int]] = {}

    def indices(step: int) -> list[int]:
        out = []
        for position in range(step * per_step + rank * config.batch_size,
                              step * per_step + (rank + 1) * config.batch_size):
            epoch, offset = divmod(position, n)
            if epoch not in cache:
                rng = random.Random(config.seed * 1_000_003 + epoch)
                block = 32 * per_step if config.curriculum and epoch == 0 else n
                cache[epoch] = []
                for start in range(0, n, block):
                    part = list(range(start, min(n, start + block)))
                    rng.shuffle(part)
                    cache[epoch] += part
            out.append(cache[epoch][offset])
        return out

    return indices


def _check_same_config(out: Path, config: TrainConfig) -> None:
    path = out / "train_config.json"
    current = asdict(config)
    if path.exists() and (out / CHECKPOINT_DIR).exists():
        try:
            saved = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise CepeRagError(f"{path} is not valid JSON; move the run folder away to start afresh") from None
        defaults = asdict(TrainConfig())  # a setting added since the run started has its default there
        changed = sorted(k for k in current if k not in ("steps", "save_every", "eval_every", "max_minutes")
                         and saved.get(k, defaults[k]) != current[k])
        if changed:
            raise CepeRagError(f"{out} holds a run with other settings ({', '.join(changed)}); "
                               "use another --out or the same settings to resume")
    path.write_text(json.dumps(current, indent=2))


def _save_checkpoint(folder: Path, params: dict[str, nn.Parameter], optimizer, scheduler, step: int) -> None:
    """Written next to the old one, then swapped in: an interruption leaves one complete checkpoint."""
    from safetensors.torch import save_file

    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in params.items()},
              str(staging / "trainable.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, staging / "optimizer.pt")
    (staging / "state.json").write_text(json.dumps({"step": step, "parameters": sorted(params)}))
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    staging.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(folder: Path, params: dict[str, nn.Parameter], optimizer, scheduler) -> int:
    if not folder.exists():
        old = folder.with_name(folder.name + ".old")  # interrupted between the two renames
        if not old.exists():
            return 0
        old.rename(folder)
    from safetensors.torch import load_file

    try:
        state = json.loads((folder / "state.json").read_text())
        weights = load_file(str(folder / "trainable.safetensors"))
        rest = torch.load(folder / "optimizer.pt", weights_only=True, map_location="cpu")
    except (OSError, json.JSONDecodeError, RuntimeError) as error:
        raise CepeRagError(f"{folder}: unreadable training checkpoint ({str(error).splitlines()[0]})") from None
    if sorted(weights) != sorted(params):
        raise CepeRagError(f"{folder}: checkpoint parameters do not match this model")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(rest["optimizer"])
    scheduler.load_state_dict(rest["scheduler"])
    return int(state["step"])
