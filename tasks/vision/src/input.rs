//! A task's `image` argument to the model's input. The argument is a base64 string of PNG, JPEG or WebP
//! bytes, a `data:` URL, or an http(s) URL (fetched with a size cap and a timeout). Any size and colour is
//! accepted and converted the way Fashion-MNIST was made: grey, item light on a dark background (a light
//! background, judged from the border, is inverted; transparency counts as white), cropped to the item, the
//! long side scaled to 28 pixels and centred. A 28×28 image with a dark background is used as it is.
//! Every problem is a [`InputError`] naming it (the task raises `ValueError`).

use crate::idx::{PIXELS, SIDE};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE};
use image::{DynamicImage, GenericImageView, ImageReader, Limits, imageops};
use std::io::Cursor;
use std::time::Duration;

/// What is wrong with an input image.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InputError {
    /// Not a string, or an empty one.
    #[error("image: expected a base64 string, a data: URL or an http(s) URL")]
    NotAString,
    /// Base64 that does not decode.
    #[error("image: not valid base64 ({0})")]
    Base64(String),
    /// A `data:` URL without `;base64,`.
    #[error("image: a data: URL must be base64 (data:image/png;base64,...)")]
    DataUrl,
    /// Over `vision.max_image_bytes`.
    #[error("image: {0} bytes is over the limit of {1} bytes")]
    TooLarge(usize, usize),
    /// No bytes at all.
    #[error("image: empty")]
    Empty,
    /// Bytes of no format we read.
    #[error("image: not a PNG, JPEG or WebP image")]
    UnknownFormat,
    /// A truncated or corrupt file.
    #[error("image: cannot decode the {0} data ({1})")]
    Corrupt(String, String),
    /// Width or height zero.
    #[error("image: zero-sized ({0}x{1})")]
    ZeroSized(u32, u32),
    /// A side over `vision.max_image_side`.
    #[error("image: {0}x{1} is over the limit of {2} pixels a side")]
    TooBig(u32, u32, u32),
    /// The URL could not be fetched.
    #[error("image: fetching {0}: {1}")]
    Fetch(String, String),
}

/// Limits on inputs (from `[vision]`).
#[derive(Debug, Clone, Copy)]
pub struct InputLimits {
    /// Largest encoded image, in bytes.
    pub max_bytes: usize,
    /// Largest side, in pixels.
    pub max_side: u32,
    /// Timeout of a URL fetch.
    pub fetch_timeout: Duration,
}

/// The encoded bytes of the argument (fetching a URL).
pub async fn bytes_of(
    arg: &serde_json::Value,
    limits: InputLimits,
    http: &reqwest::Client,
) -> Result<Vec<u8>, InputError> {
    let s = arg.as_str().map(str::trim).filter(|s| !s.is_empty());
    let s = s.ok_or(InputError::NotAString)?;
    let bytes = if s.starts_with("http://") || s.starts_with("https://") {
        fetch(s, limits, http).await?
    } else if let Some(rest) = s.strip_prefix("data:") {
        let (meta, data) = rest.split_once(',').ok_or(InputError::DataUrl)?;
        if !meta.ends_with(";base64") {
            return Err(InputError::DataUrl);
        }
        decode_base64(data, limits.max_bytes)?
    } else {
        decode_base64(s, limits.max_bytes)?
    };
    if bytes.is_empty() {
        return Err(InputError::Empty);
    }
    if bytes.len() > limits.max_bytes {
        return Err(InputError::TooLarge(bytes.len(), limits.max_bytes));
    }
    Ok(bytes)
}

fn decode_base64(s: &str, max: usize) -> Result<Vec<u8>, InputError> {
    let clean: String = s.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    // The decoded length, before decoding (exact for valid base64).
    let decoded = clean.trim_end_matches('=').len() * 3 / 4;
    if decoded > max {
        return Err(InputError::TooLarge(decoded, max));
    }
    let padded = match clean.len() % 4 {
        2 => format!("{clean}=="),
        3 => format!("{clean}="),
        _ => clean,
    };
    STANDARD
        .decode(&padded)
        .or_else(|e| URL_SAFE.decode(&padded).map_err(|_| e))
        .map_err(|e| InputError::Base64(e.to_string()))
}

