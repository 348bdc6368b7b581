"""CepeForCausalLM against an independent re-statement of the reference CEPE forward pass, in float64.

`reference_logits` is written from the paper and the semantics of princeton-nlp/CEPE's
`modeling_llama_flash.py` (transformers 4.34), not from our model code: plain tensors, the weights read
by name from the saved checkpoint and the shapes and RoPE base from its config.json (the fields the
reference code reads). Like the reference it takes chunks as one (batch, n_ctx, ctx_len) tensor with positions
0..ctx_len-1 over the padded length (its training chunks are unpadded token windows, so each chunk's tokens sit
at 0..len-1; its evaluation left-pads, which moves them and changes results only by the float32 rounding of the
RoPE tables, checked separately at that tolerance); every cross-attention layer attends over
all chunks' tokens in one softmax, padding masked; with `num_cross_attn_hidden_states` > 1 the decoder
layer i reads the encoder's hidden state number i - num_layers (counted from the back).
"""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from cepe_rag.cepe import CepeForCausalLM, build_encoder, load_cepe
from cepe_rag.cepe.model import group_by_request
from cepe_rag.models import embedder_path
from cepe_rag.readers import GenerationConfig
from cepe_rag.readers.generation import generate

DECODER = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, rope_theta=500.0, tie_word_embeddings=False)
ENCODER = dict(vocab_size=97, hidden_size=16, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=2, max_position_embeddings=64, rope_theta=10000.0)
TOLERANCE = 1e-10


# --- the re-statement ------------------------------------------------------------------------------

def rms_norm(x, weight, eps):
    # Llama's RMSNorm normalises in float32 whatever the model's dtype (the reference's and transformers' alike).
    x = x.float()
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(weight.dtype)


def rotate(x, positions, theta):
    head_dim = x.shape[-1]
    # The reference builds its RoPE tables in float32 whatever the model's dtype; so does transformers.
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = positions[..., None].float() * inv_freq
    cos, sin = (f(torch.cat([angles, angles], -1)).double() for f in (torch.cos, torch.sin))
    half = head_dim // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos[:, None] + rotated * sin[:, None]


def attend(q, k, v, bias):
    """q (b, h, n, d); k, v (b, kv, m, d), repeated to h heads; bias broadcast to (b, h, n, m)."""
    repeat = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + bias
    return torch.softmax(scores, -1) @ v


def heads(x, n):
    return x.view(x.shape[0], x.shape[1], n, -1).transpose(1, 2)


def llama_stack(w, prefix, config, hidden, positions, key_mask, causal, cross=None):
    """Llama layers; returns every hidden state the way output_hidden_states lists them (embeddings, each
    layer's output, the last one after the final norm). `cross(i, hidden)` adds cross-attention to layer i."""
    eps, theta = config["rms_norm_eps"], config["rope_theta"]
    n_heads, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    length = hidden.shape[1]
    bias = torch.zeros(hidden.shape[0], 1, length, length, dtype=torch.float64)
    # A finite minimum, not -inf: a fully padded chunk then gives finite states (masked out later) instead of NaN,
    # one of the reference's known defects that we guard.
    bias.masked_fill_(~key_mask[:, None, None, :], torch.finfo(torch.float64).min)
    if causal:
        bias = bias + torch.full((length, length), float("-inf"), dtype=torch.float64).triu(1)
    states = [hidden]
    for i in range(config["num_hidden_layers"]):
        p = f"{prefix}layers.{i}."
        x = rms_norm(hidden, w[p + "input_layernorm.weight"], eps)
        q = rotate(heads(x @ w[p + "self_attn.q_proj.weight"].T, n_heads), positions, theta)
        k = rotate(heads(x @ w[p + "self_attn.k_proj.weight"].T, n_kv), positions, theta)
        v = heads(x @ w[p + "self_attn.v_proj.weight"].T, n_kv)
        out = attend(q, k, v, bias).transpose(1, 2).reshape(hidden.shape[0], length, -1)
        hidden = hidden + out @ w[p + "self_attn.o_proj.weight"].T
        if cross is not None:
            hidden = hidden + cross(i, hidden)
        x = rms_norm(hidden, w[p + "post_attention_layernorm.weight"], eps)
        gate, up = x @ w[p + "mlp.gate_proj.weight"].T, x @ w[p + "mlp.up_proj.weight"].T
        hidden = hidden + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
        states.append(hidden)
    states[-1] = rms_norm(hidden, w[prefix + "norm.weight"], eps)
    return states


