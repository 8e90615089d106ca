//! Body serializers and kombu compression. Bodies decode to JSON values whatever their content type, so the
//! rest of the worker sees one shape. Pickle is refused on purpose (it executes code chosen by the sender).

use crate::error::ProtocolError;
use serde_json::Value;
use std::io::Read;

/// A body serializer the worker accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentType {
    /// `application/json` (Celery's default).
    Json,
    /// `application/x-msgpack`.
    Msgpack,
    /// `application/x-yaml`.
    Yaml,
}

impl ContentType {
    /// Reads a `content-type` value; pickle and unknown types are errors that say why.
    pub fn parse(s: &str) -> Result<Self, ProtocolError> {
        match s {
            "application/json" | "json" => Ok(Self::Json),
            "application/x-msgpack" | "application/msgpack" | "msgpack" => Ok(Self::Msgpack),
            "application/x-yaml" | "application/yaml" | "yaml" => Ok(Self::Yaml),
            "application/x-python-serialize" | "pickle" => Err(ProtocolError::PickleRefused),
            other => Err(ProtocolError::UnsupportedContentType(other.to_string())),
        }
    }

    /// The MIME name kombu uses.
    pub fn mime(self) -> &'static str {
        match self {
            Self::Json => "application/json",
            Self::Msgpack => "application/x-msgpack",
            Self::Yaml => "application/x-yaml",
        }
    }

    /// Decodes a (decompressed) body.
    pub fn decode(self, body: &[u8]) -> Result<Value, ProtocolError> {
        match self {
            Self::Json => serde_json::from_slice(body).map_err(|source| ProtocolError::Json {
                what: "body",
                source,
            }),
            Self::Msgpack => {
                rmp_serde::from_slice(body).map_err(|e| ProtocolError::Msgpack(e.to_string()))
            }
            Self::Yaml => {
                let text =
                    std::str::from_utf8(body).map_err(|_| ProtocolError::Encoding("utf-8"))?;
                serde_yaml::from_str(text).map_err(|e| ProtocolError::Yaml(e.to_string()))
            }
        }
    }

    /// Encodes a body value (JSON byte-compatible with Python).
    pub fn encode(self, value: &Value) -> Result<Vec<u8>, ProtocolError> {
        match self {
            Self::Json => Ok(crate::json::to_vec(value)),
            Self::Msgpack => {
                rmp_serde::to_vec(value).map_err(|e| ProtocolError::Msgpack(e.to_string()))
            }
            Self::Yaml => serde_yaml::to_string(value)
                .map(String::into_bytes)
                .map_err(|e| ProtocolError::Yaml(e.to_string())),
        }
    }
}

/// The largest body a compressed message may expand to (a task message is kilobytes; a few bytes of zlib
/// can claim gigabytes).
pub const MAX_DECOMPRESSED: u64 = 64 * 1024 * 1024;

/// Undoes kombu compression named by the `compression` header. kombu registers zlib under
/// `application/x-gzip`, so both zlib and gzip streams are recognised by their magic bytes. A body that
/// expands past [`MAX_DECOMPRESSED`] is refused, not allocated.
pub fn decompress(compression: &str, body: &[u8]) -> Result<Vec<u8>, ProtocolError> {
    let err = |detail: String| ProtocolError::Decompress {
        compression: compression.to_string(),
        detail,
    };
    match compression {
        "application/x-gzip" | "application/gzip" | "gzip" | "zlib" | "application/x-zlib"
        | "application/zlib" => {
            let mut out = Vec::with_capacity(body.len().saturating_mul(4).min(1 << 20));
            let reader: Box<dyn Read + '_> = if body.starts_with(&[0x1f, 0x8b]) {
                Box::new(flate2::read::MultiGzDecoder::new(body))
            } else {
                Box::new(flate2::read::ZlibDecoder::new(body))
            };
            reader
                .take(MAX_DECOMPRESSED + 1)
                .read_to_end(&mut out)
                .map_err(|e| err(e.to_string()))?;
            if out.len() as u64 > MAX_DECOMPRESSED {
                return Err(err(format!(
                    "it expands past {} MiB",
                    MAX_DECOMPRESSED / (1024 * 1024)
                )));
            }
            Ok(out)
        }
        other => Err(ProtocolError::UnsupportedCompression(other.to_string())),
    }
}

/// Decodes a body given the message's content type, content encoding and optional compression header.
pub fn decode_body(
    content_type: &str,
    content_encoding: &str,
    compression: Option<&str>,
    body: &[u8],
) -> Result<Value, ProtocolError> {
    let ct = ContentType::parse(content_type)?;
    let raw;
    let body = match compression {
        Some(c) => {
            raw = decompress(c, body)?;
            &raw[..]
        }
        None => body,
    };
    if ct != ContentType::Msgpack && !matches!(content_encoding, "utf-8" | "utf8" | "binary" | "") {
        return Err(ProtocolError::UnsupportedContentType(format!(
            "{content_type}; encoding {content_encoding}"
        )));
    }
    ct.decode(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::Compression;
    use serde_json::json;
    use std::io::Write;

    #[test]
    fn a_decompression_bomb_is_refused_without_allocating_it() {
        // 100 MiB of zeros compress to ~100 KB.
        let mut enc = flate2::write::ZlibEncoder::new(Vec::new(), Compression::best());
        let chunk = vec![0u8; 1 << 20];
        for _ in 0..100 {
            enc.write_all(&chunk).unwrap();
        }
        let bomb = enc.finish().unwrap();
        assert!(bomb.len() < 1 << 20);
        let e = decompress("application/x-gzip", &bomb)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "cannot decompress body (application/x-gzip): it expands past 64 MiB"
        );
    }

    #[test]
    fn pickle_is_refused_with_reason() {
        let err = decode_body(
            "application/x-python-serialize",
            "binary",
            None,
            b"\x80\x04.",
        )
        .unwrap_err();
        assert!(matches!(err, ProtocolError::PickleRefused));
        assert!(err.to_string().contains("remote code execution"));
    }

    #[test]
    fn json_msgpack_yaml_roundtrip() {
        let v = json!([[2, 3], {"k": "v"}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]);
        for ct in [ContentType::Json, ContentType::Msgpack, ContentType::Yaml] {
            let bytes = ct.encode(&v).unwrap();
            assert_eq!(
                decode_body(ct.mime(), "utf-8", None, &bytes).unwrap(),
                v,
                "{ct:?}"
            );
        }
    }

    #[test]
    fn zlib_and_gzip_bodies() {
        let body = br#"[[1], {}, {}]"#;
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), Compression::default());
        z.write_all(body).unwrap();
        let zlib = z.finish().unwrap();
        let mut g = flate2::write::GzEncoder::new(Vec::new(), Compression::default());
        g.write_all(body).unwrap();
        let gzip = g.finish().unwrap();
        for (name, data) in [
            ("application/x-gzip", &zlib),
            ("zlib", &zlib),
            ("application/x-gzip", &gzip),
        ] {
            let v = decode_body("application/json", "utf-8", Some(name), data).unwrap();
            assert_eq!(v, json!([[1], {}, {}]));
        }
        assert!(matches!(
            decode_body(
                "application/json",
                "utf-8",
                Some("application/x-snappy"),
                body
            ),
            Err(ProtocolError::UnsupportedCompression(_))
        ));
    }
}