async fn fetch(
    url: &str,
    limits: InputLimits,
    http: &reqwest::Client,
) -> Result<Vec<u8>, InputError> {
    let err = |e: String| InputError::Fetch(url.to_string(), e);
    let work = async {
        let mut resp = http.get(url).send().await.map_err(|e| err(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(err(format!("HTTP {}", resp.status())));
        }
        if let Some(len) = resp.content_length()
            && len as usize > limits.max_bytes
        {
            return Err(InputError::TooLarge(len as usize, limits.max_bytes));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| err(e.to_string()))? {
            body.extend_from_slice(&chunk);
            if body.len() > limits.max_bytes {
                return Err(InputError::TooLarge(body.len(), limits.max_bytes));
            }
        }
        Ok(body)
    };
    tokio::time::timeout(limits.fetch_timeout, work)
        .await
        .map_err(|_| err(format!("no answer within {:?}", limits.fetch_timeout)))?
}

/// Decodes `bytes` (PNG, JPEG or WebP).
pub fn decode(bytes: &[u8], limits: InputLimits) -> Result<DynamicImage, InputError> {
    // A PNG header that declares a zero side is refused by the decoder with a generic error: name it.
    if bytes.len() >= 24 && bytes.starts_with(b"\x89PNG\r\n\x1a\n") && &bytes[12..16] == b"IHDR" {
        let w = u32::from_be_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]);
        let h = u32::from_be_bytes([bytes[20], bytes[21], bytes[22], bytes[23]]);
        if w == 0 || h == 0 {
            return Err(InputError::ZeroSized(w, h));
        }
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|_| InputError::UnknownFormat)?;
    let format = reader.format().ok_or(InputError::UnknownFormat)?;
    let name = format!("{format:?}").to_uppercase();
    if !matches!(
        format,
        image::ImageFormat::Png | image::ImageFormat::Jpeg | image::ImageFormat::WebP
    ) {
        return Err(InputError::UnknownFormat);
    }
    let (w, h) = reader.into_dimensions().unwrap_or((1, 1));
    if w == 0 || h == 0 {
        return Err(InputError::ZeroSized(w, h));
    }
    if w > limits.max_side || h > limits.max_side {
        return Err(InputError::TooBig(w, h, limits.max_side));
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|_| InputError::UnknownFormat)?;
    let mut l = Limits::default();
    l.max_image_width = Some(limits.max_side);
    l.max_image_height = Some(limits.max_side);
    reader.limits(l);
    let img = reader
        .decode()
        .map_err(|e| InputError::Corrupt(name, e.to_string()))?;
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 {
        return Err(InputError::ZeroSized(w, h));
    }
    Ok(img)
}

/// Grey bytes of any image, item light on dark (alpha over white, then inverted when the border is light).
pub fn grey_light_on_dark(img: &DynamicImage) -> image::GrayImage {
    let rgba = img.to_rgba8();
    let (w, h) = rgba.dimensions();
    let mut grey = image::GrayImage::new(w, h);
    for (x, y, p) in rgba.enumerate_pixels() {
        let [r, g, b, a] = p.0;
        let luma = 0.299 * r as f32 + 0.587 * g as f32 + 0.114 * b as f32;
        let a = a as f32 / 255.0;
        let v = luma * a + 255.0 * (1.0 - a);
        grey.put_pixel(x, y, image::Luma([v.round().clamp(0.0, 255.0) as u8]));
    }
    let mut border = 0u64;
    let mut count = 0u64;
    for x in 0..w {
        border += grey.get_pixel(x, 0).0[0] as u64 + grey.get_pixel(x, h - 1).0[0] as u64;
        count += 2;
    }
    for y in 0..h {
        border += grey.get_pixel(0, y).0[0] as u64 + grey.get_pixel(w - 1, y).0[0] as u64;
        count += 2;
    }
    if border / count.max(1) > 127 {
        imageops::invert(&mut grey);
    }
    grey
}

/// Fashion-MNIST pixels (28×28, light on dark) of any decoded image.
pub fn to_model_pixels(img: &DynamicImage) -> Vec<u8> {
    grey_to_model_pixels(grey_light_on_dark(img))
}

