"""Settings every entry point shares: the defaults (each defined once, here), the choices, and `ReaderSpec`.

Nothing heavy is imported, so the command line checks its arguments before it loads torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from cepe_rag.types import CepeRagError

DEFAULT_INDEX = Path("indexes/default")
DEFAULT_DECODER = "smollm2-135m-instruct"
DEFAULT_EMBEDDER = "all-minilm-l6-v2"
# How documents become passages, and how they are searched: defaults of `index`, of build_index and of a manifest.
DEFAULT_CHUNK_TOKENS = 256  # the chunk length CEPE's encoder was trained with
DEFAULT_OVERLAP_TOKENS = 32
DEFAULT_FAISS_FACTORY = "Flat"
# The longest answer, in tokens, unless asked otherwise (ask, chat, serve, LangChain; eval uses the paper's 25).
DEFAULT_ANSWER_TOKENS = 96
# Chosen on the own-documents benchmark (docs/benchmarks.md): the reader and prompt that answer from the user's
# documents best without losing on NQ.
DEFAULT_READER = "concat"
DEFAULT_PROMPT_STYLE = "instruction"
# Passages read per question: with the default reader, 5 answers more own-documents questions than 20 and as many
# NQ questions (docs/benchmarks.md, "The own-documents benchmark").
DEFAULT_K = 5
# The relevance cutoff: read the top-ranked retrieved passage and the others (up to k) whose cosine similarity to the
# question is within this margin of the best passage's; None reads all k. 0 was the best margin on both tuning sets
# (docs/retrieval.md "Relevance cutoff": own-documents tuning 77.0 vs 60.0 at fixed k=5, NQ questions 501+ 13.3 vs 8.7).
DEFAULT_READ_MARGIN: float | None = 0.0
DEFAULT_FOCUS = True  # sentence focus (retrieval/focus.py): chosen on the tuning questions (docs/retrieval.md)
# How passages are found: dense (MiniLM + FAISS), lexical (BM25 over SQLite FTS5), or hybrid (both, fused by
# reciprocal rank). Chosen by measured recall@20 (docs/retrieval.md).
RETRIEVAL_MODES = ("hybrid", "dense", "lexical")
DEFAULT_RETRIEVAL = "hybrid"
# Reciprocal rank fusion's constant (Cormack et al., 2009) and how deep each list is read before fusing.
RRF_CONSTANT = 60
FUSION_DEPTH = 100
LEXICAL_WEIGHT = 0.2  # BM25 rank weight relative to the dense ranking: the best recall@20 on NQ questions 501+
# Abstention (docs/retrieval.md): answer NOT_IN_DOCUMENTS instead of reading when the best retrieved passage's
# cosine similarity to the question is below ABSTAIN_FLOOR, or below ABSTAIN_BELOW while the question names a word
# that no indexed passage contains. ABSTAIN_BELOW: calibrated on the own-documents tuning questions; ABSTAIN_FLOOR:
# on NQ questions 501+ (at most 5% of those whose answer was retrieved abstain).
ABSTAIN_BELOW = 0.68
ABSTAIN_FLOOR = 0.34
NOT_IN_DOCUMENTS = "The documents do not contain the answer to this question."
# cepe: cross-attention K/V cached per request up to this size (SmolLM2's adapter, float32: 12 KiB per context
# token, 65 MiB at k=50), else never formed ("absorb": the states alone, 1/8 of it, decoding about as fast).
CROSS_KV_BUDGET_MB = 256.0
# APE's knobs for the parallel reader: the best of the NQ sweep (docs/benchmarks.md); none reads on the own-documents
# benchmark.
APE_TEMPERATURE = 1.0
APE_SCALE = 0.6
# The choices every entry point offers (the readers' names are readers.spec.READERS, beside their classes).
PROMPT_STYLES = ("instruction", "fewshot", "query-aware")
# How `index --context-states` stores the states: float16, or int8 with a float32 scale per token (half the size).
CONTEXT_STATE_FORMATS = ("float16", "int8")
MOST_RELEVANT = ("first", "last")  # concat: where the best passage goes
DTYPES = ("float32", "bfloat16", "float16")
INDEXING_ENGINES = ("local", "ray")  # cepe-rag index --engine: this process, or Ray workers
DEFAULT_RAY_WORKERS = 1  # --engine ray: embedding actors (one CPU each)
DEFAULT_RAY_BATCH_DOCUMENTS = 32  # --engine ray: documents per actor call
BENCH_METHODS = ("cepe", "cepe-precomputed", "cepe-absorbed", "cepe-stored", "cepe-stored-absorbed", "parallel",
                 "concat")


def check_choice(value: str | None, choices: tuple[str, ...], what: str) -> None:
    if value is not None and value not in choices:
        raise CepeRagError(f"unknown {what} {value!r}; choose one of: {', '.join(choices)}")


def check_read_margin(margin: float | None) -> None:
    if margin is not None and not margin >= 0:  # `not >=` also refuses NaN
        raise CepeRagError(f"the relevance cutoff's margin (--read-margin) must be 0 or more, not {margin}")


# CEPE adapters shipped inside the package, by the decoder they were trained for.
PACKAGED_CEPE = {DEFAULT_DECODER: "smollm2-135m-pointer"}


def packaged_cepe(decoder: str = DEFAULT_DECODER) -> str | None:
    """The folder of the CEPE adapter shipped for `decoder`, or None."""
    name = PACKAGED_CEPE.get(decoder)
    folder = Path(__file__).parent / "checkpoints" / name if name else None
    return str(folder) if folder and (folder / "cepe_adapter.json").exists() else None


def reader_setting(default, help: str, reader: str | None = None, flag: str | None = None):
    """A ReaderSpec field, with what the command line shows for it. `reader`: the reader whose constructor takes it
    ("*": every reader's; None: it says which model loads)."""
    return field(default=default, metadata={"help": help, "reader": reader, "flag": flag})


@dataclass(frozen=True)
class ReaderSpec:
    """Everything that decides a reader's answers (besides generation settings): the one table that `build_reader`,
    the command line's reader options (ask, chat, eval, serve), the evaluation label and LangChain's CepeLLM read.
    A new reader adds its class to readers/spec.py's READERS and its own fields here."""

    reader: str = DEFAULT_READER
    decoder: str = reader_setting(DEFAULT_DECODER, "Chat decoder: Hugging Face id or folder.")
    prompt_style: str = reader_setting(
        DEFAULT_PROMPT_STYLE, "instruction (a system instruction asking for a short answer), fewshot (plus two worked "
        "examples of short answers) or query-aware (instruction, and the question before the passages as well as "
        "after them).", reader="*", flag="--prompt")
    cepe_model: str | None = reader_setting(
        None, "CEPE checkpoint (folder or hub id) for the cepe reader; it includes its own decoder. Default: the "
        "adapter shipped for the decoder.")
    n_prompt_passages: int = reader_setting(
        0, "cepe: top passages put in the prompt; the rest go through the encoder.", reader="cepe")
    relevance_temperature: float | None = reader_setting(
        None, "cepe: a relevance prior on cross-attention; each encoded passage's share of the attention is weighted "
        "by softmax(similarity to the question / T) (the retrieval embedder's cosine); 0: off. Default: the "
        "checkpoint's own setting (its card's), else off.", reader="cepe")
    sentence_temperature: float | None = reader_setting(
        None, "cepe: a sentence prior within each encoded passage; a sentence's share of the attention is weighted by "
        "exp((its cosine to the question - the best sentence's) / S), scored as sentence focus scores them; 0: off. "
        "Default: the checkpoint's own setting, else off.", reader="cepe")
    question_name_penalty: float | None = reader_setting(
        None, "cepe with a copy pointer: subtracted from the pointer's scores on the passage words of the names the "
        "question mentions (an answer does not repeat them); 0: off. Default: the checkpoint's own setting, else off.",
        reader="cepe")
    name_match_penalty: float | None = reader_setting(
        None, "cepe with a relevance prior: subtracted from an encoded passage's log weight, times the share of the "
        "question's names (its capitalised words) the passage does not contain, so that of two near-namesakes the "
        "one the question names is read; 0: off. Default: the checkpoint's own setting, else off.", reader="cepe")
    ape_temperature: float = reader_setting(
        APE_TEMPERATURE, "parallel: attention temperature on passage tokens.", reader="parallel")
    ape_scale: float = reader_setting(APE_SCALE, "parallel: scale on the passages' log-sum-exp.", reader="parallel")
    most_relevant: str = reader_setting(
        "first", "concat: the most relevant passage first (after the instruction) or last (before the question).",
        reader="concat")
    cross_kv_budget_mb: float = reader_setting(
        CROSS_KV_BUDGET_MB, "cepe: cache the cross-attention K/V of a request up to this many MiB; beyond, never form "
        "them and attend to the encoder states through the projections (equal answers to rounding, an eighth of the "
        "memory with 8 layers, decoding about as fast).", reader="cepe")
    read_margin: float | None = reader_setting(
        DEFAULT_READ_MARGIN, "Relevance cutoff: read the retrieved passages (up to --k) whose similarity to the "
        "question is within this margin of the best one's (docs/retrieval.md, 'Relevance cutoff'); --no-cutoff reads "
        "them all.", reader="*")
    extractive: bool | None = reader_setting(
        None, "Extractive decoding: each answer token must continue a span of a passage read (or end the answer), so "
        "answers are copied words, never invented ones. Default: the cepe checkpoint's own setting; off for the other "
        "readers.", reader="*")
    focus: bool = reader_setting(
        DEFAULT_FOCUS, "Sentence focus: each passage read is led by its sentence most similar to the question, "
        "then read whole (docs/retrieval.md, 'Sentence focus').", reader="*")

    def __post_init__(self):  # refused where the spec is made: before any model loads
        check_choice(self.prompt_style, PROMPT_STYLES, "prompt style")
        check_choice(self.most_relevant, MOST_RELEVANT, "--most-relevant")
        check_read_margin(self.read_margin)
        if self.relevance_temperature is not None and not self.relevance_temperature >= 0:
            raise CepeRagError(f"--relevance-temperature must be 0 (off) or more, not {self.relevance_temperature}")
        if self.question_name_penalty is not None and not self.question_name_penalty >= 0:
            raise CepeRagError(f"--question-name-penalty must be 0 (off) or more, not {self.question_name_penalty}")
        if self.name_match_penalty is not None and not self.name_match_penalty >= 0:
            raise CepeRagError(f"--name-match-penalty must be 0 (off) or more, not {self.name_match_penalty}")
        if self.name_match_penalty and self.relevance_temperature == 0:
            raise CepeRagError("--name-match-penalty weighs the relevance prior's passages: it needs "
                               "--relevance-temperature above 0")
        if self.sentence_temperature is not None and not self.sentence_temperature >= 0:
            raise CepeRagError(f"--sentence-temperature must be 0 (off) or more, not {self.sentence_temperature}")

    @property
    def label(self) -> str:
        """The row name in evaluations: each prompt/encoder split of cepe is its own row."""
        extractive = {True: "-extractive", False: "-free"}.get(self.extractive, "") if self.reader == "cepe" \
            else "-extractive" if self.extractive else ""  # cepe: absent means the checkpoint's own setting
        if self.reader != "cepe":
            return self.reader + extractive
        return "cepe" + (f"-prompt{self.n_prompt_passages}" if self.n_prompt_passages else "") + \
            (f"-rel{self.relevance_temperature:g}" if self.relevance_temperature is not None else "") + \
            (f"-sent{self.sentence_temperature:g}" if self.sentence_temperature is not None else "") + \
            (f"-qn{self.question_name_penalty:g}" if self.question_name_penalty is not None else "") + \
            (f"-nm{self.name_match_penalty:g}" if self.name_match_penalty is not None else "") + extractive

    def reader_options(self) -> dict:
        """What the reader's constructor takes from this spec: the settings every reader has, and its own."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("reader") in ("*", self.reader)}

    def checkpoint(self) -> str:
        path = self.cepe_model or packaged_cepe(self.decoder)
        if path is None:
            raise CepeRagError(f"the cepe reader needs a CEPE checkpoint (--cepe-model): none ships for "
                               f"{self.decoder}")
        return path

    def settings(self) -> dict:
        """What an evaluation records for this reader, to refuse resuming a run with other settings."""
        common = {"decoder": self.decoder, "prompt": self.prompt_style}
        if self.reader != "closed-book" and self.read_margin is not None:  # absent: every passage read (fixed k)
            common["read_margin"] = self.read_margin
        if self.reader != "closed-book" and self.focus:  # absent: passages read as they are
            common["focus"] = True
        if self.reader != "closed-book" and self.extractive is not None and (self.extractive or self.reader == "cepe"):
            common["extractive"] = self.extractive  # absent: free decoding (cepe: the checkpoint's own setting)
        if self.reader == "cepe":
            cepe = {**common, "cepe_model": self.cepe_model or "packaged", "n_prompt_passages": self.n_prompt_passages}
            # Absent: the checkpoint's own priors (which the checkpoint's path already pins).
            for name in ("relevance_temperature", "sentence_temperature", "question_name_penalty",
                         "name_match_penalty"):
                if getattr(self, name) is not None:
                    cepe[name] = getattr(self, name)
            return cepe
        if self.reader == "parallel":
            return {**common, "ape_temperature": self.ape_temperature, "ape_scale": self.ape_scale}
        if self.reader == "concat" and self.most_relevant != "first":
            return {**common, "most_relevant": self.most_relevant}
        return common
