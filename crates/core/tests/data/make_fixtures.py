#!/usr/bin/env python3
"""Generates the tiny Hugging Face fixtures the lmstack-core tests compare against.

Regenerate (needs `pip install torch transformers tokenizers safetensors`, no network):

    python3 crates/core/tests/data/make_fixtures.py

Writes, next to this script, one directory per model (`config.json`, `model.safetensors`,
tokenizer files where the model has one) and `expected.json` in each: the input ids, the
attention mask, the logits of `transformers` in float32 eval mode and `num_parameters()`.
CI reads these files without Python.

Verify an lmstack-written directory in transformers (the reverse direction):

    python3 crates/core/tests/data/make_fixtures.py --verify DIR

which loads DIR with `transformers` and compares its logits to DIR/expected.json. `--reward`
writes the reward-model fixtures alone.
"""
import json
import os
import sys

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers, processors, normalizers

HERE = os.path.dirname(os.path.abspath(__file__))
TEXT = (
    "First Citizen: Before we proceed any further, hear me speak.\n"
    "All: Speak, speak.\n"
    "First Citizen: You are all resolved rather to die than to famish?\n"
    "All: Resolved. resolved.\n"
    "Caf\u00e9 na\u00efve \u65e5\u672c\u8a9e \U0001F600 emoji and accents.\n"
) * 20


def byte_bpe(vocab_size):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    return tok


def wordpiece(vocab_size):
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok


def save_tokenizer(tok, d, special):
    tok.save(os.path.join(d, "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", **special}
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def tokenizer_cases(tok, d):
    samples = ["Before we proceed, hear me speak.", "Caf\u00e9 \u65e5\u672c \U0001F600!", "  spaces\n\nand lines  "]
    cases = []
    for s in samples:
        enc = tok.encode(s)
        cases.append({"text": s, "ids": enc.ids, "decoded": tok.decode(enc.ids)})
    with open(os.path.join(d, "tokenizer_cases.json"), "w") as f:
        json.dump(cases, f, indent=1, ensure_ascii=False)


def dump(model, d, ids, mask, token_type_ids=None, head="logits"):
    model.eval()
    model.save_pretrained(d, safe_serialization=True)
    with torch.no_grad():
        kw = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
        if token_type_ids is not None:
            kw["token_type_ids"] = torch.tensor(token_type_ids)
        out = model(**kw).logits
    exp = {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": token_type_ids,
        "logits": [[[round(float(x), 7) for x in row] for row in b] for b in out.tolist()]
        if out.dim() == 3 else [[round(float(x), 7) for x in row] for row in out.tolist()],
        "num_parameters": model.num_parameters(),
        "transformers_version": transformers.__version__,
    }
    with open(os.path.join(d, "expected.json"), "w") as f:
        json.dump(exp, f)


def batch(vocab, lengths, seed):
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids, mask = [], []
    for n in lengths:
        row = torch.randint(0, vocab, (n,), generator=g).tolist()
        ids.append(row + [0] * (t - n))
        mask.append([1] * n + [0] * (t - n))
    return ids, mask


def main():
    torch.manual_seed(0)
    # GPT-2 with a byte-level BPE tokenizer.
    d = os.path.join(HERE, "tiny-gpt2")
    os.makedirs(d, exist_ok=True)
    tok = byte_bpe(300)
    vocab = tok.get_vocab_size()
    cfg = transformers.GPT2Config(
        vocab_size=vocab, n_positions=32, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():  # non-trivial LayerNorm parameters so their loading is tested
        for n, p in model.named_parameters():
            if "ln" in n:
                p.add_(0.1 * torch.randn_like(p))
    ids, mask = batch(vocab, [12, 7], 1)
    dump(model, d, ids, mask)
    save_tokenizer(tok, d, {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                            "chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"})
    tokenizer_cases(tok, d)

    # Llama with grouped-query attention (4 query heads sharing 2 KV heads), untied head.
    d = os.path.join(HERE, "tiny-llama")
    os.makedirs(d, exist_ok=True)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=500000.0,
        tie_word_embeddings=False, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    ids, mask = batch(64, [20, 13, 5], 2)
    dump(model, d, ids, mask)

    # BERT with the masked-LM head and a WordPiece tokenizer.
    d = os.path.join(HERE, "tiny-bert")
    os.makedirs(d, exist_ok=True)
    tok = wordpiece(120)
    vocab = tok.get_vocab_size()
    cfg = transformers.BertConfig(
        vocab_size=vocab, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.BertForMaskedLM(cfg)
    ids, mask = batch(vocab, [10, 6], 3)
    tt = [[0] * 5 + [1] * 5, [0] * 3 + [1] * 3 + [0] * 4]
    dump(model, d, ids, mask, tt)
    save_tokenizer(tok, d, {"unk_token": "[UNK]", "pad_token": "[PAD]", "mask_token": "[MASK]",
                            "cls_token": "[CLS]", "sep_token": "[SEP]"})
    tokenizer_cases(tok, d)

    # BERT with the pooled sequence-classification head.
    d = os.path.join(HERE, "tiny-bert-cls")
    os.makedirs(d, exist_ok=True)
    cfg.num_labels = 3
    cfg.id2label = {0: "negative", 1: "neutral", 2: "positive"}
    cfg.label2id = {v: k for k, v in cfg.id2label.items()}
    model = transformers.BertForSequenceClassification(cfg)
    dump(model, d, ids, mask, tt)


    # The families of the Llama block, each with odd sizes and what sets it apart; the prompts
    # (20, 13 and 5 tokens) are longer than the sliding windows.
    for name, cls, cfg_cls, kw in [
        # Qwen2.5: q/k/v biases, GQA 3:1, tied head, a window of 6 on layers 1 and 2, YaRN.
        ("tiny-qwen2", "Qwen2ForCausalLM", "Qwen2Config", dict(
            vocab_size=70, hidden_size=36, intermediate_size=50, num_hidden_layers=3, num_attention_heads=6,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, use_sliding_window=True,
            sliding_window=6, max_window_layers=1,
            rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                             "rope_theta": 10000.0})),
        # Qwen3: q/k norms, head_dim 12 with a width of 32 (4 heads), GQA 4:1, biases everywhere.
        ("tiny-qwen3", "Qwen3ForCausalLM", "Qwen3Config", dict(
            vocab_size=66, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, head_dim=12, max_position_embeddings=64, tie_word_embeddings=False,
            attention_bias=True, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
        # Mistral: a window of 5 on every layer, head_dim 8 with a width of 24 (6 heads), GQA 3:1,
        # linear RoPE scaling.
        ("tiny-mistral", "MistralForCausalLM", "MistralConfig", dict(
            vocab_size=64, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64, sliding_window=5,
            tie_word_embeddings=False, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})),
        # Llama 3.2: Llama 3.1's RoPE scaling, tied head, GQA 4:1.
        ("tiny-llama3", "LlamaForCausalLM", "LlamaConfig", dict(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True,
            rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 16, "rope_theta": 500000.0})),
        # Gemma 2: (1 + w) norms, √width embeddings, GeGLU, sandwich norms, soft caps small
        # enough to bind (weights drawn wide), query_pre_attn_scalar, local layers 0 and 2
        # with a window of 5, head_dim 12 with a width of 32.
        ("tiny-gemma2", "Gemma2ForCausalLM", "Gemma2Config", dict(
            vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=12, max_position_embeddings=64, sliding_window=5,
            query_pre_attn_scalar=16, attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
            initializer_range=0.3, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
        # Gemma 3 (text): q/k norms, local layers 0, 1, 3 with a window of 4 and their own RoPE
        # base, linear RoPE scaling on the global layer, GQA 4:1, head_dim 16.
        ("tiny-gemma3", "Gemma3ForCausalLM", "Gemma3TextConfig", dict(
            vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=1, head_dim=16, max_position_embeddings=64, sliding_window=4,
            query_pre_attn_scalar=24, initializer_range=0.3,
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})),
        # Phi-3: fused qkv_proj and gate_up_proj, RoPE on the first 3/4 of each 16-wide head,
        # a window of 6 on every layer, GQA 3:1.
        ("tiny-phi3", "Phi3ForCausalLM", "Phi3Config", dict(
            vocab_size=64, hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=3,
            num_key_value_heads=1, max_position_embeddings=64, original_max_position_embeddings=64,
            sliding_window=6, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75})),
    ]:
        d = os.path.join(HERE, name)
        os.makedirs(d, exist_ok=True)
        cfg = getattr(transformers, cfg_cls)(rms_norm_eps=1e-6, attn_implementation="eager", **kw)
        model = getattr(transformers, cls)(cfg)
        with torch.no_grad():  # non-trivial norms and biases, so their loading is tested
            for n, p in model.named_parameters():
                if "norm" in n or n.endswith(".bias"):
                    p.add_(0.1 * torch.randn_like(p))
        ids, mask = batch(kw["vocab_size"], [20, 13, 5], 4)
        dump(model, d, ids, mask)
        if name == "tiny-gemma2":
            # The soft caps bind: without them the logits differ.
            with torch.no_grad():
                kw_ = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
                capped = model(**kw_).logits
                model.config.attn_logit_softcapping = None
                for layer in model.model.layers:
                    layer.self_attn.attn_logit_softcapping = None
                model.config.final_logit_softcapping = None
                uncapped = model(**kw_).logits
                assert (capped - uncapped).abs().max() > 0.1, (capped - uncapped).abs().max()
                model.config.attn_logit_softcapping = kw["attn_logit_softcapping"]
                for layer in model.model.layers:
                    layer.self_attn.attn_logit_softcapping = kw["attn_logit_softcapping"]
                model.config.final_logit_softcapping = kw["final_logit_softcapping"]
        # Greedy generation from the first prompt (`expected.json` "greedy"), cached.
        with torch.no_grad():
            prompt = torch.tensor([ids[0][:12]])
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                                 do_sample=False, pad_token_id=0)
        with open(os.path.join(d, "expected.json")) as f:
            exp = json.load(f)
        exp["greedy"] = {"prompt": ids[0][:12], "tokens": out[0, 12:].tolist()}
        with open(os.path.join(d, "expected.json"), "w") as f:
            json.dump(exp, f)

    # Gemma 3's multimodal checkpoint (Gemma3ForConditionalGeneration, as the 4B-27B models are
    # published): lmstack reads its text model, so the logits of text-only input must match.
    d = os.path.join(HERE, "tiny-gemma3-mm")
    os.makedirs(d, exist_ok=True)
    tc = transformers.Gemma3TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=64, sliding_window=4, query_pre_attn_scalar=16,
        initializer_range=0.3,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
    vc = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=16, patch_size=8)
    cfg = transformers.Gemma3Config(text_config=tc, vision_config=vc, mm_tokens_per_image=4, image_token_index=63,
                                    boi_token_index=61, eoi_token_index=62)
    model = transformers.Gemma3ForConditionalGeneration(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    ids, mask = batch(61, [20, 13, 5], 5)  # no image tokens (61-63)
    dump(model, d, ids, mask)


def reward_models():
    """Reward models: a causal LM's sequence-classification head (`score`, one label), pooled
    at each row's last token that is not the pad token (rows padded with pad_token_id 0)."""
    torch.manual_seed(7)
    for name, cls, cfg in [
        ("tiny-llama-reward", "LlamaForSequenceClassification", transformers.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, num_labels=1,
            pad_token_id=0, attn_implementation="eager")),
        ("tiny-gpt2-reward", "GPT2ForSequenceClassification", transformers.GPT2Config(
            vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, num_labels=1, pad_token_id=0, bos_token_id=63, eos_token_id=63)),
    ]:
        d = os.path.join(HERE, name)
        os.makedirs(d, exist_ok=True)
        model = getattr(transformers, cls)(cfg)
        with torch.no_grad():  # a score head large enough that pooling the wrong token shows
            model.score.weight.mul_(20.0)
        ids, mask = batch(64, [12, 7, 3], 6)
        ids = [[x % 63 + 1 if m else 0 for x, m in zip(r, rm)] for r, rm in zip(ids, mask)]
        dump(model, d, ids, mask)


