//! Scenes of several Fashion-MNIST items, composed by fixed rules so that anyone can make the same ones
//! (the detector trains on scenes composed from the training images and is measured on scenes composed
//! from the test images). The rules, for a `width`×`height` canvas and a seeded [`Rng`]:
//!
//! 1. Background: every pixel, row by row, is `rng.below(noise + 1)` (uniform 0..=`noise`, 48 by default).
//! 2. Items: `rng.below(max_items - min_items + 1) + min_items` are wanted (1 to 6). For each, up to 50
//!    tries: an image `rng.below(images)`, a side `min_side + rng.below(max_side - min_side + 1)` (20 to
//!    42 px) to which its 28×28 tile is resized (bilinear), a top-left corner `rng.below(width - side + 1)`,
//!    `rng.below(height - side + 1)`. The item's box is the tight box of its resized pixels of at least
//!    [`VISIBLE`] (64); a try whose box has an IoU above `max_iou` (0.3) with a placed item's box, or with
//!    no such pixel, is dropped. When 50 tries fail the scene keeps the items it has.
//! 3. A placed item is drawn with `max(canvas, item)` (light items on a dark canvas, as in Fashion-MNIST).
//!
//! Boxes are `[x0, y0, x1, y1]` in pixels, `x1`/`y1` one past the last column/row.

use crate::idx::{SIDE, Split};
use celeriac_inference::Rng;
use image::{GrayImage, imageops};

/// An item pixel at least this bright is visible: it belongs to the item's box.
pub const VISIBLE: u8 = 64;

/// How scenes are composed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SceneRules {
    /// Canvas width in pixels.
    pub width: usize,
    /// Canvas height in pixels.
    pub height: usize,
    /// Fewest items wanted.
    pub min_items: usize,
    /// Most items wanted.
    pub max_items: usize,
    /// Smallest item side in pixels.
    pub min_side: usize,
    /// Largest item side in pixels.
    pub max_side: usize,
    /// Largest IoU between two items' boxes.
    pub max_iou: f32,
    /// Brightest background noise (0..=255).
    pub noise: u8,
}

impl Default for SceneRules {
    fn default() -> Self {
        Self {
            width: 112,
            height: 112,
            min_items: 1,
            max_items: 6,
            min_side: 20,
            max_side: 42,
            max_iou: 0.3,
            noise: 48,
        }
    }
}

/// One item of a scene.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Item {
    /// Tight box of the item's visible pixels.
    pub bbox: [f32; 4],
    /// Fashion-MNIST class id.
    pub class_id: usize,
}

/// A composed scene.
#[derive(Debug, Clone)]
pub struct Scene {
    /// Canvas width.
    pub width: usize,
    /// Canvas height.
    pub height: usize,
    /// Grey pixels, row-major, items light on dark.
    pub pixels: Vec<u8>,
    /// The items, in the order they were drawn.
    pub items: Vec<Item>,
}

/// Intersection over union of two boxes.
pub fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = w * h;
    let area = |r: &[f32; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let union = area(a) + area(b) - inter;
    if union <= 0.0 { 0.0 } else { inter / union }
}

/// Tight box of the pixels of `img` at least `threshold`, or `None` when there is none.
pub fn tight_box(img: &GrayImage, threshold: u8) -> Option<[u32; 4]> {
    let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0, 0);
    for (x, y, p) in img.enumerate_pixels() {
        if p.0[0] >= threshold {
            x0 = x0.min(x);
            y0 = y0.min(y);
            x1 = x1.max(x + 1);
            y1 = y1.max(y + 1);
        }
    }
    (x1 > x0).then_some([x0, y0, x1, y1])
}

