//! GGUF files: a Llama model written as GGUF (llama.cpp's tensor names and row order) loads
//! back with the same logits (exactly at f32, within the activation rounding of the quantized
//! kernels otherwise, weights kept quantized), the tokenizer built from `tokenizer.ggml.*`
//! encodes as the original, and a bad file is refused naming the key or tensor.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::quantized::gguf_file::{self, Value as GValue};
use candle_core::quantized::QTensor;
use common::{max_diff, repo_data};
use lmstack_core::gguf::{write_model, GgufFile, WriteType};
use lmstack_core::params::ParamStore;
use lmstack_core::{DType, Device, Model, ModelConfig, Pretrained, SeqStep, Tensor, Tokenizer};

/// A fresh directory for each call: tests run on parallel threads of one process, and two
/// of them writing the same scratch file read each other's half-written text.
fn tmp(tag: &str) -> PathBuf {
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let n = CALLS.fetch_add(1, Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("lmstack-gguf-{tag}-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A byte-level BPE tokenizer of 300 tokens trained on a slice of tiny Shakespeare, with a
/// ChatML-style template.
fn tokenizer() -> Tokenizer {
    let d = tmp("tok");
    let text = std::fs::read_to_string(repo_data("tinyshakespeare.txt")).unwrap();
    let f = d.join("corpus.txt");
    std::fs::write(&f, &text[..100_000]).unwrap();
    let mut t = Tokenizer::train_bpe(&[f.as_path()], 300, &["<|endoftext|>", "<|im_start|>", "<|im_end|>"]).unwrap();
    t.set_chat_template(Some(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}".into(),
    ));
    t
}

/// A random Llama whose rows split into k-quant super-blocks (width 256, MLP 512).
fn model(vocab: usize, tied: bool) -> Model {
    let cfg = ModelConfig::from_json(
        &format!(
            r#"{{"model_type":"llama","vocab_size":{vocab},"hidden_size":256,"intermediate_size":512,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"max_position_embeddings":64,
            "rms_norm_eps":1e-5,"rope_theta":10000.0,"tie_word_embeddings":{tied},"initializer_range":0.05}}"#
        ),
        "test",
    )
    .unwrap();
    Model::init(cfg, 7, DType::F32, &Device::Cpu).unwrap()
}

fn ids() -> Tensor {
    Tensor::new(&[[5u32, 17, 250, 3, 99, 42, 7, 280, 1, 64]], &Device::Cpu).unwrap()
}

/// Logits of a frozen f32 model holding `m`'s weights as plain tensors (quantized ones
/// dequantized): what the quantized weights imply.
fn dequantized_twin(m: &Model) -> Model {
    let tensors = m.params().tensors().into_iter().collect();
    Model::new(m.config().clone(), &ParamStore::frozen(tensors, "twin"), DType::F32, &Device::Cpu).unwrap()
}

#[test]
fn f32_gguf_has_the_models_logits_and_tokenizer() {
    let tok = tokenizer();
    for tied in [false, true] {
        let m = model(tok.vocab_size(), tied);
        let path = tmp("f32").join(format!("m-{tied}.gguf"));
        write_model(&m, &tok, &path, WriteType::F32).unwrap();
        let back = Pretrained::load(&path, DType::F32, &Device::Cpu).unwrap();
        // Query and key rows went through llama.cpp's permutation and back.
        let d = max_diff(&m.forward(&ids(), None).unwrap(), &back.model.forward(&ids(), None).unwrap());
        assert!(d < 1e-5, "tied={tied}: {d}");
        let ModelConfig::Llama(c) = back.model.config() else { panic!() };
        assert_eq!(c.tie_word_embeddings, tied);
        assert_eq!((c.kv_heads(), c.head_dim(), c.rope_theta()), (2, 64, 10000.0));
        let text = "ROMEO: 1234 wherefore art thou?\n\n  <|im_end|> é";
        assert_eq!(back.tokenizer.encode(text, true).unwrap(), tok.encode(text, true).unwrap());
        let enc = back.tokenizer.encode(text, false).unwrap();
        assert_eq!(back.tokenizer.decode(&enc, false).unwrap(), text);
        assert_eq!(back.tokenizer.chat_template(), tok.chat_template());
        assert_eq!(back.tokenizer.eos_id(), tok.eos_id());
    }
}

