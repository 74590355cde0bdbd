//! The fused training kernels (`lmstack_core::kernels::ops`) give the same values and gradients as the
//! differentiable compositions of candle primitives, on whole models and op by op.

use candle_core::{DType, Device, Tensor, Var, D};
use lmstack_core::kernels::ops::{self, cross_entropy, IGNORE_INDEX};
use lmstack_core::kernels::simd;
use lmstack_core::{Model, ModelConfig};

/// Serialises the tests of this file: one of them switches the process-wide kernel toggle.
static TOGGLE: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Loss and gradients of every parameter, with the fused kernels on or off.
fn run(cfg: &str, fused: bool) -> (f64, Vec<(String, Vec<f64>)>) {
    ops::set_enabled(fused);
    let m = Model::init(ModelConfig::from_json(cfg, "t").unwrap(), 5, DType::F64, &Device::Cpu).unwrap();
    let ids =
        Tensor::from_vec((0..30u32).map(|i| (i * 7 + 1) % 29).collect::<Vec<_>>(), (3, 10), &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1u32; 10], [1; 10], [1, 1, 1, 1, 1, 1, 1, 0, 0, 0]], &Device::Cpu).unwrap();
    let logits = m.forward(&ids, Some(&mask)).unwrap();
    let mut targets: Vec<u32> = ids.flatten_all().unwrap().to_vec1().unwrap();
    targets[3] = IGNORE_INDEX;
    // Padded queries (row 2 from 7 on) are not scored: what they attend to is unspecified (a
    // sliding window can leave them no key at all).
    targets[27..].fill(IGNORE_INDEX);
    let targets = Tensor::new(targets, &Device::Cpu).unwrap();
    let (loss, n) = cross_entropy(&logits.reshape((30, 29)).unwrap(), &targets).unwrap();
    assert_eq!(n, 26);
    let grads = loss.backward().unwrap();
    let g = m
        .params()
        .vars()
        .into_iter()
        .map(|(k, v)| (k, grads.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap()))
        .collect();
    ops::set_enabled(true);
    (loss.to_scalar::<f64>().unwrap(), g)
}

#[test]
fn fused_and_composed_training_agree() {
    let _guard = TOGGLE.lock().unwrap_or_else(|p| p.into_inner());
    for cfg in [
        r#"{"model_type":"gpt2","vocab_size":29,"n_positions":16,"n_embd":12,"n_layer":2,"n_head":3}"#,
        r#"{"model_type":"llama","vocab_size":29,"hidden_size":16,"intermediate_size":24,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"max_position_embeddings":16}"#,
        r#"{"model_type":"mistral","vocab_size":29,"hidden_size":16,"intermediate_size":24,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"max_position_embeddings":16,"sliding_window":3}"#,
        r#"{"model_type":"qwen3","vocab_size":29,"hidden_size":16,"intermediate_size":24,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":1,"head_dim":6,"max_position_embeddings":16,"use_sliding_window":true,"sliding_window":4,"max_window_layers":1}"#,
        r#"{"model_type":"gemma2","vocab_size":29,"hidden_size":16,"intermediate_size":24,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":6,"max_position_embeddings":16,"sliding_window":3,"query_pre_attn_scalar":8,"attn_logit_softcapping":0.5,"final_logit_softcapping":2.0,"initializer_range":0.5}"#,
        r#"{"model_type":"phi3","vocab_size":29,"hidden_size":16,"intermediate_size":24,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"max_position_embeddings":16,"sliding_window":4,"partial_rotary_factor":0.5}"#,
        r#"{"model_type":"gemma3_text","vocab_size":29,"hidden_size":16,"intermediate_size":24,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":1,"head_dim":8,"max_position_embeddings":16,"sliding_window":3,"sliding_window_pattern":2}"#,
        r#"{"model_type":"bert","vocab_size":29,"hidden_size":12,"num_hidden_layers":2,"num_attention_heads":3,"intermediate_size":20,"max_position_embeddings":16}"#,
    ] {
        let (l1, g1) = run(cfg, true);
        let (l2, g2) = run(cfg, false);
        assert!((l1 - l2).abs() < 1e-10, "{cfg}: loss {l1} vs {l2}");
        for ((name, a), (_, b)) in g1.iter().zip(&g2) {
            let d = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
            assert!(d < 1e-7, "{cfg}: gradient of {name} differs by {d}");
        }
    }
}

