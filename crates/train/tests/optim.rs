//! AdamW and the schedule against hand-computed reference values (torch.optim.AdamW's update),
//! and self-supervised batch construction.

use std::collections::{BTreeMap, HashMap};

use candle_core::{Device, Tensor, Var};
use lmstack_core::kernels::ops::IGNORE_INDEX;
use lmstack_train::batches::{sample_batch, SelfSupervised};
use lmstack_train::optim::{lr_at, no_decay, AdamW, AdamWConfig};
use rand::SeedableRng;

#[test]
fn adamw_matches_the_reference_update() {
    let w = Var::from_vec(vec![1.0f32, -2.0], (1, 2), &Device::Cpu).unwrap();
    let b = Var::from_vec(vec![0.5f32], 1, &Device::Cpu).unwrap();
    let vars = BTreeMap::from([("layer.weight".to_string(), w.clone()), ("layer.bias".to_string(), b.clone())]);
    let cfg = AdamWConfig { beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.1 };
    let mut opt = AdamW::new(vars, cfg);
    // Reference: torch.optim.AdamW, two steps, gradients g1 then g2, lr 0.01.
    let (g1, g2) = ([0.5f64, -1.0], [0.25f64, 0.5]);
    let mut p = [1.0f64, -2.0];
    let (mut m, mut v) = ([0.0f64; 2], [0.0f64; 2]);
    for (t, g) in [g1, g2].iter().enumerate() {
        let t = t as i32 + 1;
        for i in 0..2 {
            p[i] *= 1.0 - 0.01 * 0.1;
            m[i] = 0.9 * m[i] + 0.1 * g[i];
            v[i] = 0.99 * v[i] + 0.01 * g[i] * g[i];
            let mh = m[i] / (1.0 - 0.9f64.powi(t));
            let vh = v[i] / (1.0 - 0.99f64.powi(t));
            p[i] -= 0.01 * mh / (vh.sqrt() + 1e-8);
        }
        let grads = HashMap::from([
            ("layer.weight".to_string(), g.iter().map(|&x| x as f32).collect::<Vec<_>>()),
            ("layer.bias".to_string(), vec![1.0f32]),
        ]);
        opt.step(&grads, 0.01).unwrap();
    }
    let got = w.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for i in 0..2 {
        assert!((got[i] as f64 - p[i]).abs() < 1e-6, "{got:?} vs {p:?}");
    }
    // The bias is not decayed: two Adam steps of size lr with a constant gradient.
    let bias = b.as_tensor().to_vec1::<f32>().unwrap()[0];
    assert!((bias - (0.5 - 0.02)).abs() < 1e-5, "{bias}");
    // State round-trips.
    let state: HashMap<String, Tensor> = opt.state_tensors().unwrap().into_iter().collect();
    let mut again =
        AdamW::new(BTreeMap::from([("layer.weight".to_string(), w.clone()), ("layer.bias".to_string(), b)]), cfg);
    again.load_state(&state, 2, "opt").unwrap();
    assert_eq!(again.state_tensors().unwrap().len(), 4);
    assert!(again.load_state(&HashMap::new(), 2, "opt.safetensors").unwrap_err().to_string().contains("exp_avg"));
}

#[test]
fn decay_groups_follow_names() {
    assert!(!no_decay("transformer.h.0.attn.c_attn.weight", 2));
    assert!(!no_decay("model.layers.0.mlp.up_proj.weight", 2));
    for n in [
        "transformer.wte.weight",
        "transformer.wpe.weight",
        "model.embed_tokens.weight",
        "transformer.h.0.ln_1.weight",
        "model.norm.weight",
        "bert.embeddings.LayerNorm.weight",
    ] {
        assert!(no_decay(n, 2), "{n}");
    }
    assert!(no_decay("transformer.h.0.attn.c_attn.bias", 1));
}

#[test]
fn schedule_warms_up_then_follows_a_cosine() {
    assert!((lr_at(0, 1e-3, 1e-4, 100, 2000) - 1e-3 / 101.0).abs() < 1e-12);
    assert!((lr_at(99, 1e-3, 1e-4, 100, 2000) - 1e-3 * 100.0 / 101.0).abs() < 1e-12);
    assert!((lr_at(100, 1e-3, 1e-4, 100, 2000) - 1e-3).abs() < 1e-12);
    assert!((lr_at(1050, 1e-3, 1e-4, 100, 2000) - 5.5e-4).abs() < 1e-9);
    assert_eq!(lr_at(2000, 1e-3, 1e-4, 100, 2000), 1e-4);
    assert_eq!(lr_at(5000, 1e-3, 1e-4, 100, 2000), 1e-4);
}

