"""`cepe-rag train`: corpus -> examples (cached in the run folder) -> teacher (ceped) -> training -> adapter."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cepe_rag.cepe import ChunkStateCache, load_cepe
from cepe_rag.cepe.checkpoints import new_cepe_model, save_adapter
from cepe_rag.eval.data import load_questions
from cepe_rag.files import atomic_write, atomic_write_with
from cepe_rag.readers import CepeReader
from cepe_rag.readers.base import passage_block
from cepe_rag.readers.cepe import RelevancePrior, combined_log_weights, passage_of_chunk, reading_log_weights
from cepe_rag.retrieval import Retriever
from cepe_rag.training.corpus import held_out, load_articles
from cepe_rag.training.examples import (
    ExampleBuilder,
    TrainingExample,
    TrainingQuestion,
    build_examples,
    build_qa_examples,
    corpus_questions,
    load_examples,
    save_examples,
)
from cepe_rag.training.swapping import build_swapped_examples
from cepe_rag.training.trainer import TrainConfig, train
from cepe_rag.types import CepeRagError


@torch.no_grad()
def add_teacher(examples: list[TrainingExample], model, prompt_ids, *, top_k: int = 50) -> None:
    """CEPED's teacher: the frozen decoder with the passages in its own prompt; top-k probabilities of
    every target token are stored once (the rest of the mass is 1 - their sum)."""
    decoder = model.decoder
    for example in examples:
        documents = "".join(passage_block(chunk) for chunk in example.chunks)
        prompt = prompt_ids(documents + example.question)
        ids = torch.tensor([prompt + example.target_ids], device=decoder.device)
        logits = decoder(input_ids=ids).logits[0, len(prompt) - 1: -1].float()
        top = torch.softmax(logits, dim=-1).topk(top_k, dim=-1)
        example.teacher_ids = top.indices.tolist()
        example.teacher_probs = [[round(p, 6) for p in row] for row in top.values.tolist()]


def prepare_examples(stage: str, model, out: Path, *, corpus: str, languages: tuple[str, ...], index: Path | None,
                     max_passages: int, max_articles: int, n_validation: int, seed: int,
                     max_decoder_tokens: int = 256, questions: Sequence[str] = (), min_passages: int = 5,
                     unanswerable: str = "skip", prompt_passages: int = 0, questions_per_article: int = 1,
                     short_questions: float = 0.0, log=print) -> tuple[list[TrainingExample], list[TrainingExample]]:
    """Examples for `stage`, built once per run folder (a resumed run trains on exactly the same data), with
    `data_{stage}.json` saying what they were built from (the model card's record, wherever they train)."""
    train_path, validation_path = out / f"examples_{stage}.jsonl", out / f"validation_{stage}.jsonl"
    if train_path.exists() and validation_path.exists():
        return load_examples(train_path), load_examples(validation_path)
    source = {"questions": list(questions), "index": str(index) if index else None, "min_passages": min_passages,
              "max_passages": max_passages, "unanswerable": unanswerable} if stage == "qa" else \
        {"corpus": corpus, "index": str(index) if index else None, "min_passages": min_passages,
         "max_passages": max_passages, "entity_swapped": True, "curriculum": True,
         **({"questions_per_article": questions_per_article, "short_questions": short_questions}
            if stage == "swap" and (questions_per_article, short_questions) != (1, 0.0) else {})} \
        if stage in ("find", "swap") else \
        {"corpus": corpus, "languages": list(languages), "index": str(index) if index else None,
         "max_passages": max_passages, "max_decoder_tokens": max_decoder_tokens}
    if prompt_passages:
        if stage not in ("find", "swap", "qa"):
            raise CepeRagError(f"--prompt-passages applies to the find, swap and qa stages, not {stage}")
        source["prompt_passages"] = prompt_passages
    reader = CepeReader(model, model.decoder_tokenizer)
    builder = ExampleBuilder(model.decoder_tokenizer, reader.chat_ids, max_decoder_tokens=max_decoder_tokens,
                             seed=seed, prompt_passages=prompt_passages)
    if stage in ("find", "swap"):
        examples, held = swapped_examples(stage, builder, corpus=corpus, languages=languages, index=index,
                                          min_passages=min_passages, max_passages=max_passages,
                                          max_articles=max_articles, n_validation=n_validation,
                                          questions_per_article=questions_per_article,
                                          short_questions=short_questions, log=log)
    elif stage == "qa":
        examples, held = qa_examples(builder, questions, index, corpus=corpus, languages=languages,
                                     min_passages=min_passages, max_passages=max_passages,
                                     max_questions=max_articles, n_validation=n_validation,
                                     unanswerable=unanswerable, log=log)
    else:
        examples, held = article_examples(stage, model, builder, reader.chat_ids, corpus=corpus, languages=languages,
                                          index=index, max_passages=max_passages, max_articles=max_articles,
                                          n_validation=n_validation, log=log)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / f"data_{stage}.json", json.dumps({**source, "examples": len(examples),
                                                        "validation": len(held)}, indent=2).encode())
    save_examples(held, validation_path)
    save_examples(examples, train_path)
    return examples, held


