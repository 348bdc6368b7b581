"""The copy pointer (cepe/pointer.py) on tiny random models over the default decoder's tokenizer, in float64."""

import pytest
import torch
from transformers import BertConfig, BertModel

from cepe_rag.cepe import CepeForCausalLM
from cepe_rag.cepe.checkpoints import build_encoder_for
from cepe_rag.cepe.model import group_by_request
from cepe_rag.readers import GenerationConfig
from cepe_rag.readers.generation import generate
from cepe_rag.training import TrainConfig, TrainingExample, train
from cepe_rag.training.trainer import CepeTrainingModule, collate, copy_loss, pointer_log_probs
from cepe_rag.types import CepeRagError
from tests.readers.conftest import tiny_chat_llama

CHUNKS = [["the secret word is zebra", "noise river"], ["noise castle harbor falcon", "secret violet"]]


def pointer_model(tokenizer, *, seed=0):
    decoder = tiny_chat_llama(tokenizer, num_hidden_layers=3, initializer_range=0.3)
    encoder, encoder_tokenizer = build_encoder_for("decoder-layers:1", decoder, tokenizer)
    torch.manual_seed(seed)
    model = CepeForCausalLM(decoder, encoder.eval(), num_cross_attn_layers=2, init_mode="copy", gate=True,
                            encoder_tokenizer=encoder_tokenizer, copy_pointer=True)
    model.decoder_tokenizer = tokenizer
    return model.double().eval()


def prompt_ids(tokenizer, texts=("Which word?", "Tell me the word, please")):
    rows = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    width = min(len(r) for r in rows)
    return torch.tensor([r[:width] for r in rows])


def test_a_pointer_needs_an_encoder_with_the_decoders_tokenizer(chat_tokenizer):
    decoder = tiny_chat_llama(chat_tokenizer)
    encoder = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(CepeRagError, match="shares the decoder's tokenizer"):
        CepeForCausalLM(decoder, encoder, num_cross_attn_layers=1, copy_pointer=True)


def test_without_context_a_pointer_model_is_exactly_the_plain_decoder(chat_tokenizer):
    model = pointer_model(chat_tokenizer)
    plain = tiny_chat_llama(chat_tokenizer, num_hidden_layers=3, initializer_range=0.3).double().eval()
    ids = prompt_ids(chat_tokenizer)
    assert torch.equal(model(input_ids=ids).logits, plain(input_ids=ids).logits)
    with pytest.raises(CepeRagError, match="token ids"):
        model.context_from_states([[torch.zeros(3, 32, dtype=torch.float64)]])


def test_the_mixture_moves_between_the_decoder_and_the_context_tokens(chat_tokenizer):
    model = pointer_model(chat_tokenizer)
    ids = prompt_ids(chat_tokenizer)
    context = model.context_from_texts(CHUNKS)
    gate = model.pointer.gate
    with torch.no_grad():
        log_p = model(input_ids=ids, cross_context=context).logits
        assert torch.allclose(log_p.exp().sum(-1), torch.ones(()).double(), atol=1e-12)  # a distribution
        gate.bias.fill_(-60.0)  # g = 1e-26: the decoder alone (the cross-attention still reads)
        decoder_only = model(input_ids=ids, cross_context=context).logits
        gate.bias.fill_(60.0)  # g = 1: copies only
        copies = model(input_ids=ids, cross_context=context).logits.exp()
    assert not torch.allclose(log_p, decoder_only)  # the starting gate (1.8%) changes the distribution, a little
    assert (log_p.exp() - decoder_only.exp()).abs().max() < 0.05
    for row, chunks in enumerate(CHUNKS):
        context_tokens = sorted({t for chunk in model.tokenize_chunks(chunks) for t in chunk})
        on_context = copies[row][:, context_tokens].sum(-1)
        assert torch.allclose(on_context, torch.ones(()).double(), atol=1e-12)


def test_batched_requests_equal_single_ones(chat_tokenizer):
    model = pointer_model(chat_tokenizer)
    ids = prompt_ids(chat_tokenizer)
    with torch.no_grad():
        batched = model(input_ids=ids, cross_context=model.context_from_texts(CHUNKS)).logits
        for row in range(2):
            single = model(input_ids=ids[row:row + 1], cross_context=model.context_from_texts([CHUNKS[row]])).logits
            assert torch.allclose(batched[row], single[0], atol=1e-10)


