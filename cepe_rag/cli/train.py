"""`cepe-rag train`: give a decoder CEPE cross-attention, one stage of the recipe at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cepe_rag.cli.options import (
    DeviceOption,
    quiet_libraries,
)
from cepe_rag.cli.output import console
from cepe_rag.models import (
    default_device,
)
from cepe_rag.settings import (
    DEFAULT_DECODER,
    DEFAULT_EMBEDDER,
    check_choice,
)
from cepe_rag.training import STAGES, TrainConfig, run_training
from cepe_rag.types import CepeRagError

app = typer.Typer(add_completion=False)


@app.command("train")
def train_command(
    stage: Annotated[str, typer.Option(help="warmup, standard, read (reading with distractors), ceped "
                                            "(distillation from the decoder with passages in its prompt) or qa "
                                            "(questions with retrieved passages, short answers).")] = "read",
    out: Annotated[Path, typer.Option(help="Run folder: examples, log.jsonl, checkpoint/ (resume by rerunning), "
                                           "model/ (the trained adapter).")] = Path("runs/train"),
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 1000,
    batch_size: Annotated[int, typer.Option(help="Examples per step (per process).")] = 8,
    lr: Annotated[float, typer.Option(help="Peak learning rate (cosine schedule).")] = 3e-4,
    warmup_ratio: Annotated[float, typer.Option(help="Share of steps with a linear learning-rate warmup.")] = 0.04,
    decoder: Annotated[str, typer.Option(help="Frozen chat decoder.")] = DEFAULT_DECODER,
    encoder: Annotated[str, typer.Option(help="Encoder: a sentence-transformers/HF encoder name, or "
                                              "decoder-layers:N (the decoder's first N layers).")] = DEFAULT_EMBEDDER,
    init: Annotated[str | None, typer.Option(help="Continue from a trained CEPE checkpoint or adapter "
                                                  "(its weights are kept).")] = None,
    init_mode: Annotated[str | None, typer.Option(help="New cross-attention: zero (starts as the plain decoder) or "
                                                       "copy (from self-attention) [default: zero; copy with --gate]."
                                                  )] = None,
    cross_attn_layers: Annotated[int, typer.Option(help="Cross-attention in the last N decoder layers.")] = 8,
    train_encoder: Annotated[bool, typer.Option(help="Train the encoder too.")] = False,
    lm_cof: Annotated[float, typer.Option(help="Weight of the cross-entropy loss.")] = 1.0,
    kl_cof: Annotated[float | None, typer.Option(
        help="Weight of the KL loss (default: 2 for ceped, else 0). ceped distils from its stored teacher; find, swap "
             "and qa from the frozen decoder reading the gold passage alone in its prompt.")] = None,
    attn_cof: Annotated[float, typer.Option(
        help="find/swap/qa: weight of the gold-attention loss, -log of the cross-attention mass on the passage that "
             "holds the answer (when it is encoded).")] = 0.0,
    copy_cof: Annotated[float, typer.Option(
        help="With --copy-pointer: weight of the copy loss, -log of the pointer's mass on the target token in the "
             "passage that holds the answer.")] = 0.0,
    corpus: Annotated[str, typer.Option(help="wiki-summaries (packaged), a local file/folder, or a hub dataset.")] = (
        "wiki-summaries"),
    languages: Annotated[str, typer.Option(help="wiki-summaries languages: en, fr, es.")] = "en",
    index_dir: Annotated[Path | None, typer.Option("--index", help="Index whose passages serve as realistic "
                                                                   "distractors (default: random articles).")] = None,
    max_passages: Annotated[int, typer.Option(help="Up to this many passages per example (gold included).")] = 20,
    min_passages: Annotated[int, typer.Option(help="qa: at least this many retrieved passages per question.")] = 5,
    questions: Annotated[list[str] | None, typer.Option(
        help="qa: training questions, repeatable: a JSONL file (NQ-open or FlashRAG format; never the benchmark), "
             "'corpus' (questions asked of the --corpus articles, their article among the passages: names and "
             "numbers), or 'corpus-phrases' (the same, asking for the common nouns a clause ends with).")] = None,
    unanswerable: Annotated[str, typer.Option(help="qa: questions whose passages hold no gold answer: skip, or "
                                                   "keep (answer from memory).")] = "skip",
    max_articles: Annotated[int, typer.Option(
        help="Use only the first N training articles (qa: questions); 0 = all.")] = 0,
    max_decoder_tokens: Annotated[int, typer.Option(
        help="warmup/standard: decoder text length in tokens (long targets are the costly part).")] = 256,
    validation: Annotated[int, typer.Option(help="Held-out-article validation examples.")] = 64,
    eval_every: Annotated[int, typer.Option(help="Validation loss every N steps.")] = 100,
    save_every: Annotated[int, typer.Option(help="Checkpoint every N steps.")] = 50,
    bf16: Annotated[bool, typer.Option(help="bfloat16 autocast (GPU, or CPU with AMX); losses stay fp32.")] = False,
    gradient_checkpointing: Annotated[bool, typer.Option(help="Trade compute for activation memory.")] = False,
    seed: Annotated[int, typer.Option(help="Data and initialisation seed.")] = 0,
    device: DeviceOption = None,
    max_minutes: Annotated[float, typer.Option(help="Stop after this many minutes of training (validated, "
                                                    "checkpointed, adapter saved); 0 = no limit.")] = 0.0,
    prepare_only: Annotated[bool, typer.Option(help="Build the run folder's examples and stop (to train them "
                                                    "elsewhere: the folder is all a training machine needs).")] = False,
    schedule: Annotated[str, typer.Option(help="Learning rate after the warmup: cosine (to zero at --steps) or "
                                               "constant (a run continued session after session).")] = "cosine",
    states_cache: Annotated[Path | None, typer.Option(
        help="The frozen encoder's passage states (default: encoder_states.safetensors in --out); runs with the same "
             "encoder can share one file.")] = None,
    lazy_states: Annotated[bool, typer.Option(
        help="Encode a passage when a step first reads it, not all before training starts.")] = False,
    gate: Annotated[bool, typer.Option(
        help="A zero-initialised tanh gate on every cross-attention block (Flamingo): the model starts as the plain "
             "decoder, also from an ungated --init, and can only learn to add to its prompt.")] = False,
    copy_pointer: Annotated[bool, typer.Option(
        help="A copy pointer over the context tokens (pointer-generator; encoders that share the decoder's tokenizer): "
             "the answer may copy a passage's tokens; added to an --init model that lacks one.")] = False,
    copy_first_weight: Annotated[float, typer.Option(
        help="With --copy-cof: the copy loss's weight on each answer's first token, relative to the others (where to "
             "start copying is the hard part).")] = 1.0,
    copy_spans: Annotated[bool, typer.Option(
        help="With --copy-cof: each answer token's copy target is its place in a whole occurrence of the answer in "
             "the gold passage, not any equal token there (a digit or a single letter occurs all over a passage)."
    )] = False,
    copy_line_starts: Annotated[bool, typer.Option(
        help="A copy-pointer --init from before line-start copies learns with them: after a line break, a passage "
             "word is copied without the space before it, as an answer's first word is written (new pointers always "
             "copy so).")] = False,
    relevance_temperature: Annotated[float, typer.Option(
        help="find/swap/qa: train under the cepe reader's relevance prior (`--relevance-temperature T` when asking): "
             "each encoded passage's share of the attention weighted by softmax(cosine to the question / T); 0: "
             "off.")] = 0.0,
    questions_per_article: Annotated[int, typer.Option(
        help="swap: ask each article up to N questions, each for a different fact (examples side by side), so the "
             "passage alone cannot tell the answer and the question must.")] = 1,
    short_questions: Annotated[float, typer.Option(
        help="swap: the share of questions asked short, the subject's name and the few words beside the answer "
             "(\"Chawo Bridge: was designed by what?\"), instead of the whole sentence in place.")] = 0.0,
    sentence_temperature: Annotated[float, typer.Option(
        help="find/swap/qa: train under the cepe reader's sentence prior (`--sentence-temperature S` when asking): "
             "inside each encoded passage, each sentence's share of the attention weighted by exp((its cosine to the "
             "question - the best sentence's) / S); 0: off.")] = 0.0,
    prompt_passages: Annotated[int, typer.Option(
        help="find/swap/qa: the first N passages in the decoder's prompt, the rest through the encoder, as "
             "`--reader cepe --n-prompt-passages N` reads them (swap/find: the gold is first half the time).")] = 0,
) -> None:
    """Give the decoder CEPE cross-attention: train it on a stage of the recipe (resumable; multi-GPU with
    `accelerate launch -m cepe_rag.cli.app train ...`)."""

    quiet_libraries()
    if stage not in STAGES:
        raise CepeRagError(f"unknown stage {stage!r}; choose one of: {', '.join(STAGES)}")
    check_choice(schedule, ("cosine", "constant"), "schedule")
    if questions_per_article < 1 or not 0.0 <= short_questions <= 1.0:
        raise CepeRagError("--questions-per-article must be at least 1 and --short-questions between 0 and 1")
    config = TrainConfig(stage=stage, steps=steps, batch_size=batch_size, lr=lr, warmup_ratio=warmup_ratio,
                         lm_cof=lm_cof, kl_cof=(2.0 if stage == "ceped" else 0.0) if kl_cof is None else kl_cof,
                         attn_cof=attn_cof, copy_cof=copy_cof, relevance_temperature=relevance_temperature,
                         sentence_temperature=sentence_temperature,
                         copy_first_weight=copy_first_weight, copy_spans=copy_spans,
                         train_encoder=train_encoder, bf16=bf16, gradient_checkpointing=gradient_checkpointing,
                         save_every=save_every, eval_every=eval_every, seed=seed, max_minutes=max_minutes,
                         curriculum=stage in ("find", "swap"), schedule=schedule)
    records = run_training(out, config, decoder=decoder, encoder=encoder, init=init,
                           num_cross_attn_layers=cross_attn_layers,
                           init_mode=init_mode or ("copy" if gate else "zero"), corpus=corpus,
                           languages=tuple(x.strip() for x in languages.split(",") if x.strip()), index=index_dir,
                           max_passages=max_passages, max_articles=max_articles, n_validation=validation,
                           max_decoder_tokens=max_decoder_tokens, questions=questions or [], min_passages=min_passages,
                           unanswerable=unanswerable, device=device or default_device(), prepare_only=prepare_only,
                           states_file=states_cache, lazy_states=lazy_states, gate=gate,
                           prompt_passages=prompt_passages, copy_pointer=copy_pointer,
                           copy_line_starts=copy_line_starts, questions_per_article=questions_per_article,
                           short_questions=short_questions,
                           log=lambda line: console.print(line, highlight=False))
    if prepare_only:
        console.print(f"examples in {out}; train them with the same command without --prepare-only")
        return
    if records:
        last = records[-1]
        console.print(f"step {last['step']}: ce {last['ce']:.3f} kl {last['kl']:.3f}"
                      + (f" · validation ce {last['val_ce']:.3f}" if "val_ce" in last else ""))
    console.print(f"trained adapter in {out / 'model'} (use it with --cepe-model {out / 'model'})")