def article_examples(stage: str, model, builder: ExampleBuilder, prompt_ids, *, corpus: str,
                     languages: tuple[str, ...], index: Path | None, max_passages: int, max_articles: int,
                     n_validation: int, log=print) -> tuple[list[TrainingExample], list[TrainingExample]]:
    """Training and held-out (1 article in 20) examples of the corpus stages; CEPED's teacher added."""
    articles = load_articles(corpus, languages=languages)
    if not articles:
        raise CepeRagError(f"no text in training corpus {corpus!r}")
    retrieve = None
    if index is not None and stage != "warmup":
        retriever = Retriever(index)
        retrieve = retriever.retrieve_batch
    training = [a for a in articles if not a.is_validation]
    validation = [a for a in articles if a.is_validation and a.language == "en"] or \
        [a for a in articles if a.is_validation]
    training = training[:max_articles] if max_articles else training
    log(f"building {stage} examples from {len(training)} training and {len(validation)} validation articles")
    examples = build_examples(stage, training, builder, retrieve=retrieve, max_passages=max_passages)
    held = build_examples(stage, validation, builder, retrieve=retrieve, max_passages=max_passages)[:n_validation]
    if stage == "ceped":
        log(f"teacher distributions for {len(examples) + len(held)} examples")
        add_teacher(examples, model, prompt_ids)
        add_teacher(held, model, prompt_ids)
    return examples, held


def swapped_examples(stage: str, builder: ExampleBuilder, *, corpus: str, languages: tuple[str, ...],
                     index: Path | None, min_passages: int, max_passages: int, max_articles: int, n_validation: int,
                     questions_per_article: int = 1, short_questions: float = 0.0,
                     log=print) -> tuple[list[TrainingExample], list[TrainingExample]]:
    """Entity-swapped `find`/`swap` examples: training articles in curriculum order over the number of passages;
    validation from held-out articles, at every count in the range."""
    import re

    if index is None:
        raise CepeRagError(f"the {stage} stage needs --index (the distractors are passages retrieved from it)")
    articles = load_articles(corpus, languages=languages)
    forbidden = {word.lower() for a in articles for word in re.findall(r"\w+", f"{a.title} {a.text}")}
    training = [a for a in articles if not a.is_validation]
    builder.rng.shuffle(training)
    training = training[:max_articles] if max_articles else training
    validation = [a for a in articles if a.is_validation]
    log(f"building {stage} examples (entity-swapped) from {len(training)} training and {len(validation)} "
        f"validation articles")
    retrieve = Retriever(index).retrieve_batch
    options = {"min_passages": min_passages, "max_passages": max_passages, "forbidden": forbidden,
               "questions_per_article": questions_per_article, "short_questions": short_questions}
    examples = build_swapped_examples(stage, training, builder, retrieve, curriculum=True, **options)
    held = build_swapped_examples(stage, validation, builder, retrieve, curriculum=False, **options)[:n_validation]
    return examples, held


CORPUS_QUESTIONS = "corpus"  # --questions value: questions generated from the training corpus (names, numbers)
CORPUS_PHRASE_QUESTIONS = "corpus-phrases"  # the same, asking for the common nouns a clause ends with