#[test]
fn causal_labels_are_the_next_tokens() {
    let data: Vec<u32> = (0..100).collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let b = sample_batch(&data, 4, 8, SelfSupervised::Causal, &mut rng, &Device::Cpu).unwrap();
    let x = b.inputs.to_vec2::<u32>().unwrap();
    let y = b.labels.to_vec2::<u32>().unwrap();
    for (xr, yr) in x.iter().zip(&y) {
        for i in 0..8 {
            assert_eq!(yr[i], xr[i] + 1);
        }
    }
}

#[test]
fn masked_lm_masks_fifteen_percent_eighty_ten_ten() {
    let data: Vec<u32> = (0..20_000).map(|i| (i % 50) as u32).collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
    let obj = SelfSupervised::Masked { mask_id: 99, vocab_size: 100, prob: 0.15 };
    let b = sample_batch(&data, 64, 128, obj, &mut rng, &Device::Cpu).unwrap();
    let x = b.inputs.flatten_all().unwrap().to_vec1::<u32>().unwrap();
    let y = b.labels.flatten_all().unwrap().to_vec1::<u32>().unwrap();
    let chosen: Vec<usize> = (0..y.len()).filter(|&i| y[i] != IGNORE_INDEX).collect();
    let frac = chosen.len() as f64 / y.len() as f64;
    assert!((frac - 0.15).abs() < 0.01, "chosen {frac}");
    let masked = chosen.iter().filter(|&&i| x[i] == 99).count() as f64 / chosen.len() as f64;
    let kept = chosen.iter().filter(|&&i| x[i] == y[i]).count() as f64 / chosen.len() as f64;
    assert!((masked - 0.8).abs() < 0.03, "masked {masked}");
    assert!((kept - 0.1).abs() < 0.03 + 0.01, "kept {kept}");
    // Unchosen positions keep their token and have no label.
    assert!((0..y.len()).filter(|i| y[*i] == IGNORE_INDEX).all(|i| x[i] < 50));
}

#[test]
fn clipping_and_scaled_accumulation() {
    use lmstack_train::optim::{accumulate, clip_grad_norm};
    let mut g = HashMap::from([("a".to_string(), vec![3.0f32, 0.0]), ("b".to_string(), vec![4.0f32])]);
    assert_eq!(clip_grad_norm(&mut g, 10.0), 5.0);
    assert_eq!(g["a"], vec![3.0, 0.0], "below the limit nothing changes");
    assert_eq!(clip_grad_norm(&mut g, 1.0), 5.0);
    assert!((g["a"][0] - 0.6).abs() < 1e-5 && (g["b"][0] - 0.8).abs() < 1e-5);
    let mut acc = HashMap::new();
    accumulate(&mut acc, HashMap::from([("a".to_string(), vec![2.0f32])]), 0.25);
    accumulate(&mut acc, HashMap::from([("a".to_string(), vec![4.0f32])]), 0.75);
    assert_eq!(acc["a"], vec![3.5]);
}

#[test]
fn adamw_update_is_the_same_in_the_portable_and_avx2_builds() {
    // The update loop is compiled twice (lmstack_core::kernels::simd): both builds must give the same
    // bits, or a seed would train differently on different CPUs.
    let n = 1003; // not a multiple of the vector width
    let run = |wide: bool| {
        lmstack_core::kernels::simd::set_enabled(wide);
        let init: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
        let w = Var::from_vec(init, (n,), &Device::Cpu).unwrap();
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.1 };
        let mut opt = AdamW::new(BTreeMap::from([("h.weight".to_string(), w.clone())]), cfg);
        for step in 0..3 {
            let g: Vec<f32> = (0..n).map(|i| (((i * 13 + step * 7) % 29) as f32 - 14.0) * 1e-3).collect();
            opt.step(&HashMap::from([("h.weight".to_string(), g)]), 1e-3).unwrap();
        }
        let bits = |t: &Tensor| t.to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect::<Vec<_>>();
        let state = opt.state_tensors().unwrap();
        (bits(w.as_tensor()), bits(&state["exp_avg.h.weight"]), bits(&state["exp_avg_sq.h.weight"]))
    };
    let portable = run(false);
    let wide = run(true);
    lmstack_core::kernels::simd::set_enabled(true);
    assert_eq!(portable, wide);
}