/// Composes one scene from `split`'s images by the rules above.
pub fn compose(split: &Split, rules: &SceneRules, rng: &mut Rng) -> Scene {
    let (w, h) = (rules.width, rules.height);
    let mut pixels: Vec<u8> = (0..w * h)
        .map(|_| rng.below(rules.noise as usize + 1) as u8)
        .collect();
    let wanted = rules.min_items + rng.below(rules.max_items - rules.min_items + 1);
    let mut items: Vec<Item> = Vec::with_capacity(wanted);
    while items.len() < wanted {
        let mut placed = false;
        for _ in 0..50 {
            let i = rng.below(split.len());
            let side = rules.min_side + rng.below(rules.max_side - rules.min_side + 1);
            let side = side.min(w).min(h);
            let x = rng.below(w - side + 1);
            let y = rng.below(h - side + 1);
            let tile = GrayImage::from_raw(SIDE as u32, SIDE as u32, split.image(i).to_vec())
                .expect("a 28×28 image");
            let item = imageops::resize(
                &tile,
                side as u32,
                side as u32,
                imageops::FilterType::Triangle,
            );
            let Some(b) = tight_box(&item, VISIBLE) else {
                continue;
            };
            let bbox = [
                (x as u32 + b[0]) as f32,
                (y as u32 + b[1]) as f32,
                (x as u32 + b[2]) as f32,
                (y as u32 + b[3]) as f32,
            ];
            if items.iter().any(|o| iou(&o.bbox, &bbox) > rules.max_iou) {
                continue;
            }
            for (ix, iy, p) in item.enumerate_pixels() {
                let at = (y + iy as usize) * w + x + ix as usize;
                pixels[at] = pixels[at].max(p.0[0]);
            }
            items.push(Item {
                bbox,
                class_id: split.labels[i] as usize,
            });
            placed = true;
            break;
        }
        if !placed {
            break;
        }
    }
    Scene {
        width: w,
        height: h,
        pixels,
        items,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split() -> Split {
        // Two images: a 10×20 block and a full tile, classes 3 and 8.
        let mut images = vec![0u8; 2 * SIDE * SIDE];
        for y in 4..24 {
            for x in 9..19 {
                images[y * SIDE + x] = 255;
            }
        }
        images[SIDE * SIDE..].fill(200);
        Split {
            images,
            labels: vec![3, 8],
        }
    }

    #[test]
    fn iou_of_known_boxes() {
        assert_eq!(iou(&[0.0, 0.0, 10.0, 10.0], &[0.0, 0.0, 10.0, 10.0]), 1.0);
        assert_eq!(iou(&[0.0, 0.0, 10.0, 10.0], &[10.0, 0.0, 20.0, 10.0]), 0.0);
        assert!((iou(&[0.0, 0.0, 10.0, 10.0], &[5.0, 0.0, 15.0, 10.0]) - 1.0 / 3.0).abs() < 1e-6);
    }

    #[test]
    fn scenes_follow_the_rules_and_repeat_with_the_seed() {
        let s = split();
        let rules = SceneRules::default();
        for seed in 0..20 {
            let a = compose(&s, &rules, &mut Rng::new(seed));
            let b = compose(&s, &rules, &mut Rng::new(seed));
            assert_eq!(a.pixels, b.pixels);
            assert_eq!(a.items, b.items);
            assert!((1..=6).contains(&a.items.len()));
            for (i, item) in a.items.iter().enumerate() {
                let [x0, y0, x1, y1] = item.bbox;
                assert!(x0 >= 0.0 && y0 >= 0.0 && x1 <= 112.0 && y1 <= 112.0);
                assert!(x1 - x0 <= 42.0 && y1 - y0 <= 42.0 && x1 - x0 >= 5.0);
                assert!([3, 8].contains(&item.class_id));
                for other in &a.items[..i] {
                    assert!(iou(&item.bbox, &other.bbox) <= 0.3);
                }
                // Tight: the box's first row holds a visible pixel.
                let row = y0 as usize * 112;
                assert!((x0 as usize..x1 as usize).any(|x| a.pixels[row + x] >= VISIBLE));
            }
            // The background outside every box is noise.
            let outside = (0..112 * 112).filter(|&p| {
                let (x, y) = ((p % 112) as f32, (p / 112) as f32);
                !a.items.iter().any(|i| {
                    x >= i.bbox[0] - 1.0
                        && x < i.bbox[2] + 1.0
                        && y >= i.bbox[1] - 1.0
                        && y < i.bbox[3] + 1.0
                })
            });
            assert!(outside.into_iter().all(|p| a.pixels[p] <= 48));
        }
    }

    #[test]
    fn the_block_item_gets_its_tight_box_not_its_tile() {
        let s = Split {
            images: split().images[..SIDE * SIDE].to_vec(),
            labels: vec![3],
        };
        let rules = SceneRules {
            min_items: 1,
            max_items: 1,
            min_side: 28,
            max_side: 28,
            ..SceneRules::default()
        };
        let scene = compose(&s, &rules, &mut Rng::new(1));
        let [x0, y0, x1, y1] = scene.items[0].bbox;
        assert_eq!((x1 - x0, y1 - y0), (10.0, 20.0));
    }
}