def qa_examples(builder: ExampleBuilder, questions: Sequence[str], index: Path | None, *, corpus: str,
                languages: tuple[str, ...], min_passages: int, max_passages: int, max_questions: int,
                n_validation: int, unanswerable: str, log=print):
    """Training and held-out qa examples: questions from each QA file (1 in 20 held out by a hash of its text)
    and, for `corpus` and `corpus-phrases`, questions asked of the training corpus's own articles (held-out
    articles for validation). The validation set takes a share of each source."""
    if not questions or index is None:
        raise CepeRagError("the qa stage needs --questions (a QA file that is not the benchmark, e.g. efficientqa, "
                           f"or {CORPUS_QUESTIONS!r}) and --index (where their passages are retrieved from)")
    sources = []
    for source in questions:
        if source in (CORPUS_QUESTIONS, CORPUS_PHRASE_QUESTIONS):
            articles = load_articles(corpus, languages=languages)
            rng = random.Random(builder.rng.random())
            options = {"per_article": 1, "phrases": True} if source == CORPUS_PHRASE_QUESTIONS else {}
            sources.append((f"{corpus} ({source}, generated)",
                            corpus_questions([a for a in articles if not a.is_validation], rng, **options),
                            corpus_questions([a for a in articles if a.is_validation], rng, **options)))
            continue
        if "NQ-open.dev" in Path(source).name:
            raise CepeRagError(f"{source} is the NQ-open benchmark: train on other questions (e.g. efficientqa)")
        records = [TrainingQuestion(q.question, q.answers) for q in load_questions(source)]
        sources.append((source, [q for q in records if not held_out(q.question)],
                        [q for q in records if held_out(q.question)]))
    retrieve = Retriever(index).retrieve_batch
    options = {"min_passages": min_passages, "max_passages": max_passages, "unanswerable": unanswerable}
    examples, held = [], []
    for name, training, validation in sources:
        training = training[:max_questions] if max_questions else training
        built = build_qa_examples(training, builder, retrieve, **options)
        kept = build_qa_examples(validation, builder, retrieve, **options)[: max(1, n_validation // len(sources))]
        log(f"qa examples from {name}: {len(built)} of {len(training)} training and {len(kept)} held-out questions "
            f"({unanswerable} those whose passages hold no gold answer)")
        examples += built
        held += kept
    builder.rng.shuffle(examples)
    return examples, held


def run_training(out: Path, config: TrainConfig, *, decoder: str, encoder: str, init: str | None,
                 num_cross_attn_layers: int, init_mode: str, corpus: str, languages: tuple[str, ...],
                 index: Path | None, max_passages: int, max_articles: int, n_validation: int, device: str,
                 max_decoder_tokens: int = 256, questions: Sequence[str] = (), min_passages: int = 5,
                 unanswerable: str = "skip", prepare_only: bool = False, states_file: Path | None = None,
                 lazy_states: bool = False, gate: bool = False, prompt_passages: int = 0, copy_pointer: bool = False,
                 copy_line_starts: bool = False, questions_per_article: int = 1, short_questions: float = 0.0,
                 log=print) -> list[dict]:

    if init:
        model = load_cepe(init, device=device)  # trained weights kept: no re-initialisation
        if gate and not getattr(model.config, "cross_attn_gate", False):
            model.add_gates()
        if copy_pointer and model.pointer is None:
            model.add_pointer()
        if copy_line_starts:
            if model.pointer is None:
                raise CepeRagError("--copy-line-starts is for a model with a copy pointer (--copy-pointer)")
            model.config.copy_line_starts = True
    else:
        model = new_cepe_model(decoder, encoder, num_cross_attn_layers=num_cross_attn_layers, init_mode=init_mode,
                               device=device, gate=gate, copy_pointer=copy_pointer)
    examples, validation = prepare_examples(config.stage, model, out, corpus=corpus, languages=languages,
                                            index=index, max_passages=max_passages, max_articles=max_articles,
                                            n_validation=n_validation, seed=config.seed,
                                            max_decoder_tokens=max_decoder_tokens, questions=questions,
                                            min_passages=min_passages, unanswerable=unanswerable,
                                            prompt_passages=prompt_passages,
                                            questions_per_article=questions_per_article,
                                            short_questions=short_questions, log=log)
    log(f"{len(examples)} training and {len(validation)} validation examples; {config.steps} steps of "
        f"{config.batch_size}")
    if prepare_only:
        return []
    data_record = out / f"data_{config.stage}.json"
    data = json.loads(data_record.read_text()) if data_record.exists() else {"examples": len(examples)}
    history = getattr(model, "training_history", []) + [{**asdict(config), "data": data, "init": init or init_mode}]

    def save(trained, folder):
        if getattr(trained, "source_names", None):
            save_adapter(trained, folder, include_encoder=config.train_encoder,
                         card={"training_history": history})
        else:  # started from a released checkpoint: save in its layout
            trained.save_pretrained(folder)

    # Without stored teacher distributions (ceped's), a KL weight distils from the decoder reading the gold chunk alone.
    teacher_prompt = CepeReader(model, model.decoder_tokenizer).chat_ids if config.kl_cof > 0 else None
    relevance = training_prior(model, config)
    if config.train_encoder:
        return train(model, examples, config, out, validation=validation, save_model=save,
                     teacher_prompt=teacher_prompt, relevance=relevance)
    states_path = states_file or out / "encoder_states.safetensors"
    cache = encoder_states(model, [*examples, *validation], states_path, bf16=config.bf16, lazy=lazy_states, log=log)
    known = len(cache)
    try:
        return train(model, examples, config, out, validation=validation, save_model=save, state_cache=cache,
                     teacher_prompt=teacher_prompt, relevance=relevance)
    finally:
        if len(cache) > known:  # what this run encoded, kept for the next one (also when it is interrupted)
            save_encoder_states(cache, states_path)


def training_prior(model, config: TrainConfig, embedder=None):
    """(question, chunk texts) -> the log weights the cepe reader will add (per chunk, or per token with a sentence
    prior), or None without priors: training reads as the reader will, except for the reader's name-match prior,
    which is not applied here (a read-time setting: training's distractors are retrieved for real questions and are
    rarely near-namesakes)."""
    if not (config.relevance_temperature > 0 or config.sentence_temperature > 0):
        return None
    prior = RelevancePrior(config.relevance_temperature, embedder)  # its cosines serve the sentence prior too

    def weigh(question: str, chunks: list[str]) -> list:
        chunk_weights = prior(question, chunks) if config.relevance_temperature > 0 else [0.0] * len(chunks)
        if config.sentence_temperature <= 0:
            return chunk_weights
        _, tokens = reading_log_weights(question, [passage_of_chunk(text) for text in chunks], chunks,
                                        model.chunk_token_offsets(chunks), prior, relevance_temperature=0.0,
                                        sentence_temperature=config.sentence_temperature,
                                        chunk_weights=chunk_weights)
        return combined_log_weights(chunk_weights, tokens)

    return weigh


def encoder_states(model, examples: list[TrainingExample], path: Path, *, bf16: bool, lazy: bool = False,
                   log=print) -> ChunkStateCache:
    """The frozen encoder's states of every distinct chunk, fp16, loaded from `path` where it has them: stored by a
    digest of each text, under the encoder's stamp (weights, tokenizer, chunking), so runs with the same encoder
    may share the file. The others are encoded now and saved, or, `lazy`, when a training step first reads them (a
    run then starts at once and encodes only what its steps reach; `save_encoder_states` keeps them for the next
    run)."""
    texts = sorted({chunk for e in examples for chunk in e.chunks})
    cache = ChunkStateCache(model)
    if path.exists():  # read only the states these examples use: the file holds every run's, gigabytes of them
        with safe_open(str(path), framework="pt", device=str(model.device)) as stored:
            names = set(stored.keys())

            def key(name: str) -> str | None:
                return _stored_key(stored.get_tensor(name)) if name in names else None

            if key("__key__") == _texts_key(model, texts):  # one run folder's older layout
                cache.states.update((text, stored.get_tensor(str(i))) for i, text in enumerate(texts))
            elif key("__encoder__") == _encoder_key(model):
                cache.states.update((text, stored.get_tensor(name)) for text in texts
                                    if (name := _text_key(text)) in names)
    missing = [text for text in texts if text not in cache.states]
    if missing and not lazy:
        log(f"encoding {len(missing)} distinct passages once with the frozen encoder")
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
            cache.lookup(missing)
        save_encoder_states(cache, path)
    elif missing:
        log(f"{len(texts) - len(missing)} of {len(texts)} distinct passages' states loaded; the rest are encoded as "
            "training reaches them")
    return cache


def save_encoder_states(cache: ChunkStateCache, path: Path) -> None:
    tensors = {_text_key(text): state.contiguous() for text, state in cache.states.items()}
    tensors["__encoder__"] = torch.frombuffer(bytearray(_encoder_key(cache.model).encode()), dtype=torch.uint8)
    # save_file streams the tensors to the file; serialising them to bytes first held a second copy in memory,
    # which on this 23 GiB machine killed a run whose states had reached 8 GB
    atomic_write_with(path, lambda temporary: save_file(tensors, temporary))


def _encoder_key(model) -> str:
    return model.states_stamp()  # its weights, tokenizer and chunking: what the index's stored states are keyed by


def _texts_key(model, texts: list[str]) -> str:
    encoder = json.dumps(model.encoder.config.to_dict(), sort_keys=True, default=str)
    return hashlib.sha1("\x00".join([encoder, *texts]).encode()).hexdigest()


def _text_key(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def _stored_key(tensor: torch.Tensor | None) -> str | None:
    return None if tensor is None else tensor.cpu().numpy().tobytes().decode(errors="ignore")