def reference_logits(folder, input_ids, encoder_input_ids=None, encoder_attention_mask=None):
    """input_ids (b, t); encoder_input_ids / mask (b, n_ctx, ctx_len), left-padded; None = no context."""
    config = json.loads((folder / "config.json").read_text())
    enc_config = config["encoder_config"]
    w = {k: v.double() for k, v in load_file(str(folder / "model.safetensors")).items()}
    cross = None
    if encoder_input_ids is not None:
        b, n_ctx, ctx_len = encoder_input_ids.shape
        ids, mask = encoder_input_ids.view(-1, ctx_len), encoder_attention_mask.view(-1, ctx_len).bool()
        positions = torch.arange(ctx_len).expand(ids.shape[0], -1)
        enc_states = llama_stack(w, "encoder.", enc_config, w["encoder.embed_tokens.weight"][ids], positions, mask,
                                 causal=False)
        if config["num_cross_attn_hidden_states"] == 1:
            enc_states = enc_states[-1:]
        enc_states = [s.reshape(b, n_ctx * ctx_len, -1) for s in enc_states]
        key_bias = torch.zeros(b, 1, 1, n_ctx * ctx_len, dtype=torch.float64)
        key_bias.masked_fill_(~encoder_attention_mask.reshape(b, 1, 1, -1).bool(), float("-inf"))
        n_layers = config["num_hidden_layers"]

        def cross(i, hidden):
            if i < n_layers - config["num_cross_attn_layers"]:
                return 0
            p = f"model.layers.{i}.cross_attn."
            state = enc_states[-1] if config["num_cross_attn_hidden_states"] == 1 else enc_states[i - n_layers]
            q = heads(rms_norm(hidden, w[p + "layernorm.weight"], config["rms_norm_eps"]) @ w[p + "q_proj.weight"].T,
                      config["num_attention_heads"])
            k = heads(state @ w[p + "k_proj.weight"].T, config["num_key_value_heads"])
            v = heads(state @ w[p + "v_proj.weight"].T, config["num_key_value_heads"])
            out = attend(q, k, v, key_bias).transpose(1, 2).reshape(hidden.shape[0], hidden.shape[1], -1)
            return out @ w[p + "o_proj.weight"].T

    positions = torch.arange(input_ids.shape[1]).expand(input_ids.shape[0], -1)
    hidden = llama_stack(w, "model.", config, w["model.embed_tokens.weight"][input_ids], positions,
                         torch.ones_like(input_ids, dtype=torch.bool), causal=True, cross=cross)[-1]
    return hidden @ w["lm_head.weight"].T


