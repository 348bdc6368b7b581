"""Numerical checks of the CEPE model on tiny random models (float64, so equalities are exact or ~1e-12)."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from cepe_rag.cepe import CepeForCausalLM, ContextStates, CrossContext, build_encoder, load_cepe
from cepe_rag.models import embedder_path
from cepe_rag.readers import GenerationConfig
from cepe_rag.readers.generation import generate

SMALL = dict(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
            "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


def tiny_decoder(family="llama", seed=0):
    config_cls, model_cls = FAMILIES[family]
    torch.manual_seed(seed)
    return model_cls(config_cls(**SMALL)).double().eval()


def tiny_bert(vocab_size=30522, seed=1):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=300)
    return BertModel(config).double().eval()


def tiny_cepe(init_mode="copy", family="llama", n_cross=2, encoder=None, encoder_tokenizer=None):
    decoder = tiny_decoder(family)
    model = CepeForCausalLM(decoder, encoder or tiny_bert(), num_cross_attn_layers=n_cross, init_mode=init_mode,
                            encoder_tokenizer=encoder_tokenizer)
    return model.double().eval()


def random_chunks(lengths, width=24, seed=2):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, width, generator=generator, dtype=torch.float64) for n in lengths]


@pytest.fixture(scope="module")
def minilm_tokenizer():
    return AutoTokenizer.from_pretrained(embedder_path())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_no_context_is_exactly_the_plain_decoder(family):
    plain = tiny_decoder(family)
    model = tiny_cepe(family=family)
    ids = torch.randint(0, 120, (2, 9))
    assert torch.equal(model(input_ids=ids).logits, plain(input_ids=ids).logits)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_zero_init_with_context_is_exactly_the_plain_decoder(family):
    plain = tiny_decoder(family)
    model = tiny_cepe("zero", family=family)
    ids = torch.randint(0, 120, (2, 9))
    context = model.context_from_states([random_chunks([5, 3]), random_chunks([4], seed=3)])
    assert torch.equal(model(input_ids=ids, cross_context=context).logits, plain(input_ids=ids).logits)


def test_a_closed_gate_is_exactly_the_plain_decoder_and_an_open_one_scales_the_block(tmp_path, minilm_tokenizer):
    """Flamingo's tanh gate: at its zero start a copy-initialised model (which otherwise reads its context) is the
    plain decoder bit for bit; opened, each block adds tanh(gate) times the ungated block's output."""
    plain, ungated = tiny_decoder(), tiny_cepe("copy")
    gated = CepeForCausalLM(tiny_decoder(), tiny_bert(), num_cross_attn_layers=2, init_mode="copy", gate=True,
                            encoder_tokenizer=minilm_tokenizer).double()
    gated.eval()
    ids = torch.randint(0, 120, (2, 9))
    chunks = [random_chunks([5, 3]), random_chunks([4], seed=3)]
    assert torch.equal(gated(input_ids=ids, cross_context=gated.context_from_states(chunks)).logits,
                       plain(input_ids=ids).logits)
    gate = gated.decoder.model.layers[-1].cross_attn.gate
    with torch.no_grad():
        gate.fill_(0.7)
    hidden = torch.randn(2, 5, 32, dtype=torch.float64)
    opened = gated.decoder.model.layers[-1].cross_attn(hidden, gated.context_from_states(chunks))
    block = ungated.decoder.model.layers[-1].cross_attn(hidden, ungated.context_from_states(chunks))
    torch.testing.assert_close(opened, torch.tanh(torch.tensor(0.7, dtype=torch.float64)) * block,
                               rtol=1e-12, atol=1e-12)
    gated.save_pretrained(tmp_path / "gated", tokenizer=minilm_tokenizer)  # the gate goes with it, config too
    reloaded = load_cepe(tmp_path / "gated", dtype=torch.float64)
    assert reloaded.config.cross_attn_gate and float(reloaded.decoder.model.layers[-1].cross_attn.gate) == 0.7
    ungated.add_gates()  # a gated run from an ungated adapter starts as the plain decoder too
    assert torch.equal(ungated(input_ids=ids, cross_context=ungated.context_from_states(chunks)).logits,
                       plain(input_ids=ids).logits)


def test_context_changes_the_output_and_only_last_layers_have_cross_attention():
    model = tiny_cepe("copy", n_cross=2)
    assert [hasattr(layer, "cross_attn") for layer in model.decoder.model.layers] == [False, True, True]
    ids = torch.randint(0, 120, (1, 6))
    context = model.context_from_states([random_chunks([5, 3])])
    assert (model(input_ids=ids, cross_context=context).logits - model(input_ids=ids).logits).abs().max() > 1e-3


