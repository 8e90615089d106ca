//! Measuring detection on composed scenes: average precision at IoU 0.5 (every recall point, as Pascal
//! VOC 2010+ and COCO compute it), class-agnostic and averaged over classes, and the connected-components
//! baseline it is compared with (threshold at [`VISIBLE`], 8-connected components, a box per component
//! of at least 16 pixels, named by the same classifier).

use crate::scene::{VISIBLE, iou};

/// One detection to score: the scene it is in, its box, its class (ignored class-agnostic), its score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    /// Index of the scene.
    pub scene: usize,
    /// `[x0, y0, x1, y1]`.
    pub bbox: [f32; 4],
    /// Class id.
    pub class_id: usize,
    /// Ranking score.
    pub score: f32,
}

/// Average precision at IoU `threshold` of `detections` against `truths` (same fields; scores unused).
/// With `by_class`, a detection matches only a truth of its class. Each truth matches at most once; the
/// precision envelope is integrated over every recall point.
pub fn average_precision(
    detections: &[Scored],
    truths: &[Scored],
    threshold: f32,
    by_class: bool,
) -> f64 {
    if truths.is_empty() {
        return 0.0;
    }
    let mut order: Vec<&Scored> = detections.iter().collect();
    order.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut used = vec![false; truths.len()];
    let mut tp = Vec::with_capacity(order.len());
    for d in order {
        let best = truths
            .iter()
            .enumerate()
            .filter(|(i, t)| {
                !used[*i] && t.scene == d.scene && (!by_class || t.class_id == d.class_id)
            })
            .map(|(i, t)| (i, iou(&t.bbox, &d.bbox)))
            .filter(|(_, o)| *o >= threshold)
            .max_by(|a, b| a.1.total_cmp(&b.1));
        match best {
            Some((i, _)) => {
                used[i] = true;
                tp.push(true);
            }
            None => tp.push(false),
        }
    }
    let n = truths.len() as f64;
    let mut points = Vec::with_capacity(tp.len());
    let mut hits = 0usize;
    for (k, hit) in tp.iter().enumerate() {
        hits += *hit as usize;
        points.push((hits as f64 / n, hits as f64 / (k + 1) as f64));
    }
    // Envelope: precision at recall r is the best precision at any recall >= r.
    let mut ap = 0.0;
    let mut best = 0.0f64;
    let mut prev_recall = points.last().map_or(0.0, |p| p.0);
    for &(recall, precision) in points.iter().rev() {
        ap += (prev_recall - recall) * best;
        best = best.max(precision);
        prev_recall = recall;
    }
    ap + prev_recall * best
}

/// Mean over the classes present in `truths` of the class-aware AP.
pub fn mean_average_precision(detections: &[Scored], truths: &[Scored], threshold: f32) -> f64 {
    let mut classes: Vec<usize> = truths.iter().map(|t| t.class_id).collect();
    classes.sort_unstable();
    classes.dedup();
    if classes.is_empty() {
        return 0.0;
    }
    let sum: f64 = classes
        .iter()
        .map(|&c| {
            let d: Vec<Scored> = detections
                .iter()
                .filter(|d| d.class_id == c)
                .copied()
                .collect();
            let t: Vec<Scored> = truths.iter().filter(|t| t.class_id == c).copied().collect();
            average_precision(&d, &t, threshold, true)
        })
        .sum();
    sum / classes.len() as f64
}