/// Finite differences on each kernel directly, in f64.
#[test]
fn kernels_match_finite_differences() {
    let _guard = TOGGLE.lock().unwrap_or_else(|p| p.into_inner());
    let dev = Device::Cpu;
    let x0: Vec<f64> = (0..24).map(|i| ((i * 37 % 17) as f64 - 8.0) / 5.0).collect();
    let w0: Vec<f64> = (0..6).map(|i| 0.5 + i as f64 / 7.0).collect();
    let b0: Vec<f64> = (0..6).map(|i| i as f64 / 11.0 - 0.2).collect();
    let probe: Vec<f64> = (0..24).map(|i| ((i * 13 % 7) as f64 - 3.0) / 3.0).collect();
    let probe = Tensor::from_vec(probe, (4, 6), &dev).unwrap();
    type F = Box<dyn Fn(&Tensor, &Tensor, &Tensor) -> Tensor>;
    let cases: Vec<(&str, F)> = vec![
        ("layer_norm", Box::new(|x, w, b| x.apply_op3(w, b, ops::LayerNormOp { eps: 1e-5 }).unwrap())),
        ("rms_norm", Box::new(|x, w, _| x.apply_op2(w, ops::RmsNormOp { eps: 1e-6 }).unwrap())),
        ("softmax", Box::new(|x, _, _| x.apply_op1(ops::Softmax).unwrap())),
        ("gelu_tanh", Box::new(|x, _, _| x.apply_op1(ops::Act(ops::ActKind::GeluTanh)).unwrap())),
        ("gelu_erf", Box::new(|x, _, _| x.apply_op1(ops::Act(ops::ActKind::GeluErf)).unwrap())),
        ("silu", Box::new(|x, _, _| x.apply_op1(ops::Act(ops::ActKind::Silu)).unwrap())),
    ];
    for (name, f) in cases {
        let x = Var::from_vec(x0.clone(), (4, 6), &dev).unwrap();
        let w = Var::from_vec(w0.clone(), 6, &dev).unwrap();
        let b = Var::from_vec(b0.clone(), 6, &dev).unwrap();
        let scalar = |x: &Tensor, w: &Tensor, b: &Tensor| (f(x, w, b) * &probe).unwrap().sum_all().unwrap();
        let grads = scalar(&x, &w, &b).backward().unwrap();
        for (pname, var, base) in [("x", &x, &x0), ("w", &w, &w0), ("b", &b, &b0)] {
            let Some(g) = grads.get(var.as_tensor()) else { continue };
            let g = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            for i in 0..base.len() {
                let eps = 1e-6;
                let at = |d: f64| {
                    let mut v = base.clone();
                    v[i] += d;
                    let t = Tensor::from_vec(v, var.shape(), &dev).unwrap();
                    let (xx, ww, bb) = match pname {
                        "x" => (t, w.as_tensor().clone(), b.as_tensor().clone()),
                        "w" => (x.as_tensor().clone(), t, b.as_tensor().clone()),
                        _ => (x.as_tensor().clone(), w.as_tensor().clone(), t),
                    };
                    scalar(&xx, &ww, &bb).to_scalar::<f64>().unwrap()
                };
                let fd = (at(eps) - at(-eps)) / (2.0 * eps);
                assert!((fd - g[i]).abs() < 1e-6, "{name}: d/d{pname}[{i}] analytic {} vs numeric {fd}", g[i]);
            }
        }
    }
    // Cross-entropy: value equals candle's, gradient equals softmax − one-hot.
    let logits = Var::from_vec(x0.clone(), (4, 6), &dev).unwrap();
    let targets = Tensor::new(&[2u32, IGNORE_INDEX, 5, 0], &dev).unwrap();
    let (loss, n) = cross_entropy(logits.as_tensor(), &targets).unwrap();
    assert_eq!(n, 3);
    let keep = Tensor::new(&[0u32, 2, 3], &dev).unwrap();
    let want = candle_nn::loss::cross_entropy(
        &logits.as_tensor().index_select(&keep, 0).unwrap(),
        &Tensor::new(&[2u32, 5, 0], &dev).unwrap(),
    )
    .unwrap();
    assert!((loss.to_scalar::<f64>().unwrap() - want.to_scalar::<f64>().unwrap()).abs() < 1e-12);
    let g = loss.backward().unwrap().get(logits.as_tensor()).unwrap().to_vec2::<f64>().unwrap();
    assert!(g[1].iter().all(|&v| v == 0.0), "ignored row got a gradient");
    let p = candle_nn::ops::softmax(logits.as_tensor(), D::Minus1).unwrap().to_vec2::<f64>().unwrap();
    assert!((g[0][2] - (p[0][2] - 1.0) / 3.0).abs() < 1e-12);
    assert!((g[0][1] - p[0][1] / 3.0).abs() < 1e-12);
    let bad = Tensor::new(&[9u32, 0, 0, 0], &dev).unwrap();
    assert!(cross_entropy(logits.as_tensor(), &bad).is_err());
    let _ = DType::F32;
}