def test_cross_attention_matches_a_reference_computation():
    model = tiny_cepe("copy")
    layer = model.decoder.model.layers[-1]
    cross = layer.cross_attn
    hidden = torch.randn(2, 5, 32, dtype=torch.float64)
    chunks = [random_chunks([4, 2]), random_chunks([3], seed=5)]
    output = cross(hidden, model.context_from_states(chunks))

    heads, kv_heads, head_dim = 4, 2, 8
    for row, request in enumerate(chunks):
        states = torch.cat(request)
        q = cross.q_proj(cross.layernorm(hidden[row])).view(5, heads, head_dim).transpose(0, 1)
        k = cross.k_proj(states).view(-1, kv_heads, head_dim).transpose(0, 1).repeat_interleave(2, dim=0)
        v = cross.v_proj(states).view(-1, kv_heads, head_dim).transpose(0, 1).repeat_interleave(2, dim=0)
        weights = torch.softmax(q @ k.transpose(-1, -2) / head_dim**0.5, dim=-1)
        expected = cross.o_proj((weights @ v).transpose(0, 1).reshape(5, -1))
        torch.testing.assert_close(output[row], expected, rtol=1e-10, atol=1e-10)


def test_chunk_padding_empty_chunks_and_order_do_not_matter(minilm_tokenizer):
    model = tiny_cepe("copy", encoder_tokenizer=minilm_tokenizer)
    ids = torch.randint(0, 120, (1, 7))
    texts = ["a short chunk", "a much longer chunk of context that forces padding of the others", "mid size text"]

    def logits(chunks):
        return model(input_ids=ids, cross_context=model.context_from_texts([chunks])).logits

    reference = logits(texts)
    torch.testing.assert_close(logits(texts[::-1]), reference, rtol=0, atol=1e-12)
    torch.testing.assert_close(logits([texts[0], "", texts[1], "", texts[2]]), reference, rtol=0, atol=1e-12)
    # Each chunk encoded alone (no padding) gives the same states as in the padded batch.
    alone = [model.encode_context([t]).states[0] for t in texts]
    batched = model.encode_context(texts).states
    for a, b in zip(alone, batched):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_request_with_only_empty_chunks_behaves_like_no_context(minilm_tokenizer):
    model = tiny_cepe("copy", encoder_tokenizer=minilm_tokenizer)
    ids = torch.randint(0, 120, (2, 6))
    assert model.context_from_texts([[""], []]) is None
    context = model.context_from_texts([["real context here"], ["", ""]])
    mixed = model(input_ids=ids, cross_context=context).logits
    # Against the same batch without context: equal shapes take the same kernels on any CPU, so this is exact.
    assert torch.equal(mixed[1], model(input_ids=ids).logits[1])


def test_batched_requests_equal_single_requests(minilm_tokenizer):
    model = tiny_cepe("copy", encoder_tokenizer=minilm_tokenizer)
    ids = torch.randint(0, 120, (2, 6))
    chunks = [["first request context", "and more"], ["second request, different context"]]
    batched = model(input_ids=ids, cross_context=model.context_from_texts(chunks)).logits
    for row in range(2):
        single = model(input_ids=ids[row:row + 1], cross_context=model.context_from_texts([chunks[row]])).logits
        torch.testing.assert_close(batched[row], single[0], rtol=0, atol=1e-12)


def test_cached_absorbed_and_projected_cross_kv_agree(minilm_tokenizer):
    """`absorb` reassociates the projections (W_k to the query side, W_v after the weighted sum): equal to `cache` in
    exact arithmetic, so to rounding in float64; greedy decoding then picks the same tokens."""
    model = tiny_cepe("copy", encoder_tokenizer=minilm_tokenizer)
    chunks = [["context one", "context two"], ["other"]]
    prompts = [[5, 6, 7, 8], [9, 10]]
    config = GenerationConfig(max_new_tokens=12)

    class Ids:  # the decode loop detokenises; numbers as text are enough here
        pad_token_id, eos_token_id, unk_token_id = 0, None, None

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

        def convert_tokens_to_ids(self, token):
            return None

    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    cached = model(input_ids=ids, cross_context=model.context_from_texts(chunks)).logits
    outputs = {}
    for mode in ("cache", "absorb", "project"):
        context = model.context_from_texts(chunks, cross_kv=mode)
        torch.testing.assert_close(model(input_ids=ids, cross_context=context).logits, cached, rtol=0, atol=1e-12)
        texts = ["", ""]
        for deltas in generate(model, prompts, Ids(), config, device=model.device, cross_context=context):
            texts = [t + d for t, d in zip(texts, deltas)]
        outputs[mode] = texts
        assert bool(context.kv) == (mode == "cache")
    assert outputs["cache"] == outputs["absorb"] == outputs["project"]
    assert len(outputs["cache"][0].split()) == 12
    with pytest.raises(ValueError, match="cross_kv must be one of"):
        model.context_from_texts(chunks, cross_kv="recompute")


