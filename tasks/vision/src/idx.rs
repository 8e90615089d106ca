//! Fashion-MNIST in its IDX files (`train-images-idx3-ubyte.gz`, ...): the training data, read from the
//! directory Debian's `dataset-fashion-mnist` installs (`/usr/share/datasets/fashion-mnist`).

use crate::VisionError;
use flate2::read::GzDecoder;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Where Debian's `dataset-fashion-mnist` puts the files.
pub const DEFAULT_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// Side of a Fashion-MNIST image.
pub const SIDE: usize = 28;
/// Pixels of one image.
pub const PIXELS: usize = SIDE * SIDE;

/// One split of the data set: `len` images of 28×28 grey bytes (item light on black) and their labels.
#[derive(Debug, Clone)]
pub struct Split {
    /// Row-major pixels, image after image.
    pub images: Vec<u8>,
    /// Class ids, 0..10.
    pub labels: Vec<u8>,
}

impl Split {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the split holds no image.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The pixels of image `i`.
    pub fn image(&self, i: usize) -> &[u8] {
        &self.images[i * PIXELS..(i + 1) * PIXELS]
    }

    /// The images at `indices`, in that order.
    pub fn select(&self, indices: &[usize]) -> Split {
        let mut images = Vec::with_capacity(indices.len() * PIXELS);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            images.extend_from_slice(self.image(i));
            labels.push(self.labels[i]);
        }
        Split { images, labels }
    }
}

/// The training (60,000) and test (10,000) splits.
#[derive(Debug, Clone)]
pub struct FashionMnist {
    /// `train-*`.
    pub train: Split,
    /// `t10k-*`.
    pub test: Split,
}

impl FashionMnist {
    /// Reads the four files from `dir`.
    pub fn load(dir: &Path) -> Result<Self, VisionError> {
        let split = |prefix: &str| -> Result<Split, VisionError> {
            let images = read_idx(&dir.join(format!("{prefix}-images-idx3-ubyte.gz")), 3)?;
            let labels = read_idx(&dir.join(format!("{prefix}-labels-idx1-ubyte.gz")), 1)?;
            if images.dims[1..] != [SIDE, SIDE] || images.dims[0] != labels.dims[0] {
                return Err(VisionError::Data(format!(
                    "{prefix}: images {:?} and labels {:?} do not match",
                    images.dims, labels.dims
                )));
            }
            if let Some(bad) = labels.data.iter().find(|&&l| l >= 10) {
                return Err(VisionError::Data(format!(
                    "{prefix}: label {bad} out of 0..10"
                )));
            }
            Ok(Split {
                images: images.data,
                labels: labels.data,
            })
        };
        Ok(Self {
            train: split("train")?,
            test: split("t10k")?,
        })
    }

    /// Reads from `dir`, else from `$FASHION_MNIST_DIR`, else from Debian's directory; a missing package is
    /// named in the error.
    pub fn locate(dir: Option<&Path>) -> Result<Self, VisionError> {
        let dir: PathBuf = match dir {
            Some(d) => d.to_path_buf(),
            None => std::env::var_os("FASHION_MNIST_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR)),
        };
        if !dir.join("train-images-idx3-ubyte.gz").exists() {
            return Err(VisionError::Data(format!(
                "Fashion-MNIST is not in {} (apt-get install dataset-fashion-mnist, or set FASHION_MNIST_DIR)",
                dir.display()
            )));
        }
        Self::load(&dir)
    }
}

/// An unsigned-byte IDX array.
struct Idx {
    dims: Vec<usize>,
    data: Vec<u8>,
}

fn read_idx(path: &Path, rank: usize) -> Result<Idx, VisionError> {
    let file = std::fs::File::open(path)
        .map_err(|e| VisionError::Data(format!("{}: {e}", path.display())))?;
    let mut bytes = Vec::new();
    GzDecoder::new(file)
        .read_to_end(&mut bytes)
        .map_err(|e| VisionError::Data(format!("{}: {e}", path.display())))?;
    parse_idx(&bytes, rank).map_err(|e| VisionError::Data(format!("{}: {e}", path.display())))
}

fn parse_idx(bytes: &[u8], rank: usize) -> Result<Idx, String> {
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err("not an IDX file".into());
    }
    if bytes[2] != 0x08 {
        return Err(format!(
            "element type {:#04x} is not unsigned byte",
            bytes[2]
        ));
    }
    if bytes[3] as usize != rank {
        return Err(format!("rank {} where {rank} was expected", bytes[3]));
    }
    let header = 4 + 4 * rank;
    if bytes.len() < header {
        return Err("truncated header".into());
    }
    let dims: Vec<usize> = (0..rank)
        .map(|i| {
            let b = &bytes[4 + 4 * i..8 + 4 * i];
            u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize
        })
        .collect();
    let len: usize = dims.iter().product();
    if bytes.len() != header + len {
        return Err(format!(
            "{} data bytes where the header promises {len}",
            bytes.len() - header
        ));
    }
    Ok(Idx {
        dims,
        data: bytes[header..].to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_small_idx_array_and_rejects_a_truncated_one() {
        let mut b = vec![0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3];
        b.extend([1, 2, 3, 4, 5, 6]);
        let idx = parse_idx(&b, 2).unwrap();
        assert_eq!(idx.dims, vec![2, 3]);
        assert_eq!(idx.data, vec![1, 2, 3, 4, 5, 6]);
        b.pop();
        assert_eq!(
            parse_idx(&b, 2).err().unwrap(),
            "5 data bytes where the header promises 6"
        );
        assert_eq!(
            parse_idx(&[0, 0, 9, 1], 1).err().unwrap(),
            "element type 0x09 is not unsigned byte"
        );
    }
}