/// The baseline's boxes: 8-connected components of the pixels at least [`VISIBLE`], each of at least
/// `min_area` pixels, with the share of its box it fills as the score.
pub fn components(
    pixels: &[u8],
    width: usize,
    height: usize,
    min_area: usize,
) -> Vec<([f32; 4], f32)> {
    let mut label = vec![0u32; pixels.len()];
    let mut out = Vec::new();
    let mut stack = Vec::new();
    let mut next = 0u32;
    for start in 0..pixels.len() {
        if pixels[start] < VISIBLE || label[start] != 0 {
            continue;
        }
        next += 1;
        label[start] = next;
        stack.push(start);
        let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
        let mut area = 0usize;
        while let Some(p) = stack.pop() {
            let (x, y) = (p % width, p / width);
            area += 1;
            x0 = x0.min(x);
            y0 = y0.min(y);
            x1 = x1.max(x + 1);
            y1 = y1.max(y + 1);
            for ny in y.saturating_sub(1)..(y + 2).min(height) {
                for nx in x.saturating_sub(1)..(x + 2).min(width) {
                    let q = ny * width + nx;
                    if pixels[q] >= VISIBLE && label[q] == 0 {
                        label[q] = next;
                        stack.push(q);
                    }
                }
            }
        }
        if area >= min_area {
            let fill = area as f32 / ((x1 - x0) * (y1 - y0)) as f32;
            out.push(([x0 as f32, y0 as f32, x1 as f32, y1 as f32], fill));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(scene: usize, bbox: [f32; 4], class_id: usize, score: f32) -> Scored {
        Scored {
            scene,
            bbox,
            class_id,
            score,
        }
    }

    #[test]
    fn average_precision_of_known_rankings() {
        let truths = [
            s(0, [0.0, 0.0, 10.0, 10.0], 1, 0.0),
            s(1, [0.0, 0.0, 10.0, 10.0], 2, 0.0),
        ];
        // Both found, best first: AP 1.
        let d = [
            s(0, [0.0, 0.0, 10.0, 10.0], 1, 0.9),
            s(1, [1.0, 0.0, 10.0, 10.0], 2, 0.8),
        ];
        assert_eq!(average_precision(&d, &truths, 0.5, false), 1.0);
        // A false positive ranked first: precision 1/2 at recall 1/2, 2/3 at recall 1: AP 2/3.
        let d2 = [s(0, [50.0, 50.0, 60.0, 60.0], 1, 0.95), d[0], d[1]];
        assert!((average_precision(&d2, &truths, 0.5, false) - 2.0 / 3.0).abs() < 1e-9);
        // A duplicate of a found truth is a false positive; one truth missed caps recall at 1/2.
        let d3 = [d[0], s(0, [0.0, 0.0, 10.0, 9.0], 1, 0.5)];
        assert_eq!(average_precision(&d3, &truths, 0.5, false), 0.5);
        // Class-aware: the right box with the wrong class does not count.
        let d4 = [s(0, [0.0, 0.0, 10.0, 10.0], 2, 0.9), d[1]];
        assert_eq!(average_precision(&d4, &truths, 0.5, false), 1.0);
        assert_eq!(mean_average_precision(&d4, &truths, 0.5), 0.25);
        assert_eq!(average_precision(&[], &truths, 0.5, false), 0.0);
    }

    #[test]
    fn components_split_apart_items_and_merge_touching_ones() {
        // 20×10: a 3×3 block at (1,1), a 2×2 block at (10,1) touching a 2×2 block at (12,3) diagonally,
        // and a single bright pixel below min_area.
        let (w, h) = (20, 10);
        let mut px = vec![30u8; w * h];
        for (x, y) in [
            (1, 1),
            (2, 1),
            (3, 1),
            (1, 2),
            (2, 2),
            (3, 2),
            (1, 3),
            (2, 3),
            (3, 3),
        ] {
            px[y * w + x] = 200;
        }
        for (x, y) in [
            (10, 1),
            (11, 1),
            (10, 2),
            (11, 2),
            (12, 3),
            (13, 3),
            (12, 4),
            (13, 4),
        ] {
            px[y * w + x] = 100;
        }
        px[8 * w + 18] = 255;
        let c = components(&px, w, h, 4);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].0, [1.0, 1.0, 4.0, 4.0]);
        assert_eq!(c[0].1, 1.0);
        assert_eq!(c[1].0, [10.0, 1.0, 14.0, 5.0]);
        assert_eq!(c[1].1, 0.5);
    }
}