def test_the_pointer_projects_a_requests_keys_once_and_keeps_them_through_row_changes(chat_tokenizer):
    model = pointer_model(chat_tokenizer)
    ids = prompt_ids(chat_tokenizer)
    calls, project = [], model.pointer.project_context
    model.pointer.project_context = lambda states: calls.append(states.shape) or project(states)
    context = model.context_from_texts(CHUNKS)
    with torch.no_grad():
        first = model(input_ids=ids, cross_context=context).logits
        again = model(input_ids=ids, cross_context=context).logits
        assert len(calls) == 1 and torch.equal(first, again)
        second = context.select_rows(torch.tensor([1]))  # the first request ended
        assert torch.allclose(model(input_ids=ids[1:], cross_context=second).logits, first[1:], atol=1e-10)
        joined = second.join(model.context_from_texts([CHUNKS[0]]))  # a request joins the running batch
        fresh = model.context_from_texts([CHUNKS[1], CHUNKS[0]])
        assert torch.allclose(model(input_ids=ids.flip(0), cross_context=joined).logits,
                              model(input_ids=ids.flip(0), cross_context=fresh).logits, atol=1e-10)


def test_training_reads_the_same_mixture_as_inference(chat_tokenizer):
    model = pointer_model(chat_tokenizer)
    torch.nn.init.normal_(model.pointer.gate.weight, std=0.5)
    ids = prompt_ids(chat_tokenizer)
    flat = [c for cs in CHUNKS for c in cs]
    tokens = model.tokenize_chunks(flat)
    context = model.context_from_states(group_by_request(model.encode_token_chunks(tokens), CHUNKS),
                                        cross_kv="project", token_ids=group_by_request(tokens, CHUNKS))
    predicting = torch.zeros(ids.shape, dtype=torch.bool)
    predicting[0, 1:3] = predicting[1, 2:] = True
    with torch.no_grad():
        expected = model(input_ids=ids, cross_context=context).logits[:, :-1][predicting[:, 1:]]
        hidden = model.decoder.base_model(input_ids=ids, cross_context=context).last_hidden_state
        logits = model.decoder.get_output_embeddings()(hidden[:, :-1][predicting[:, 1:]])
        found, _, _ = pointer_log_probs(model, hidden, ids, context, predicting[:, 1:], logits)
    assert torch.allclose(found, expected, atol=1e-10)


def test_greedy_decoding_with_an_open_pointer_writes_context_tokens_only(chat_tokenizer):
    model = pointer_model(chat_tokenizer)
    model.pointer.gate.bias.data.fill_(60.0)
    ids = prompt_ids(chat_tokenizer)
    context = model.context_from_texts(CHUNKS)
    written = ids
    with torch.no_grad():  # no cache: the plain forward, step by step
        for _ in range(4):
            written = torch.cat([written, model(input_ids=written, cross_context=context).logits[:, -1:].argmax(-1)], 1)
    answers = ["", ""]  # the readers' decoding loop (KV cache, rows that end and leave the batch)
    for deltas in generate(model, ids.tolist(), chat_tokenizer, GenerationConfig(max_new_tokens=4),
                           device=model.device, cross_context=context):
        answers = [answer + delta for answer, delta in zip(answers, deltas)]
    for row, chunks in enumerate(CHUNKS):
        allowed = {t for chunk in model.tokenize_chunks(chunks) for t in chunk}
        new = written[row, ids.shape[1]:].tolist()
        assert set(new) <= allowed
        assert answers[row] == chat_tokenizer.decode(new[: new.index(chat_tokenizer.eos_token_id)]
                                                     if chat_tokenizer.eos_token_id in new else new)


def test_a_pointer_learns_to_copy_a_word_the_decoder_cannot_know(chat_tokenizer, tmp_path):
    """Invented words, only in the gold chunk: trained alone (cross-attention gated shut), the pointer learns
    to copy them."""
    import random

    rng = random.Random(0)
    prompt = chat_tokenizer("The secret word is", add_special_tokens=False)["input_ids"]
    examples = []
    for _ in range(64):
        word = "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(3))
        chunks = [f"secret {word}", f"noise {''.join(rng.sample('abcdefgh', 6))}"]
        rng.shuffle(chunks)
        examples.append(TrainingExample(chunks, prompt, chat_tokenizer(" " + word, add_special_tokens=False)[
            "input_ids"]))
    model = pointer_model(chat_tokenizer).float()
    module = CepeTrainingModule(model).eval()
    with torch.no_grad():
        before = module(collate(examples[:16], 0))[0].item()
    config = TrainConfig(stage="swap", steps=80, batch_size=8, lr=1e-2, save_every=1000, eval_every=1000)
    train(model, examples, config, tmp_path / "run", progress=False)
    with torch.no_grad():
        after = CepeTrainingModule(model).eval()(collate(examples[:16], 0))[0].item()
    assert after < 0.5 * before, (before, after)