/// The f32 tanh approximation GELU uses stays within 1e-6 of the exact value.
#[test]
fn fast_tanh_is_accurate() {
    let mut worst = 0f64;
    for i in -200_000..=200_000 {
        let x = i as f32 * 1e-4;
        let d = (ops::tanh_f32(x) as f64 - (x as f64).tanh()).abs();
        worst = worst.max(d);
    }
    for x in [-1e4f32, -50.0, 50.0, 1e4] {
        worst = worst.max((ops::tanh_f32(x) as f64 - (x as f64).tanh()).abs());
    }
    assert!(worst < 1e-6, "max error {worst}");
}

/// The f32 exp approximation attention uses stays within 2e-7 relative of the exact value.
#[test]
fn fast_exp_is_accurate() {
    let mut worst = 0f64;
    for i in -870_000..=0 {
        let x = i as f32 * 1e-4;
        let exact = (x as f64).exp();
        worst = worst.max((simd::exp_f32(x) as f64 - exact).abs() / exact);
    }
    assert!(worst < 2e-7, "max relative error {worst}");
    assert!(simd::exp_f32(f32::NEG_INFINITY) < 1e-37 && simd::exp_f32(0.0) == 1.0);
}

/// Sequences packed into rows with segments (padding-free batches) give the loss and the
/// gradients of the same sequences run one by one, fused kernels and composed masks alike,
/// a row's unused tail included.
#[test]
fn packed_sequences_train_as_separate_ones() {
    use lmstack_core::nn::Segments;
    let _guard = TOGGLE.lock().unwrap_or_else(|p| p.into_inner());
    let dev = Device::Cpu;
    let seqs: Vec<Vec<u32>> = [5usize, 8, 6]
        .iter()
        .enumerate()
        .map(|(s, &n)| (0..n as u32).map(|i| (i * 5 + s as u32 * 3 + 1) % 29).collect())
        .collect();
    // One sequence's inputs and next-token labels.
    let pair = |s: &[u32]| (s[..s.len() - 1].to_vec(), s[1..].to_vec());
    for cfg in [
        r#"{"model_type":"gpt2","vocab_size":29,"n_positions":16,"n_embd":12,"n_layer":2,"n_head":3}"#,
        r#"{"model_type":"llama","vocab_size":29,"hidden_size":16,"intermediate_size":24,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"max_position_embeddings":16}"#,
        r#"{"model_type":"mistral","vocab_size":29,"hidden_size":16,"intermediate_size":24,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"max_position_embeddings":16,"sliding_window":3}"#,
        r#"{"model_type":"qwen3","vocab_size":29,"hidden_size":16,"intermediate_size":24,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":1,"head_dim":6,"max_position_embeddings":16,"use_sliding_window":true,"sliding_window":4,"max_window_layers":1}"#,
        r#"{"model_type":"gemma2","vocab_size":29,"hidden_size":16,"intermediate_size":24,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":6,"max_position_embeddings":16,"sliding_window":3,"query_pre_attn_scalar":8,"attn_logit_softcapping":0.5,"final_logit_softcapping":2.0,"initializer_range":0.5}"#,
        r#"{"model_type":"phi3","vocab_size":29,"hidden_size":16,"intermediate_size":24,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"max_position_embeddings":16,"sliding_window":4,"partial_rotary_factor":0.5}"#,
        r#"{"model_type":"gemma3_text","vocab_size":29,"hidden_size":16,"intermediate_size":24,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":1,"head_dim":8,"max_position_embeddings":16,"sliding_window":3,"sliding_window_pattern":2}"#,
    ] {
        for fused in [true, false] {
            ops::set_enabled(fused);
            let m = Model::init(ModelConfig::from_json(cfg, "t").unwrap(), 5, DType::F64, &dev).unwrap();
            let vars = m.params().vars();
            let grads_of = |loss: &Tensor| -> Vec<Vec<f64>> {
                let g = loss.backward().unwrap();
                vars.values().map(|v| g.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap()).collect()
            };
            // One by one: the sum of the per-token losses and of their gradients.
            let mut total = 0.0;
            let mut sum: Vec<Vec<f64>> = Vec::new();
            for s in &seqs {
                let (x, y) = pair(s);
                let n = x.len();
                let (loss, k) = m
                    .lm_loss(
                        &Tensor::from_vec(x, (1, n), &dev).unwrap(),
                        &Tensor::from_vec(y, (1, n), &dev).unwrap(),
                        None,
                    )
                    .unwrap();
                let scaled = (loss * k as f64).unwrap();
                total += scaled.to_scalar::<f64>().unwrap();
                let g = grads_of(&scaled);
                if sum.is_empty() {
                    sum = g;
                } else {
                    sum.iter_mut().zip(g).for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += b));
                }
            }
            // Packed: rows [seq 0, seq 1] and [seq 2, 6 padding tokens].
            let (x0, y0) = pair(&seqs[0]);
            let (x1, y1) = pair(&seqs[1]);
            let (x2, y2) = pair(&seqs[2]);
            let t = x0.len() + x1.len();
            let mut xs = [x0.clone(), x1.clone(), x2.clone()].concat();
            let mut ys = [y0, y1, y2].concat();
            xs.extend(std::iter::repeat_n(0, t - x2.len()));
            ys.extend(std::iter::repeat_n(IGNORE_INDEX, t - x2.len()));
            let segs = Segments::new(vec![(0, 0, x0.len()), (0, x0.len(), x1.len()), (1, 0, x2.len())], 2, t).unwrap();
            let (loss, k) = m
                .lm_loss(
                    &Tensor::from_vec(xs, (2, t), &dev).unwrap(),
                    &Tensor::from_vec(ys, (2, t), &dev).unwrap(),
                    Some(&segs),
                )
                .unwrap();
            let scaled = (loss * k as f64).unwrap();
            let packed = scaled.to_scalar::<f64>().unwrap();
            assert!((packed - total).abs() < 1e-9, "{cfg} fused {fused}: loss {packed} vs {total}");
            for ((name, a), b) in vars.keys().zip(grads_of(&scaled)).zip(&sum) {
                let d = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
                assert!(d < 1e-9, "{cfg} fused {fused}: gradient of {name} differs by {d}");
            }
        }
        ops::set_enabled(true);
    }
    // Bad spans are refused naming them.
    let err = Segments::new(vec![(0, 0, 4), (0, 3, 2)], 1, 8).unwrap_err().to_string();
    assert!(err.contains("overlaps"), "{err}");
    let err = Segments::new(vec![(1, 0, 4)], 1, 8).unwrap_err().to_string();
    assert!(err.contains("outside"), "{err}");
}