def test_llama_encoder_is_bidirectional():
    encoder = build_encoder(LlamaConfig(**{**SMALL, "num_hidden_layers": 2}).to_dict())
    ids = torch.randint(0, 120, (1, 6))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 120
    first = encoder(input_ids=ids).last_hidden_state[0, 0]
    assert not torch.allclose(first, encoder(input_ids=changed).last_hidden_state[0, 0])


def test_released_layout_round_trip(tmp_path, minilm_tokenizer):
    """A tiny checkpoint in exactly the hyen/CEPE-LLaMA-2 layout (Llama encoder) saves and loads unchanged."""
    encoder = build_encoder(LlamaConfig(**{**SMALL, "hidden_size": 16, "num_hidden_layers": 2,
                                           "num_attention_heads": 2, "num_key_value_heads": 2}).to_dict())
    model = tiny_cepe("copy", encoder=encoder.double(), n_cross=3, encoder_tokenizer=minilm_tokenizer)
    ids = torch.randint(0, 120, (1, 5))
    context = model.context_from_states([random_chunks([4, 3], width=16)])
    expected = model(input_ids=ids, cross_context=context).logits
    model.save_pretrained(tmp_path / "ckpt", tokenizer=minilm_tokenizer)

    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalContextLM"] and "auto_map" not in config
    assert config["num_cross_attn_layers"] == 3 and config["encoder_hidden_size"] == 16
    assert config["encoder_config"]["model_type"] == "llama" and config["do_cross_attention"] is True
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
        assert tuple(handle.get_tensor("model.layers.2.cross_attn.k_proj.weight").shape) == (16, 16)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "layernorm"):
        assert f"model.layers.0.cross_attn.{name}.weight" in keys
    assert {"encoder.embed_tokens.weight", "encoder.norm.weight", "encoder.layers.1.self_attn.q_proj.weight",
            "encoder.layers.0.mlp.gate_proj.weight", "model.embed_tokens.weight"} <= keys

    loaded = load_cepe(tmp_path / "ckpt", dtype=torch.float64)
    reloaded_context = loaded.context_from_states([random_chunks([4, 3], width=16)])
    assert torch.equal(loaded(input_ids=ids, cross_context=reloaded_context).logits, expected)
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_from_pretrained_refuses_a_plain_checkpoint(tmp_path):
    from cepe_rag.types import CepeRagError

    tiny_decoder().save_pretrained(tmp_path / "plain")
    with pytest.raises(CepeRagError, match="not a CEPE checkpoint"):
        load_cepe(tmp_path / "plain")


def test_context_states_round_trip_and_reuse(tmp_path, minilm_tokenizer):
    model = tiny_cepe("copy", encoder_tokenizer=minilm_tokenizer)
    texts = ["alpha passage", "beta passage is longer", "gamma"]
    states = model.encode_context(texts, ids=[10, 20, 30])
    states.save(tmp_path / "states.safetensors", dtype=torch.float32)
    loaded = ContextStates.load(tmp_path / "states.safetensors", ids=[30, 10])
    assert loaded.ids == [30, 10]
    torch.testing.assert_close(loaded.states[0].double(), states.states[2], rtol=0, atol=1e-6)
    # Precomputed states give the same logits as encoding on the fly (any question, no re-encoding).
    ids = torch.randint(0, 120, (1, 6))
    fresh = model(input_ids=ids, cross_context=model.context_from_texts([[texts[2], texts[0]]])).logits
    reused = model(input_ids=ids, cross_context=model.context_from_states([loaded.states])).logits
    torch.testing.assert_close(reused, fresh, rtol=0, atol=1e-5)


def test_cross_context_masks_padding_between_requests():
    chunks = [random_chunks([2]), random_chunks([5], seed=9)]
    context = CrossContext.from_chunks(chunks)
    assert context.states.shape == (2, 5, 24)
    assert context.mask.tolist() == [[True, True, False, False, False], [True] * 5]