def test_the_copy_loss_is_the_pointers_mass_on_the_target_in_the_gold_chunk(chat_tokenizer):
    attention = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0.0, 0.0]])
    token_ids = torch.tensor([[7, 8, 7, 9], [7, 8, 7, 9], [7, 8, 7, 9]])
    gold = torch.tensor([[True, True, True, False]] * 3)
    targets = torch.tensor([7, 9, 8])  # 7 twice in the gold; 9 only outside it (that row does not count)
    expected = -(torch.log(torch.tensor(0.4)) + torch.log(torch.tensor(0.5))) / 2
    assert torch.allclose(copy_loss(attention, token_ids, targets, gold), expected)
    assert copy_loss(attention, token_ids, torch.tensor([9, 9, 9]), gold).item() == 0
    # The first answer token weighted 3 times the others: (3 * -log 0.4 + -log 0.5) / 4.
    weighted = copy_loss(attention, token_ids, targets, gold, torch.tensor([3.0, 1.0, 1.0]))
    assert torch.allclose(weighted, -(3 * torch.log(torch.tensor(0.4)) + torch.log(torch.tensor(0.5))) / 4)


def test_the_copy_loss_trains_the_pointer_to_the_answer_in_the_gold(chat_tokenizer, tmp_path):
    import random

    rng = random.Random(1)
    prompt = chat_tokenizer("The secret word is", add_special_tokens=False)["input_ids"]
    examples = []
    for _ in range(64):
        word, other = ("".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(3)) for _ in "ab")
        chunks = [f"secret {word}", f"noise {other}"]
        rng.shuffle(chunks)
        target = chat_tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        examples.append(TrainingExample(chunks, prompt, target, gold_chunk=chunks.index(f"secret {word}")))
    model = pointer_model(chat_tokenizer).float()
    config = TrainConfig(stage="swap", steps=60, batch_size=8, lr=1e-2, lm_cof=0.0, copy_cof=1.0, save_every=1000,
                         eval_every=1000)
    records = train(model, examples, config, tmp_path / "run", progress=False)
    first, last = records[0]["copy"], sum(r["copy"] for r in records[-10:]) / 10
    assert first > 1.0 and last < 0.5 * first, (first, last)


def test_the_first_token_weight_picks_each_answers_first_token(chat_tokenizer):
    """copy_first_weight w weights each example's first answer token w times the others: with a huge w the loss is
    the first tokens' alone; with 1 it is the plain mean."""
    prompt = chat_tokenizer("The secret word is", add_special_tokens=False)["input_ids"]
    words = ["bamikolu", "tesanore"]
    examples = []
    for word, extra in zip(words, ([], [11])):  # prompts of different lengths: first tokens in different columns
        chunks = [f"secret {word}", "noise river"]
        target = chat_tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        examples.append(TrainingExample(chunks, prompt + extra, target, gold_chunk=0))
    model = pointer_model(chat_tokenizer)
    batch = collate(examples, 0)
    with torch.no_grad():
        plain = CepeTrainingModule(model)(batch)[3]
        heavy = CepeTrainingModule(model, copy_first_weight=1e9)(batch)[3]
        firsts = [TrainingExample(e.chunks, e.prompt_ids, e.target_ids[:1], gold_chunk=0) for e in examples]
        only_first = CepeTrainingModule(model)(collate(firsts, 0))[3]
    assert all(len(e.target_ids) > 1 for e in examples)
    assert heavy.item() == pytest.approx(only_first.item(), rel=1e-6)
    assert abs(plain.item() - only_first.item()) > 1e-3


def test_a_pointer_reader_answers_with_and_without_passages_in_one_batch(chat_tokenizer):
    """A request with no passages has no context tokens to copy: it answers as the plain decoder, beside one that
    has passages (this failed on the empty tokenizer batch before)."""
    from cepe_rag.readers import CepeReader
    from cepe_rag.types import Passage

    reader = CepeReader(pointer_model(chat_tokenizer), chat_tokenizer, generation=GenerationConfig(max_new_tokens=4))
    passages = [Passage(1, "the secret word is zebra")]
    alone = reader.answer("Which word?", []).text
    batch = reader.answer_batch(["Which word?", "Which word?"], [[], passages])
    assert batch[0].text == alone and batch[1].usage["passages_read"] == 1