/// `Model::sequence_logps` is each row's sum of its scored tokens' log-probabilities, as the
/// full logits give them; under gradient checkpointing (chunks that cut across rows) its
/// values and gradients are the same.
#[test]
fn sequence_logps_sum_each_rows_scored_tokens() {
    let _guard = TOGGLE.lock().unwrap_or_else(|p| p.into_inner());
    let dev = Device::Cpu;
    for cfg in [
        r#"{"model_type":"gpt2","vocab_size":29,"n_positions":16,"n_embd":12,"n_layer":2,"n_head":3}"#,
        r#"{"model_type":"qwen2","vocab_size":29,"hidden_size":16,"intermediate_size":24,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"max_position_embeddings":16}"#,
    ] {
        let mut m = Model::init(ModelConfig::from_json(cfg, "t").unwrap(), 3, DType::F64, &dev).unwrap();
        let ids: Vec<u32> = (0..30u32).map(|i| (i * 11 + 2) % 29).collect();
        let mut labels: Vec<u32> = ids.iter().map(|i| (i * 3 + 1) % 29).collect();
        // Row 0 scores its last 4, row 1 nothing, row 2 positions 2..7 but 4.
        labels[..6].fill(IGNORE_INDEX);
        labels[10..20].fill(IGNORE_INDEX);
        labels[20..22].fill(IGNORE_INDEX);
        labels[24] = IGNORE_INDEX;
        labels[27..].fill(IGNORE_INDEX);
        let x = Tensor::from_vec(ids, (3, 10), &dev).unwrap();
        let y = Tensor::from_vec(labels.clone(), (3, 10), &dev).unwrap();
        let lsm = candle_nn::ops::log_softmax(&m.forward(&x, None).unwrap(), D::Minus1).unwrap();
        let lsm: Vec<Vec<Vec<f64>>> = lsm.to_vec3().unwrap();
        let mut want = [0.0f64; 3];
        for (p, &l) in labels.iter().enumerate().filter(|(_, &l)| l != IGNORE_INDEX) {
            want[p / 10] += lsm[p / 10][p % 10][l as usize];
        }
        let vars = m.params().vars();
        let run = |m: &Model| {
            let (s, counts) = m.sequence_logps(&x, &y, None).unwrap();
            assert_eq!(counts, [4, 0, 4]);
            // A weighted sum, so each row's gradient counts differently.
            let loss = (&s * Tensor::new(&[1.0f64, 2.0, -0.5], &dev).unwrap()).unwrap().sum_all().unwrap();
            let g =
                lmstack_core::grad::backward(&loss, &vars.values().map(|v| v.as_tensor().clone()).collect::<Vec<_>>())
                    .unwrap();
            let grads: Vec<Vec<f64>> = vars
                .values()
                .map(|v| g.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap())
                .collect();
            (s.to_vec1::<f64>().unwrap(), grads)
        };
        let (plain, g_plain) = run(&m);
        for (a, b) in plain.iter().zip(want) {
            assert!((a - b).abs() < 1e-9, "{cfg}: {plain:?} vs {want:?}");
        }
        assert!(g_plain.iter().all(|g| g.iter().any(|x| *x != 0.0)), "{cfg}: a parameter got no gradient");
        m.set_gradient_checkpointing(true).unwrap();
        m.set_loss_chunk_rows(Some(3));
        let (ckpt, g_ckpt) = run(&m);
        for (a, b) in ckpt.iter().zip(&plain) {
            assert!((a - b).abs() < 1e-9, "{cfg}: checkpointed {ckpt:?} vs {plain:?}");
        }
        for (a, b) in g_ckpt.iter().zip(&g_plain) {
            let d = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
            assert!(d < 1e-9, "{cfg}: checkpointed gradient differs by {d}");
        }
        // Padding-free: the three rows packed end to end in one, each attending only within
        // itself with positions from 0, give the same sums per segment.
        let packed_x = x.flatten_all().unwrap().unsqueeze(0).unwrap();
        let packed_y = y.flatten_all().unwrap().unsqueeze(0).unwrap();
        let segs = lmstack_core::nn::Segments::new(vec![(0, 0, 10), (0, 10, 10), (0, 20, 10)], 1, 30).unwrap();
        let (s, counts) = m.sequence_logps(&packed_x, &packed_y, Some(&segs)).unwrap();
        assert_eq!(counts, [4, 0, 4]);
        for (a, b) in s.to_vec1::<f64>().unwrap().iter().zip(&plain) {
            assert!((a - b).abs() < 1e-9, "{cfg}: packed {a} vs padded {b}");
        }
        // A scored position outside every segment is refused.
        let part = lmstack_core::nn::Segments::new(vec![(0, 0, 10)], 1, 30).unwrap();
        assert!(m.sequence_logps(&packed_x, &packed_y, Some(&part)).is_err());
    }
}