/// The families of the Llama block are written under llama.cpp's architectures and read back
/// as the same family with the same logits (f32, and Q8_0 computing what its dequantized
/// weights imply): Qwen2 (query/key/value biases) and Qwen3 (query/key head norms, head_dim
/// apart from the width), without the `llama` row permutation; Gemma 2 and 3 (norms stored as
/// `1 + w`, soft caps, windows on the local layers, Gemma 3's head norms and linear RoPE
/// scaling); Phi-3 (fused projections, half the head rotated, a window).
#[test]
fn llama_block_families_round_trip() {
    let tok = tokenizer();
    // (A Qwen3 head_dim of width / heads is written too: the family's default is 128.)
    for (family, extra) in [
        // Llama 3.1's RoPE scaling: llama.cpp's `rope_freqs.weight`, read back as the config.
        (
            "llama",
            r#","rope_theta":500000.0,"rope_scaling":{"rope_type":"llama3","factor":32.0,"low_freq_factor":1.0,
            "high_freq_factor":4.0,"original_max_position_embeddings":8192}"#,
        ),
        ("qwen2", ""),
        ("qwen3", r#","head_dim":32"#),
        ("qwen3", r#","head_dim":64"#),
        (
            "gemma2",
            r#","head_dim":64,"query_pre_attn_scalar":64,"sliding_window":4,"attn_logit_softcapping":5.0,
            "final_logit_softcapping":3.0"#,
        ),
        (
            "gemma3_text",
            r#","head_dim":32,"query_pre_attn_scalar":32,"sliding_window":4,"rope_scaling":{"rope_type":"linear","factor":8.0}"#,
        ),
        ("phi3", r#","sliding_window":4,"partial_rotary_factor":0.5"#),
    ] {
        let cfg = ModelConfig::from_json(
            &format!(
                r#"{{"model_type":"{family}","vocab_size":{},"hidden_size":256,"intermediate_size":512,
                "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":1,"max_position_embeddings":64,
                "rms_norm_eps":1e-6,"tie_word_embeddings":true,"initializer_range":0.05{extra}}}"#,
                tok.vocab_size()
            ),
            "test",
        )
        .unwrap();
        let m = Model::init(cfg, 7, DType::F32, &Device::Cpu).unwrap();
        // Biases and norms away from their initial zeros and ones, so that their mapping counts.
        for (name, v) in m.params().vars() {
            if name.ends_with(".bias") || name.contains("norm") {
                let noise = Tensor::randn(0f32, 0.3, v.shape(), &Device::Cpu).unwrap();
                v.set(&(v.as_tensor() + noise).unwrap()).unwrap();
            }
        }
        let dir = tmp(family);
        let path = dir.join("m.gguf");
        write_model(&m, &tok, &path, WriteType::F32).unwrap();
        let file = lmstack_core::gguf::GgufFile::open(&path).unwrap();
        assert_eq!(file.architecture().unwrap(), family.trim_end_matches("_text"));
        let back = Pretrained::load(&path, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(back.model.config().model_type_str(), family);
        let (ModelConfig::Llama(a), ModelConfig::Llama(b)) = (m.config(), back.model.config()) else { panic!() };
        let windows = |c: &lmstack_core::config::LlamaConfig| (0..2).map(|i| c.layer_window(i)).collect::<Vec<_>>();
        assert_eq!(windows(a), windows(b), "{family}");
        assert_eq!(
            (a.rotary_dim(), a.rope_for(false).unwrap()),
            (b.rotary_dim(), b.rope_for(false).unwrap()),
            "{family}"
        );
        assert_eq!(back.model.num_parameters(), m.num_parameters());
        let d = max_diff(&m.forward(&ids(), None).unwrap(), &back.model.forward(&ids(), None).unwrap());
        assert!(d < 1e-5, "{family}: {d}");
        let q = dir.join("q8.gguf");
        write_model(&m, &tok, &q, WriteType::Q8_0).unwrap();
        let back = Pretrained::load(&q, DType::F32, &Device::Cpu).unwrap();
        let want = dequantized_twin(&back.model).forward(&ids(), None).unwrap();
        let d = max_diff(&back.model.forward(&ids(), None).unwrap(), &want);
        let scale = want.abs().unwrap().max_keepdim(2).unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap();
        // (Only the kernels' 8-bit rounding of activations differs; Qwen3's normalised heads
        // give sharper attention, which passes more of it on: 4 % of the logit scale.)
        assert!(d < 0.06 * scale, "{family} Q8_0: {d} from its dequantized weights (logits up to {scale})");
    }
    // What llama.cpp's architectures cannot compute is refused, naming it.
    let windowed = ModelConfig::from_json(
        r#"{"model_type":"mistral","vocab_size":400,"hidden_size":32,"intermediate_size":64,"num_hidden_layers":1,
        "num_attention_heads":4,"num_key_value_heads":2,"max_position_embeddings":64,"sliding_window":8}"#,
        "test",
    )
    .unwrap();
    let m = Model::init(windowed, 1, DType::F32, &Device::Cpu).unwrap();
    let err = write_model(&m, &tok, &tmp("windowed").join("m.gguf"), WriteType::F32).unwrap_err().to_string();
    assert!(err.contains("sliding_window"), "{err}");
}

