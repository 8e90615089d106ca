//! The shipped weights against the quality targets on Fashion-MNIST's 10,000 test images, a smoke training
//! run, and the batching executor under concurrent callers. Needs Debian's `dataset-fashion-mnist`
//! (`make unit` installs it).

use burn::backend::{Autodiff, Flex};
use celeriac_tasks_vision::config::VisionConfig;
use celeriac_tasks_vision::executor::Executor;
use celeriac_tasks_vision::idx::{FashionMnist, PIXELS};
use celeriac_tasks_vision::metrics::VisionMetrics;
use celeriac_tasks_vision::model::ClassifierConfig;
use celeriac_tasks_vision::train::{self, TrainOptions};
use celeriac_tasks_vision::weights::{Role, Weights};
use std::sync::Arc;

/// The shipped weights give the figures `classifier.json` records for them, on the whole test set. (The issue's
/// targets, accuracy 0.94 and Recall@1 0.90, are not met yet by these 6-epoch weights: see the README.)
#[test]
fn the_shipped_weights_give_their_recorded_figures() {
    let data = FashionMnist::locate(None).expect("Fashion-MNIST");
    let weights = Weights::shipped().unwrap();
    let device = Default::default();
    let model = weights.load::<Flex>(&device).unwrap();
    let accuracy = train::accuracy(&model, &data.test, &device);
    let recall = train::recall_at_1(&model, &data.train, &data.test, &device);
    let recorded = &weights.meta.figures;
    let want_accuracy = recorded["test_accuracy"].as_f64().unwrap();
    let want_recall = recorded["search_recall_at_1"].as_f64().unwrap();
    assert!(
        (want_accuracy - accuracy).abs() < 0.002,
        "{recorded} vs accuracy {accuracy}"
    );
    assert!(
        (want_recall - recall).abs() < 0.002,
        "{recorded} vs Recall@1 {recall}"
    );
    assert!(
        accuracy > 0.85 && recall > 0.85,
        "accuracy {accuracy}, Recall@1 {recall}"
    );
}

/// The shipped namer (the classifier fine-tuned on scene crops, which names `vision.detect`'s boxes) gives the
/// scene-crop accuracy `namer.json` records, on the items of the same 1,000 test-composed scenes, and names
/// them better than the classifier it started from.
#[test]
fn the_shipped_namer_gives_its_recorded_scene_crop_accuracy() {
    let data = FashionMnist::locate(None).expect("Fashion-MNIST");
    let namer = Weights::shipped_as(Role::Namer).unwrap();
    let recorded = &namer.meta.figures;
    let device = Default::default();
    let scenes = recorded["scene_crop_test_scenes"].as_u64().unwrap() as usize;
    let (eval_scenes, seed) = train::SCENE_CROP_EVAL;
    assert_eq!(scenes, eval_scenes);
    let crops = train::scene_crop_split(&data.test, scenes, seed);
    let got = train::accuracy(&namer.load::<Flex>(&device).unwrap(), &crops, &device);
    let want = recorded["scene_crop_accuracy"].as_f64().unwrap();
    assert!(
        (got - want).abs() < 0.002,
        "measured {got}, recorded {want}"
    );
    let classifier = Weights::shipped().unwrap().load::<Flex>(&device).unwrap();
    let before = train::accuracy(&classifier, &crops, &device);
    assert!(got > before + 0.02, "namer {got}, classifier {before}");
}

#[test]
fn a_smoke_training_run_learns_and_writes_loadable_weights() {
    let out = std::env::temp_dir().join(format!("celeriac-vision-smoke-{}", std::process::id()));
    let options = TrainOptions {
        data: None,
        out: out.clone(),
        epochs: 2,
        batch_size: 32,
        learning_rate: 3e-3,
        seed: 7,
        validation: 500,
        limit: Some(2000),
        model: ClassifierConfig::new().with_channels(8),
        init: None,
        scene_crops: 0.25,
        role: Role::Namer,
        command: "smoke".into(),
    };
    let device = Default::default();
    let figures = train::train::<Autodiff<Flex>>(&options, &device).unwrap();
    assert_eq!(figures["training_images"], 2000);
    assert_eq!(figures["test_images"], 2000);
    let accuracy = figures["test_accuracy"].as_f64().unwrap();
    assert!(
        accuracy > 0.6,
        "two epochs on 2,000 images: accuracy {accuracy}"
    );
    // Written as a namer: the directory names boxes with it and has no classifier.
    assert!(Weights::from_dir(&out).is_err());
    let reloaded = Weights::for_naming(Some(&out)).unwrap();
    assert_eq!(reloaded.role, Role::Namer);
    assert_eq!(reloaded.meta.config.channels, 8);
    let model = reloaded.load::<Flex>(&device).unwrap();
    let data = FashionMnist::locate(None).unwrap();
    let first = data.test.select(&(0..2000).collect::<Vec<_>>());
    assert!((train::accuracy(&model, &first, &device) - accuracy).abs() < 1e-9);
    // The scene-crop accuracy: 100 scenes (a twentieth of the limit) composed from those test images.
    assert_eq!(figures["scene_crop_test_scenes"], 100);
    let crops = train::scene_crop_split(&first, 100, train::SCENE_CROP_EVAL.1);
    assert!(crops.len() >= 100 && crops.len() <= 600, "{}", crops.len());
    let crop_accuracy = train::accuracy(&model, &crops, &device);
    assert!((crop_accuracy - figures["scene_crop_accuracy"].as_f64().unwrap()).abs() < 1e-4);
    std::fs::remove_dir_all(out).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_are_batched_and_each_answered_once() {
    let data = FashionMnist::locate(None).unwrap();
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(VisionMetrics::new(&mut registry));
    let config = VisionConfig {
        max_wait_ms: 20.0,
        ..Default::default()
    };
    let executor = Arc::new(Executor::start(&config, Arc::clone(&metrics)).unwrap());
    let alone = executor.infer(data.test.image(0).to_vec()).await.unwrap();
    let mut calls = Vec::new();
    for i in 0..200 {
        let e = Arc::clone(&executor);
        let px = data.test.image(i).to_vec();
        calls.push(tokio::spawn(async move { e.infer(px).await }));
    }
    let mut answers = Vec::new();
    for c in calls {
        answers.push(c.await.unwrap().unwrap());
    }
    // The same image alone and inside a padded batch: the same answer.
    let diff = alone
        .embedding
        .iter()
        .zip(&answers[0].embedding)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-5, "embedding differs by {diff}");
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("{name} in\n{text}"))
            .parse()
            .unwrap()
    };
    assert_eq!(value("celeriac_vision_batch_size_sum"), 201.0);
    assert!(value("celeriac_vision_batch_size_count") <= 101.0, "{text}");
    assert_eq!(value("celeriac_vision_queued"), 0.0);
    assert_eq!(PIXELS, 784);
}