def verify(d):
    """Loads an lmstack-written directory in transformers and compares logits."""
    with open(os.path.join(d, "expected.json")) as f:
        exp = json.load(f)
    cfg = transformers.AutoConfig.from_pretrained(d)
    arch = cfg.architectures[0]
    model = getattr(transformers, arch).from_pretrained(d, attn_implementation="eager").eval()
    kw = {"input_ids": torch.tensor(exp["input_ids"]), "attention_mask": torch.tensor(exp["attention_mask"])}
    with torch.no_grad():
        out = model(**kw).logits
    ref = torch.tensor(exp["logits"])
    m = torch.tensor(exp["attention_mask"]).bool()
    diff = (out[m] - ref[m]).abs().max().item()
    print(f"{d}: {arch}, {model.num_parameters()} parameters (lmstack: {exp['num_parameters']}), max |diff| = {diff:.2e}")
    if os.path.exists(os.path.join(d, "tokenizer.json")):
        tok = transformers.AutoTokenizer.from_pretrained(d)
        for case in exp.get("tokenizer_cases", []):
            ids = tok(case["text"], add_special_tokens=False)["input_ids"]
            assert ids == case["ids"], (case, ids)
            assert tok.decode(ids) == case["text"], (case, tok.decode(ids))
        print(f"{d}: tokenizer loads in transformers ({len(tok)} tokens), {len(exp.get('tokenizer_cases', []))} cases match")
    assert diff < 1e-4 and model.num_parameters() == exp["num_parameters"]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--verify":
        verify(sys.argv[2])
    elif sys.argv[1:] == ["--reward"]:
        reward_models()
    else:
        main()
        reward_models()
