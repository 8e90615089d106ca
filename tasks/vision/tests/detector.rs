//! The shipped detector against the figures `detector.json` records (class-agnostic AP@0.5 and mAP@0.5 on
//! scenes composed from the test images, boxes named by the shipped namer, and the connected-components
//! baseline on the same scenes), and a smoke training run, fine-tuned once more from its own weights. Needs Debian's `dataset-fashion-mnist` (`make unit` installs it).

use burn::backend::{Autodiff, Flex};
use celeriac_inference::Rng;
use celeriac_tasks_vision::detect_train::{self, DetectTrainOptions};
use celeriac_tasks_vision::detector::{DetectorConfig, DetectorWeights, detect};
use celeriac_tasks_vision::idx::FashionMnist;
use celeriac_tasks_vision::scene::{SceneRules, compose};
use celeriac_tasks_vision::weights::{Role, Weights};

/// The shipped weights give their recorded figures on the same 1,000 test scenes, above the baseline.
#[test]
fn the_shipped_detector_gives_its_recorded_figures_above_the_baseline() {
    let data = FashionMnist::locate(None).expect("Fashion-MNIST");
    let weights = DetectorWeights::shipped().unwrap();
    let recorded = &weights.meta.figures;
    let device = Default::default();
    let detector = weights.load::<Flex>(&device).unwrap();
    let namer = Weights::for_naming(None).unwrap();
    assert_eq!(namer.role, Role::Namer);
    let namer = namer.load::<Flex>(&device).unwrap();
    let n = recorded["test_scenes"].as_u64().unwrap() as usize;
    let seed = recorded["eval_seed"].as_u64().unwrap();
    let rules = SceneRules::default();
    let mut rng = Rng::new(seed);
    let scenes: Vec<_> = (0..n)
        .map(|_| compose(&data.test, &rules, &mut rng))
        .collect();
    let got = detect_train::evaluate(&detector, &namer, &scenes, &device);
    for key in [
        "test_items",
        "agnostic_ap50",
        "map50",
        "baseline_agnostic_ap50",
        "baseline_map50",
    ] {
        let (g, w) = (got[key].as_f64().unwrap(), recorded[key].as_f64().unwrap());
        assert!((g - w).abs() < 0.002, "{key}: measured {g}, recorded {w}");
    }
    let f = |k: &str| got[k].as_f64().unwrap();
    assert!(f("agnostic_ap50") > f("baseline_agnostic_ap50"), "{got}");
    assert!(f("map50") > f("baseline_map50"), "{got}");
    assert!(f("agnostic_ap50") > 0.9 && f("map50") > 0.6, "{got}");
}

#[test]
fn a_smoke_training_run_writes_loadable_weights() {
    let out = std::env::temp_dir().join(format!("celeriac-detector-smoke-{}", std::process::id()));
    let options = DetectTrainOptions {
        data: None,
        out: out.clone(),
        namer: None,
        epochs: 1,
        scenes_per_epoch: 16,
        batch_size: 8,
        learning_rate: 2e-3,
        seed: 7,
        validation: 500,
        eval_scenes: 10,
        eval_seed: 1,
        model: DetectorConfig::new().with_channels(4),
        init: None,
        command: "smoke".into(),
    };
    let figures = detect_train::train::<Autodiff<Flex>>(&options, &Default::default()).unwrap();
    assert_eq!(figures["training_scenes"], 16);
    assert_eq!(figures["test_scenes"], 10);
    assert!(figures["history"][0]["loss"].as_f64().unwrap().is_finite());
    let weights = DetectorWeights::resolve(Some(&out)).unwrap();
    assert_eq!(weights.meta.config.channels, 4);
    let model = weights.load::<Flex>(&Default::default()).unwrap();
    // Any size from 64 to 448 (and odd ones) runs; boxes stay inside the image.
    for (w, h) in [(64, 64), (113, 97), (448, 300)] {
        for p in detect(
            &model.folded(),
            &vec![200u8; w * h],
            w,
            h,
            0.0,
            &Default::default(),
        ) {
            assert!(p.bbox[0] >= 0.0 && p.bbox[2] <= w as f32 && p.bbox[3] <= h as f32);
        }
    }
    // Fine-tuning starts from the given weights: after no epochs they come out unchanged and measure the
    // same on the same scenes.
    let again = out.join("again");
    let tuned = DetectTrainOptions {
        out: again.clone(),
        init: Some(out.clone()),
        epochs: 0,
        model: DetectorConfig::new().with_channels(4),
        ..options
    };
    let figures2 = detect_train::train::<Autodiff<Flex>>(&tuned, &Default::default()).unwrap();
    for key in ["agnostic_ap50", "map50", "validation_agnostic_ap50"] {
        assert_eq!(figures2[key], figures[key], "{key}");
    }
    assert_eq!(figures2["init"]["command"], "smoke");
    assert_eq!(figures2["init"]["training_scenes"], 16);
    let tuned = DetectorWeights::from_dir(&again).unwrap();
    assert_eq!(tuned.meta.config.channels, 4);
    assert!(DetectorWeights::from_dir(&again.join("missing")).is_err());
    std::fs::remove_dir_all(out).unwrap();
}