/// Fashion-MNIST pixels of a grey image already light on dark: cropped to its bright pixels, the longer
/// side scaled to 28, centred (what `vision.detect` does to each box before naming its item).
pub fn grey_to_model_pixels(grey: image::GrayImage) -> Vec<u8> {
    let (w, h) = grey.dimensions();
    if w as usize == SIDE && h as usize == SIDE {
        return grey.into_raw();
    }
    // Crop to the pixels brighter than a fifth of the brightest one.
    let max = grey.pixels().map(|p| p.0[0]).max().unwrap_or(0);
    let threshold = (max as u32 / 5).max(8) as u8;
    let crop = match crate::scene::tight_box(&grey, threshold) {
        Some([x0, y0, x1, y1]) => imageops::crop_imm(&grey, x0, y0, x1 - x0, y1 - y0).to_image(),
        None => grey,
    };
    let (cw, ch) = crop.dimensions();
    let scale = SIDE as f32 / cw.max(ch) as f32;
    let nw = ((cw as f32 * scale).round() as u32).clamp(1, SIDE as u32);
    let nh = ((ch as f32 * scale).round() as u32).clamp(1, SIDE as u32);
    let small = imageops::resize(&crop, nw, nh, imageops::FilterType::Triangle);
    let mut out = vec![0u8; PIXELS];
    let ox = (SIDE as u32 - nw) / 2;
    let oy = (SIDE as u32 - nh) / 2;
    for (x, y, p) in small.enumerate_pixels() {
        out[((y + oy) as usize) * SIDE + (x + ox) as usize] = p.0[0];
    }
    out
}

/// The classifier's input for the pixels of `bbox` in a grey image (`vision.detect`'s boxes): pixels darker than a fifth of the box's
/// brightest are set to black (the canvas's noise, which Fashion-MNIST's black backgrounds never have), then
/// cropped, scaled and centred as for `vision.classify`.
pub fn crop(pixels: &[u8], width: usize, height: usize, bbox: [f32; 4]) -> Vec<u8> {
    let x0 = (bbox[0].floor().max(0.0) as usize).min(width - 1);
    let y0 = (bbox[1].floor().max(0.0) as usize).min(height - 1);
    let x1 = (bbox[2].ceil() as usize).clamp(x0 + 1, width);
    let y1 = (bbox[3].ceil() as usize).clamp(y0 + 1, height);
    let mut grey = image::GrayImage::new((x1 - x0) as u32, (y1 - y0) as u32);
    for y in y0..y1 {
        for x in x0..x1 {
            grey.put_pixel(
                (x - x0) as u32,
                (y - y0) as u32,
                image::Luma([pixels[y * width + x]]),
            );
        }
    }
    let floor = (grey.pixels().map(|p| p.0[0]).max().unwrap_or(0) / 5).max(8);
    for p in grey.pixels_mut() {
        if p.0[0] < floor {
            p.0[0] = 0;
        }
    }
    grey_to_model_pixels(grey)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> InputLimits {
        InputLimits {
            max_bytes: 1000,
            max_side: 64,
            fetch_timeout: Duration::from_secs(1),
        }
    }

    fn png(w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 3]) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb(f(x, y)));
        let mut out = Vec::new();
        DynamicImage::ImageRgb8(img)
            .write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    }

    #[test]
    fn bad_inputs_are_named() {
        assert!(
            decode_base64("!!!", 1000)
                .unwrap_err()
                .to_string()
                .starts_with("image: not valid base64")
        );
        assert_eq!(
            decode(b"hello world", limits()).unwrap_err(),
            InputError::UnknownFormat
        );
        let p = png(8, 8, |_, _| [0, 0, 0]);
        let e = decode(&p[..p.len() / 2], limits()).unwrap_err();
        assert!(
            matches!(e, InputError::Corrupt(ref f, _) if f == "PNG"),
            "{e}"
        );
        assert_eq!(
            decode(&png(65, 8, |_, _| [0, 0, 0]), limits()).unwrap_err(),
            InputError::TooBig(65, 8, 64)
        );
        assert_eq!(
            decode_base64(&"A".repeat(2000), 1000).unwrap_err(),
            InputError::TooLarge(1500, 1000)
        );
    }

    #[test]
    fn a_dark_item_on_white_is_inverted_cropped_and_centred() {
        // A black 20×10 bar on a white 60×60 canvas.
        let p = png(60, 60, |x, y| {
            if (20..40).contains(&x) && (25..35).contains(&y) {
                [0, 0, 0]
            } else {
                [255, 255, 255]
            }
        });
        let px = to_model_pixels(&decode(&p, limits()).unwrap());
        // Scaled to 28×14, centred: rows 7..21 light, the rest dark.
        assert_eq!(px[SIDE * 14 + 14], 255);
        assert_eq!(px[SIDE * 3 + 14], 0);
        assert_eq!(px[SIDE * 7], 255);
        assert_eq!(px[SIDE * 21], 0);
    }
}