/// A character-level vocabulary (what `train` builds by default) is written as byte-level BPE
/// without merges: read back, it encodes and decodes text of its characters as the original
/// does; a character of several bytes is refused naming it.
#[test]
fn character_vocabularies_are_written_as_byte_level_bpe() {
    let text = std::fs::read_to_string(repo_data("tinyshakespeare.txt")).unwrap();
    let tok = Tokenizer::from_chars(text.chars()).unwrap();
    let m = model(tok.vocab_size(), true);
    let path = tmp("chars").join("m.gguf");
    write_model(&m, &tok, &path, WriteType::F32).unwrap();
    let back = Pretrained::load(&path, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(back.tokenizer.vocab_size(), tok.vocab_size());
    let sample = &text[..2000];
    let ids = tok.encode(sample, false).unwrap();
    assert_eq!(ids.len(), sample.chars().count());
    assert_eq!(back.tokenizer.encode(sample, false).unwrap(), ids);
    assert_eq!(back.tokenizer.decode(&ids, false).unwrap(), sample);
    let t = Tensor::new(&ids[..12], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let d = max_diff(&m.forward(&t, None).unwrap(), &back.model.forward(&t, None).unwrap());
    assert!(d < 1e-5, "{d}");

    let wide = Tokenizer::from_chars("abc é".chars()).unwrap();
    let err = write_model(&model(wide.vocab_size(), true), &wide, &tmp("chars").join("wide.gguf"), WriteType::F32)
        .unwrap_err()
        .to_string();
    assert!(err.contains("\"é\"") && err.contains("2 bytes"), "{err}");
}

/// A GPT-2 model (lmstack's default architecture) with a character vocabulary is written as
/// llama.cpp's `gpt2` (its `Conv1D` weights transposed, the position table f32) and reads
/// back with the same logits at f32, and with the logits its quantized weights imply at q8_0
/// (kept quantized, `[out, in]`, behind placeholders of the Hugging Face shape).
#[test]
fn gpt2_models_round_trip() {
    let text = std::fs::read_to_string(repo_data("tinyshakespeare.txt")).unwrap();
    let tok = Tokenizer::from_chars(text.chars()).unwrap();
    let cfg = ModelConfig::from_json(
        &format!(
            r#"{{"model_type":"gpt2","vocab_size":{},"n_embd":128,"n_layer":2,"n_head":4,"n_positions":64}}"#,
            tok.vocab_size()
        ),
        "test",
    )
    .unwrap();
    let m = Model::init(cfg, 11, DType::F32, &Device::Cpu).unwrap();
    let ids = tok.encode("ROMEO: wherefore art thou?", false).unwrap();
    let t = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let exact = m.forward(&t, None).unwrap();
    for wt in [WriteType::F32, WriteType::Q8_0] {
        let path = tmp("gpt2").join(format!("m-{wt:?}.gguf"));
        write_model(&m, &tok, &path, wt).unwrap();
        let file = GgufFile::open(&path).unwrap();
        assert_eq!(file.architecture().unwrap(), "gpt2");
        let back = Pretrained::load(&path, DType::F32, &Device::Cpu).unwrap();
        let ModelConfig::Gpt2(c) = back.model.config() else { panic!("{:?}", back.model.config()) };
        assert_eq!((c.n_embd, c.n_layer, c.n_head, c.n_positions, c.inner()), (128, 2, 4, 64, 512));
        assert_eq!(back.tokenizer.encode("ROMEO: wherefore art thou?", false).unwrap(), ids);
        let logits = back.model.forward(&t, None).unwrap();
        if wt == WriteType::F32 {
            let d = max_diff(&logits, &exact);
            assert!(d < 1e-5, "{d}");
        } else {
            let mut q = back.model;
            let quantized = q.linears_mut().iter().filter(|l| l.quantized().is_some()).count();
            assert_eq!(quantized, 9, "4 per layer and the tied head");
            let d = max_diff(&logits, &dequantized_twin(&q).forward(&t, None).unwrap());
            let scale = exact.abs().unwrap().max_keepdim(2).unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 0.05 * scale, "{d} against the dequantized weights (logits up to {scale})");
            assert!(max_diff(&logits, &exact) < 0.5 * scale);
        }
    }
}

#[test]
fn quantized_weights_stay_quantized_and_compute_what_they_imply() {
    let tok = tokenizer();
    let m = model(tok.vocab_size(), true);
    let exact = m.forward(&ids(), None).unwrap();
    for (wt, tol) in [
        (WriteType::F16, 1e-3),
        (WriteType::Q8_0, 0.04),
        (WriteType::Q4_0, 0.04),
        (WriteType::Q4_1, 0.04),
        (WriteType::Q4K, 0.04),
        (WriteType::Q6K, 0.04),
    ] {
        let path = tmp("q").join(format!("m-{wt:?}.gguf"));
        write_model(&m, &tok, &path, wt).unwrap();
        let mut q = Model::load(&path, DType::F32, &Device::Cpu).unwrap();
        let quantized = q.linears_mut().iter().filter(|l| l.quantized().is_some()).count();
        let want = if wt == WriteType::F16 { 0 } else { 15 }; // 7 per layer and the tied head
        assert_eq!(quantized, want, "{wt:?}");
        // f16 matrices are packed as f16 (the repacked logits below stay those of the file).
        let stored = if wt == WriteType::F16 { DType::F16 } else { DType::F32 };
        assert_eq!(q.stored_matrix_dtype(), stored, "{wt:?}");
        let logits = q.forward(&ids(), None).unwrap();
        // Against f32 weights of the same (dequantized) values: only the kernels' rounding of
        // activations (Q8 blocks) differs.
        let twin = dequantized_twin(&q).forward(&ids(), None).unwrap();
        let d = max_diff(&logits, &twin);
        let d0 = max_diff(&logits, &exact);
        let scale = exact.abs().unwrap().max_keepdim(2).unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap();
        eprintln!("{wt:?}: {d} against the dequantized weights, {d0} against the original, logits up to {scale}");
        assert!(d < tol * scale, "{wt:?}: {d} against the dequantized weights");
        // And the quantization itself stays small against the original model.
        assert!(d0 < 0.5 * scale, "{wt:?}: {d0} against the original (logit scale {scale})");
        // The cached path (prefill then decode) gives the whole-sequence logits.
        let all = ids().to_vec2::<u32>().unwrap().remove(0);
        let mut cache = q.new_cache();
        let mut out =
            q.forward_cached(&mut [SeqStep { tokens: &all[..7], cache: &mut cache, all_logits: true }]).unwrap();
        for t in &all[7..] {
            out.extend(
                q.forward_cached(&mut [SeqStep { tokens: &[*t], cache: &mut cache, all_logits: false }]).unwrap(),
            );
        }
        let cached = Tensor::cat(&out, 0).unwrap().unsqueeze(0).unwrap();
        let d = max_diff(&cached, &logits);
        // Quantized products round their activations to 8 bits, which turns the last-bit
        // differences of the two attention paths into an occasional step of 1/127 of a
        // block's largest value: a wrong cache position or mask would be off by the logits'
        // own size. (Q4_1 here: 0.0058 with logits up to 2.65, Q8_0 and Q4_0 below 1e-5.)
        let tol = if wt == WriteType::F16 { 1e-4 } else { 5e-3 * scale };
        eprintln!("{wt:?}: cached against whole {d}");
        assert!(d < tol, "{wt:?}: cached {d} (tolerance {tol})");
        // Repacking for inference leaves quantized layers alone.
        q.repack_for_inference().unwrap();
        let d = max_diff(&q.forward(&ids(), None).unwrap(), &logits);
        assert!(d < 1e-4, "{wt:?}: repacked {d}");
    }
}

#[test]
fn a_gradient_reaches_adapters_below_a_quantized_layer() {
    let tok = tokenizer();
    let m = model(tok.vocab_size(), true);
    let path = tmp("grad").join("m.gguf");
    write_model(&m, &tok, &path, WriteType::Q8_0).unwrap();
    let q = Model::load(&path, DType::F32, &Device::Cpu).unwrap();
    let x = candle_core::Var::from_tensor(&q.forward(&ids(), None).unwrap()).unwrap();
    // A tracked input through a quantized projection: the dequantized path, with a gradient.
    let mut q = q;
    let l = q.linears_mut().into_iter().find(|l| l.quantized().is_some()).unwrap();
    let (inp, _) = l.dims();
    let xs = x.as_tensor().narrow(2, 0, inp).unwrap();
    use candle_core::Module;
    let y = l.forward(&xs).unwrap();
    let twin = xs.broadcast_matmul(&l.weight_values().unwrap().t().unwrap()).unwrap();
    assert!(max_diff(&y, &twin) < 1e-4);
    let g = y.sum_all().unwrap().backward().unwrap();
    let gx = g.get(x.as_tensor()).expect("a gradient reaches the input");
    assert!(gx.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
    // d(sum y)/dx = 1ᵀ W for every row: the quantized op's slices of dequantized rows give
    // the whole weight's product.
    let w = l.weight_values().unwrap();
    let ones = Tensor::ones((1, w.dim(0).unwrap()), DType::F32, &Device::Cpu).unwrap();
    let want = ones.matmul(&w).unwrap().unsqueeze(0).unwrap().broadcast_as(xs.shape()).unwrap();
    assert!(max_diff(&gx.narrow(2, 0, inp).unwrap(), &want.contiguous().unwrap()) < 1e-4);
}

/// With exact products (what training sets), a quantized projection computes the same with a
/// gradient flowing or without: a DPO reference pass (no gradients) equals the policy's pass
/// (gradients) through the same weights. Without, the pass without gradients takes candle's
/// kernels, whose 8-bit activations move the output.
#[test]
fn exact_products_make_passes_with_and_without_gradients_agree() {
    let tok = tokenizer();
    let m = model(tok.vocab_size(), true);
    let path = tmp("exact").join("m.gguf");
    write_model(&m, &tok, &path, WriteType::Q4_1).unwrap();
    let mut q = Model::load(&path, DType::F32, &Device::Cpu).unwrap();
    let x = candle_core::Var::from_tensor(&q.forward(&ids(), None).unwrap()).unwrap();
    use candle_core::Module;
    for exact in [false, true] {
        q.set_exact_products(exact);
        let l = q.linears_mut().into_iter().find(|l| l.quantized().is_some()).unwrap();
        let xs = x.as_tensor().narrow(2, 0, l.dims().0).unwrap();
        let tracked = l.forward(&xs).unwrap();
        let plain = l.forward(&xs.detach()).unwrap();
        let d = max_diff(&tracked, &plain);
        if exact {
            assert!(d < 1e-5, "{d}");
        } else {
            assert!(d > 1e-4, "the 8-bit kernels round activations: {d}");
        }
    }
}

/// A change to a GGUF file's metadata and tensors.
type Edit = Box<dyn FnOnce(&mut Vec<(String, GValue)>, &mut Vec<(String, QTensor)>)>;

/// Rewrites the GGUF at `src` into `dst` with `edit` applied to its metadata and tensors.
fn rewrite(src: &Path, dst: &Path, edit: Edit) {
    let mut f = std::fs::File::open(src).unwrap();
    let c = gguf_file::Content::read(&mut f).unwrap();
    let mut meta: Vec<(String, GValue)> = c.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let mut tensors: Vec<(String, QTensor)> =
        c.tensor_infos.keys().map(|n| (n.clone(), c.tensor(&mut f, n, &Device::Cpu).unwrap())).collect();
    edit(&mut meta, &mut tensors);
    let mut out = std::fs::File::create(dst).unwrap();
    let m: Vec<(&str, &GValue)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut out, &m, &t).unwrap();
}

fn set(meta: &mut Vec<(String, GValue)>, key: &str, v: Option<GValue>) {
    meta.retain(|(k, _)| k != key);
    if let Some(v) = v {
        meta.push((key.into(), v));
    }
}

#[test]
fn bad_gguf_files_are_refused_naming_what() {
    let tok = tokenizer();
    let m = model(tok.vocab_size(), true);
    let d = tmp("bad");
    let good = d.join("good.gguf");
    write_model(&m, &tok, &good, WriteType::Q8_0).unwrap();
    let load = |p: &Path| Pretrained::load(p, DType::F32, &Device::Cpu).map(|_| ()).unwrap_err().to_string();

    let bytes = std::fs::read(&good).unwrap();
    let cut = d.join("truncated.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = load(&cut);
    assert!(e.contains("truncated.gguf") && e.contains("tensor"), "{e}");
    std::fs::write(&cut, &bytes[..100]).unwrap();
    let e = load(&cut);
    assert!(e.contains("truncated.gguf") && e.contains("GGUF"), "{e}");

    let cases: Vec<(&str, Edit)> = vec![
        ("general.architecture", Box::new(|m, _| set(m, "general.architecture", Some(GValue::String("mamba".into()))))),
        ("llama.block_count", Box::new(|m, _| set(m, "llama.block_count", None))),
        (
            "llama.embedding_length",
            Box::new(|m, _| set(m, "llama.embedding_length", Some(GValue::String("wide".into())))),
        ),
        (
            "llama.rope.scaling.type",
            Box::new(|m, _| set(m, "llama.rope.scaling.type", Some(GValue::String("yarn".into())))),
        ),
        ("llama.expert_count", Box::new(|m, _| set(m, "llama.expert_count", Some(GValue::U32(8))))),
        ("tokenizer.ggml.model", Box::new(|m, _| set(m, "tokenizer.ggml.model", Some(GValue::String("t5".into()))))),
        ("tokenizer.ggml.pre", Box::new(|m, _| set(m, "tokenizer.ggml.pre", Some(GValue::String("chameleon".into()))))),
        ("tokenizer.ggml.tokens", Box::new(|m, _| set(m, "tokenizer.ggml.tokens", None))),
        (
            "tokenizer.ggml.eos_token_id",
            Box::new(|m, _| set(m, "tokenizer.ggml.eos_token_id", Some(GValue::U32(99_999)))),
        ),
        (
            "blk.0.attn_q.weight",
            Box::new(|_, t| {
                let q = t.iter().position(|(n, _)| n == "blk.0.attn_q.weight").unwrap();
                let small = QTensor::quantize(
                    &Tensor::zeros((32, 256), DType::F32, &Device::Cpu).unwrap(),
                    candle_core::quantized::GgmlDType::Q8_0,
                )
                .unwrap();
                t[q].1 = small;
            }),
        ),
        (
            "blk.0.ssm_conv1d.weight",
            Box::new(|_, t| {
                let extra = QTensor::quantize(
                    &Tensor::zeros(32, DType::F32, &Device::Cpu).unwrap(),
                    candle_core::quantized::GgmlDType::F32,
                )
                .unwrap();
                t.push(("blk.0.ssm_conv1d.weight".into(), extra));
            }),
        ),
        ("blk.1.ffn_down.weight", Box::new(|_, t| t.retain(|(n, _)| n != "blk.1.ffn_down.weight"))),
    ];
    for (i, (what, edit)) in cases.into_iter().enumerate() {
        let p = d.join(format!("case{i}.gguf"));
        rewrite(&good, &p, edit);
        let e = load(&p);
        assert!(e.contains(what), "case {what}: {e}");
        assert!(e.contains(&format!("case{i}.gguf")) || what.starts_with("tokenizer"), "case {what}: {e}");
    }
}

#[test]
fn sentencepiece_vocabularies_encode_with_merges_from_scores_and_byte_fallback() {
    // A SentencePiece vocabulary: control tokens, the 256 byte tokens, then pieces with scores.
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types: Vec<i32> = vec![2, 3, 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
    }
    let pieces = [
        "▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "el", "lo", "▁hel", "▁hello", "ll", "▁w", "or", "▁wor", "ld",
        "▁world",
    ];
    let mut scores: Vec<f32> = vec![0.0; tokens.len()];
    for (i, p) in pieces.iter().enumerate() {
        tokens.push((*p).into());
        types.push(1);
        scores.push(-(i as f32));
    }
    let tok = GValue::Array(tokens.iter().map(|t| GValue::String(t.clone())).collect());
    let meta: Vec<(&str, GValue)> = vec![
        ("general.architecture", GValue::String("llama".into())),
        ("llama.context_length", GValue::U32(64)),
        ("tokenizer.ggml.model", GValue::String("llama".into())),
        ("tokenizer.ggml.tokens", tok),
        ("tokenizer.ggml.scores", GValue::Array(scores.iter().map(|&s| GValue::F32(s)).collect())),
        ("tokenizer.ggml.token_type", GValue::Array(types.iter().map(|&t| GValue::I32(t)).collect())),
        ("tokenizer.ggml.bos_token_id", GValue::U32(1)),
        ("tokenizer.ggml.eos_token_id", GValue::U32(2)),
        ("tokenizer.ggml.unknown_token_id", GValue::U32(0)),
    ];
    let p = tmp("spm").join("spm.gguf");
    let m: Vec<(&str, &GValue)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    gguf_file::write(&mut std::fs::File::create(&p).unwrap(), &m, &[]).unwrap();
    let t = GgufFile::open(&p).unwrap().tokenizer().unwrap();
    let id = |s: &str| t.token_to_id(s).unwrap();
    // `<s>` first (add_bos defaults to true for SentencePiece), "▁hello" and "▁world" whole.
    assert_eq!(t.encode("hello world", true).unwrap(), vec![1, id("▁hello"), id("▁world")]);
    // Characters outside the vocabulary fall back to their UTF-8 bytes, and decode back.
    let enc = t.encode("hello wé", false).unwrap();
    assert_eq!(enc, vec![id("▁hello"), id("▁w"), id("<0xC3>"), id("<0xA9>")]);
    assert_eq!(t.decode(&enc, false).unwrap(), "hello wé");
    assert_eq!(t.decode(&t.encode("hello world", true).unwrap(), true).unwrap(), "hello world");
}

/// The real SmolLM2-135M-Instruct Q4_1 file (`cargo xtask fetch-model smollm2`), where
/// `LMSTACK_SMOLLM2_GGUF` names it; skipped (saying so) elsewhere.
#[test]
fn smollm2_q4_1_answers_a_chat() {
    let Some(path) = std::env::var_os("LMSTACK_SMOLLM2_GGUF").filter(|v| !v.is_empty()).map(PathBuf::from) else {
        eprintln!("skipped: LMSTACK_SMOLLM2_GGUF is not set (cargo xtask fetch-model smollm2)");
        return;
    };
    let p = Pretrained::load(&path, DType::F32, &Device::Cpu).unwrap();
    let ModelConfig::Llama(c) = p.model.config() else { panic!() };
    assert_eq!((c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.kv_heads()), (30, 576, 9, 3));
    assert_eq!((c.vocab_size, c.max_position_embeddings, c.rope_theta()), (49152, 8192, 100000.0));
    assert_eq!(p.tokenizer.eos_id(), Some(2));
    // SmolLM's pre-tokenizer splits digits one by one.
    let ids = p.tokenizer.encode("In 2024", false).unwrap();
    assert_eq!(ids.len(), 6, "{ids:?}");
    let msgs = serde_json::json!([{"role": "user", "content": "What is the capital of France?"}]);
    let templated = p.tokenizer.apply_chat_template(&msgs, true).unwrap();
    assert!(templated.starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"), "{templated}");
    // Greedy, the answer llama.cpp (build 0c1e570, llama-simple) gives on the same file.
    let prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    let start = p.tokenizer.encode(prompt, false).unwrap();
    let mut ids = Vec::new();
    let mut cache = p.model.new_cache();
    let mut next = start.clone();
    let mut ended = false;
    for _ in 0..16 {
        let logits =
            p.model.forward_cached(&mut [SeqStep { tokens: &next, cache: &mut cache, all_logits: false }]).unwrap();
        let t = logits[0].argmax(1).unwrap().to_vec1::<u32>().unwrap()[0];
        if Some(t) == p.tokenizer.eos_id() {
            ended = true;
            break;
        }
        ids.push(t);
        next = vec![t];
    }
    let answer = p.tokenizer.decode(&ids, true).unwrap();
    assert_eq!(answer, "The capital of France is Paris.");
    assert!(ended, "no <|im_end|> after the answer");
}