def test_after_a_line_break_a_passage_word_is_copied_without_its_leading_space(chat_tokenizer):
    """An answer's first word follows the chat template's line break and is written without a space ("Lucia"), a
    token no passage holds (" Lucia" inside a sentence): copied there as its unspaced form; elsewhere as it is."""
    model = pointer_model(chat_tokenizer)
    assert model.config.copy_line_starts  # a new pointer copies line starts
    unspaced, ends_line = model.line_start_tables(torch.device("cpu"))
    ids = {text: chat_tokenizer(text, add_special_tokens=False)["input_ids"] for text in ("by Lucia", "Lucia", "\n")}
    assert unspaced[ids["by Lucia"][1]] == ids["Lucia"][0]  # " Luc" -> "Luc"
    assert unspaced[ids["Lucia"][0]] == ids["Lucia"][0] and ends_line[ids["\n"][0]]
    assert not ends_line[ids["Lucia"][0]]

    chunks = [["designed by Lucia Zathfaexov"]]
    context = model.context_from_texts(chunks)
    line = chat_tokenizer("Who designed it?\n", add_special_tokens=False)["input_ids"]
    model.pointer.gate.bias.data.fill_(60.0)  # copies only
    with torch.no_grad():
        copies = model(input_ids=torch.tensor([line]), cross_context=context).logits[0].exp()
    context_ids = set(model.tokenize_chunks(chunks[0])[0])
    at_line_start = {int(t) for t in (copies[-1] > 1e-6).nonzero()[:, 0]}  # the decoder keeps e-26
    assert ids["Lucia"][0] in at_line_start and ids["by Lucia"][1] not in at_line_start
    assert {int(t) for t in (copies[-2] > 1e-6).nonzero()[:, 0]} <= context_ids  # "?" ends no line: tokens as they are

    model.config.copy_line_starts = False  # an adapter trained before: its copies are unchanged
    with torch.no_grad():
        before = model(input_ids=torch.tensor([line]), cross_context=context).logits[0].exp()
    assert {int(t) for t in (before[-1] > 1e-6).nonzero()[:, 0]} <= context_ids


def test_span_copy_targets_point_at_the_answers_own_occurrence():
    """A digit occurs all over a passage: the span targets keep only the positions of the whole answer."""
    from cepe_rag.training.trainer import answer_span_targets

    context = torch.tensor([5, 1, 8, 1, 9, 6, 0, 7, 1, 9, 6, 0, 3])  # "... 1 8 1 9 6 0 ..." holds "1 9 6 0" once whole
    targets = torch.tensor([1, 9, 6, 0, 2])  # 2: the end of turn, in no passage
    gold = torch.ones(5, len(context), dtype=torch.bool)
    gold[:, 7:] = False  # the second "1 9 6 0" is another passage's
    spans = answer_span_targets(context.expand(5, -1), targets, gold)
    assert [row.nonzero()[:, 0].tolist() for row in spans] == [[3], [4], [5], [6], []]
    assert torch.equal(answer_span_targets(context.expand(5, -1), torch.tensor([4, 4, 2]), gold[:3]), gold[:3])


def test_the_copy_loss_finds_an_answers_first_word_after_the_line_break(chat_tokenizer):
    """The first token of "Lucia" (no space, after the prompt's line break) is in no passage as such: before
    line-start copies the copy loss could not see it at all (0); with them it points at " Luc" in the gold."""
    prompt = chat_tokenizer("Who designed it?\n", add_special_tokens=False)["input_ids"]
    first = chat_tokenizer("Lucia", add_special_tokens=False)["input_ids"][:1]
    batch = collate([TrainingExample(["designed by Lucia Zathfaexov", "noise river"], prompt, first, gold_chunk=0)],
                    0)
    model = pointer_model(chat_tokenizer)
    with torch.no_grad():
        line_starts = CepeTrainingModule(model, copy_spans=True)(batch)[3]
        model.config.copy_line_starts = False
        without = CepeTrainingModule(model)(batch)[3]
    assert line_starts.item() > 0 and without.item() == 0
