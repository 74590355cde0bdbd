//! PEFT LoRA adapter directories: saved and loaded in PEFT's layout, an untrained adapter
//! (B = 0) changes nothing, a trained one matches the same matrices attached by hand, and
//! malformed adapters are refused naming the tensor.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::{fixture, max_diff};
use lmstack_core::lora::{self, Lora, LoraConfig, TargetModules};
use lmstack_core::{DType, Device, Model, Tensor};

fn ids() -> Tensor {
    Tensor::new(&[[1u32, 5, 9, 3, 7, 2]], &Device::Cpu).unwrap()
}

fn config(r: usize) -> LoraConfig {
    serde_json::from_value(serde_json::json!({
        "r": r, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"
    }))
    .unwrap()
}

/// Random A and B (or B = 0) for every q_proj / v_proj of the model.
fn adapters(m: &mut Model, r: usize, zero_b: bool) -> BTreeMap<String, (Tensor, Tensor)> {
    let cfg = config(r);
    let mut out = BTreeMap::new();
    for lin in m.linears_mut() {
        if !cfg.targets(lin.path()).unwrap() {
            continue;
        }
        let (i, o) = lin.dims();
        let a = Tensor::randn(0f32, 0.3, (r, i), &Device::Cpu).unwrap();
        let b = if zero_b {
            Tensor::zeros((o, r), DType::F32, &Device::Cpu).unwrap()
        } else {
            Tensor::randn(0f32, 0.3, (o, r), &Device::Cpu).unwrap()
        };
        out.insert(lin.path().to_owned(), (a, b));
    }
    out
}

#[test]
fn peft_adapters_load_and_apply() {
    let dir = tempfile_dir("lora-ok");
    let mut m = Model::load(&fixture("tiny-llama"), DType::F32, &Device::Cpu).unwrap();
    let base = m.forward(&ids(), None).unwrap();

    let zero = adapters(&mut m, 4, true);
    lora::save_peft(&dir, &config(4), &zero, &Default::default()).unwrap();
    assert_eq!(lora::load_peft(&mut m, &dir).unwrap(), 4); // 2 layers × q, v
    assert!(max_diff(&m.forward(&ids(), None).unwrap(), &base) < 1e-6, "B = 0 changed the logits");

    let trained = adapters(&mut m, 4, false);
    lora::save_peft(&dir, &config(4), &trained, &Default::default()).unwrap();
    let text = std::fs::read_to_string(dir.join("adapter_config.json")).unwrap();
    assert!(text.contains("\"peft_type\": \"LORA\"") || text.contains("\"peft_type\":\"LORA\""), "{text}");
    let mut loaded = Model::load(&fixture("tiny-llama"), DType::F32, &Device::Cpu).unwrap();
    lora::load_peft(&mut loaded, &dir).unwrap();
    let mut by_hand = Model::load(&fixture("tiny-llama"), DType::F32, &Device::Cpu).unwrap();
    for lin in by_hand.linears_mut() {
        if let Some((a, b)) = trained.get(lin.path()) {
            lin.set_adapter(Some(Arc::new(Lora { a: a.clone(), b: b.clone(), scale: 16.0 / 4.0 })));
        }
    }
    let l = loaded.forward(&ids(), None).unwrap();
    assert!(max_diff(&l, &base) > 1e-3, "the adapter had no effect");
    assert!(max_diff(&l, &by_hand.forward(&ids(), None).unwrap()) < 1e-6);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn malformed_adapters_are_refused_naming_the_tensor() {
    let dir = tempfile_dir("lora-bad");
    let mut m = Model::load(&fixture("tiny-llama"), DType::F32, &Device::Cpu).unwrap();
    let good = adapters(&mut m, 2, false);
    let path = good.keys().next().unwrap().clone();

    let mut wrong_shape = good.clone();
    let (a, _) = wrong_shape[&path].clone();
    wrong_shape.insert(path.clone(), (a, Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap()));
    lora::save_peft(&dir, &config(2), &wrong_shape, &Default::default()).unwrap();
    let e = lora::load_peft(&mut m, &dir).unwrap_err().to_string();
    assert!(e.contains(&path) && e.contains("do not fit"), "{e}");

    let mut stray = good.clone();
    stray.insert("model.layers.9.self_attn.q_proj".into(), good[&path].clone());
    lora::save_peft(&dir, &config(2), &stray, &Default::default()).unwrap();
    let e = lora::load_peft(&mut m, &dir).unwrap_err().to_string();
    assert!(e.contains("layers.9") && e.contains("does not belong"), "{e}");

    let mut cfg = config(2);
    cfg.target_modules = TargetModules::Special(".*proj".into());
    lora::save_peft(&dir, &cfg, &good, &Default::default()).unwrap();
    let e = lora::load_peft(&mut m, &dir).unwrap_err().to_string();
    assert!(e.contains("target_modules"), "{e}");
    let mut cfg = config(2);
    cfg.r = 0;
    lora::save_peft(&dir, &cfg, &good, &Default::default()).unwrap();
    let e = lora::load_peft(&mut m, &dir).unwrap_err().to_string();
    assert!(e.contains("adapter_config.json") && e.contains("the rank must be positive"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempfile_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("lmstack-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}