def padded(chunks_per_request, ctx_len, side="right"):
    n_ctx = max(len(c) for c in chunks_per_request)
    ids = torch.zeros(len(chunks_per_request), n_ctx, ctx_len, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, chunks in enumerate(chunks_per_request):
        for j, chunk in enumerate(chunks):
            if chunk:
                where = slice(ctx_len - len(chunk), None) if side == "left" else slice(0, len(chunk))
                ids[row, j, where] = torch.tensor(chunk)
                mask[row, j, where] = 1
    return ids, mask


# --- the checkpoint and the comparisons --------------------------------------------------------------

@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A tiny random checkpoint saved in the released layout, its config as the reference reads it."""
    torch.manual_seed(0)
    decoder = LlamaForCausalLM(LlamaConfig(**DECODER)).double()
    encoder = build_encoder(LlamaConfig(**ENCODER).to_dict()).double()
    model = CepeForCausalLM(decoder, encoder, num_cross_attn_layers=2, init_mode="copy")
    with torch.no_grad():  # trained-looking cross-attention: nothing copied, every tensor matters
        for layer in model.cross_attention_layers():
            for param in layer.cross_attn.parameters():
                param.normal_(0, 0.3)
    folder = tmp_path_factory.mktemp("released")
    model.save_pretrained(folder, tokenizer=AutoTokenizer.from_pretrained(embedder_path()))
    config = json.loads((folder / "config.json").read_text())
    # What a released config.json has: 4.34's rope fields only, no cepe-rag chunking fields.
    for key in ("rope_parameters", "chunk_add_special_tokens", "chunk_truncation_side"):
        config.pop(key, None)
        config["encoder_config"].pop(key, None)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def variant(folder, target, config):
    """The checkpoint in `folder` with another config.json (weights and tokenizer linked, not copied)."""
    target.mkdir()
    (target / "config.json").write_text(json.dumps(config))
    for file in folder.iterdir():
        if file.name != "config.json":
            (target / file.name).symlink_to(file)
    return target


def with_hidden_states(folder, tmp_path, n):
    config = json.loads((folder / "config.json").read_text())
    config["num_cross_attn_hidden_states"] = n
    return variant(folder, tmp_path / f"states{n}", config)


CHUNKS = [[[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18]], [[20, 21, 22], [], [23]]]


def ours(model, input_ids, chunks_per_request, cross_kv="cache"):
    flat = [c for chunks in chunks_per_request for c in chunks]
    states = group_by_request(model.encode_token_chunks(flat), chunks_per_request)
    context = model.context_from_states(states, cross_kv=cross_kv)
    return model(input_ids=input_ids, cross_context=context).logits


@pytest.mark.parametrize("n_states", [1, 2])
def test_forward_matches_the_reference(released, tmp_path, n_states):
    folder = with_hidden_states(released, tmp_path, n_states)
    model = load_cepe(folder, dtype=torch.float64)
    input_ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    enc_ids, enc_mask = padded(CHUNKS, ctx_len=8)
    expected = reference_logits(folder, input_ids, enc_ids, enc_mask)
    torch.testing.assert_close(ours(model, input_ids, CHUNKS), expected, rtol=0, atol=TOLERANCE)
    # K/V never formed (absorbed into the query and output sides): the same function, other rounding.
    torch.testing.assert_close(ours(model, input_ids, CHUNKS, "absorb"), expected, rtol=0, atol=TOLERANCE)
    # The reference evaluation's left padding: the same up to float32 RoPE-table rounding.
    left = reference_logits(folder, input_ids, *padded(CHUNKS, ctx_len=8, side="left"))
    torch.testing.assert_close(left, expected, rtol=0, atol=1e-5)
    # Without context: the frozen decoder, in both.
    torch.testing.assert_close(model(input_ids=input_ids).logits, reference_logits(folder, input_ids),
                               rtol=0, atol=TOLERANCE)
    # A batch where one request has context and the other none.
    mixed = ours(model, input_ids, [CHUNKS[0], []])
    torch.testing.assert_close(mixed[0], expected[0], rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(mixed[1], reference_logits(folder, input_ids[1:])[0], rtol=0, atol=TOLERANCE)


def test_several_hidden_states_change_the_output(released, tmp_path):
    """The setting is honoured, not ignored: reading per-layer encoder states gives other logits."""
    input_ids = torch.randint(0, 97, (2, 6))
    one = ours(load_cepe(with_hidden_states(released, tmp_path, 1), dtype=torch.float64),
               input_ids, CHUNKS)
    two = ours(load_cepe(with_hidden_states(released, tmp_path, 2), dtype=torch.float64),
               input_ids, CHUNKS)
    assert (one - two).abs().max() > 1e-3


def test_greedy_decoding_matches_the_reference(released):
    model = load_cepe(released, dtype=torch.float64)
    prompts = [[3, 4, 5, 6, 7, 8], [9, 10, 11]]  # different lengths: our loop left-pads the batch

    class Ids:
        pad_token_id, eos_token_id, unk_token_id = 0, None, None

        def decode(self, ids, skip_special_tokens=True):
            return "".join(f" {i}" for i in ids)

        def convert_tokens_to_ids(self, token):
            return None

    flat = [c for chunks in CHUNKS for c in chunks]
    context = model.context_from_states(group_by_request(model.encode_token_chunks(flat), CHUNKS))
    texts = ["", ""]
    for deltas in generate(model, prompts, Ids(), GenerationConfig(max_new_tokens=10), device=model.device,
                               cross_context=context):
        texts = [t + d for t, d in zip(texts, deltas)]
    for row, prompt in enumerate(prompts):
        enc_ids, enc_mask = padded([CHUNKS[row]], ctx_len=8)
        sequence = list(prompt)
        for _ in range(10):  # the reference re-runs the whole sequence every step, no cache
            logits = reference_logits(released, torch.tensor([sequence]), enc_ids, enc_mask)
            sequence.append(int(logits[0, -1].argmax()))
        assert [int(t) for t in texts[row].split()] == sequence[len(prompt):]


def test_exported_config_reads_as_intended_by_the_reference(released):
    """Field by field, what transformers 4.34's LlamaConfig and the reference modeling code read."""
    config = json.loads((released / "config.json").read_text())
    assert config["is_decoder"] is True  # missing, 4.34 builds a bidirectional decoder
    assert config["rope_theta"] == DECODER["rope_theta"] and config["rope_scaling"] is None
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings"):
        assert config[key] == DECODER[key], key
    assert config["hidden_act"] == "silu" and config["pretraining_tp"] == 1 and config["attention_bias"] is False
    assert config["rms_norm_eps"] == 1e-6 and config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalContextLM"] and "auto_map" not in config
    assert config["do_cross_attention"] is True and config["num_cross_attn_layers"] == 2
    assert config["num_cross_attn_hidden_states"] == 1 and config["encode_mode"] == "context_only"
    assert config["encoder_is_model"] is False and config["encoder_hidden_size"] == ENCODER["hidden_size"]
    encoder = config["encoder_config"]
    assert encoder["is_decoder"] is False and encoder["model_type"] == "llama"
    assert encoder["rope_theta"] == ENCODER["rope_theta"] and encoder["rope_scaling"] is None
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings"):
        assert encoder[key] == ENCODER[key], key


def test_released_checkpoints_tokenize_chunks_as_the_reference_evaluation(released, tmp_path):
    """No special tokens, left truncation for released checkpoints; our adapters keep what they were trained with."""
    tokenizer = AutoTokenizer.from_pretrained(embedder_path())
    model = load_cepe(released, dtype=torch.float64)
    model.encoder_tokenizer, model.max_chunk_tokens = tokenizer, 4
    text = "one two three four five six"
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert model.tokenize_chunks([text]) == [plain[-4:]]
    assert tokenizer.truncation_side == "right"  # the shared tokenizer is left as it was
    own = CepeForCausalLM(LlamaForCausalLM(LlamaConfig(**DECODER)), build_encoder(LlamaConfig(**ENCODER).to_dict()),
                          encoder_tokenizer=tokenizer, max_chunk_tokens=4)
    assert own.tokenize_chunks([text]) == [[tokenizer.cls_token_id, *plain[:2], tokenizer.sep_token_id]]
    own.save_pretrained(tmp_path / "own", tokenizer=tokenizer)
    reloaded = load_cepe(tmp_path / "own")
    reloaded.max_chunk_tokens = 4
    assert reloaded.tokenize_chunks([text]) == own.tokenize_chunks([text])


def test_unsupported_settings_are_refused_with_one_line(released, tmp_path):
    from cepe_rag.types import CepeRagError

    for key, value, message in (("encode_mode", "with_query-32", "encode_mode"),
                                ("num_cross_attn_hidden_states", 2, None)):
        config = json.loads((released / "config.json").read_text())
        config[key] = value
        if message is None:  # more cross-attention layers than encoder states to give them
            config["num_cross_attn_layers"] = 3
            config["encoder_config"]["num_hidden_layers"] = 1
            message = "num_cross_attn_hidden_states"
        with pytest.raises(CepeRagError, match=message):
            load_cepe(variant(released, tmp_path / f"bad-{key}", config))
