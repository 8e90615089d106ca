//! Why a message could not be decoded.

use thiserror::Error;

/// A message or envelope that cannot be understood. The text names what was wrong, so it can go into a
/// dead-letter entry as the reason.
#[derive(Debug, Error)]
pub enum ProtocolError {
    /// The bytes are not valid JSON (or not the JSON shape expected).
    #[error("invalid JSON in {what}: {source}")]
    Json {
        /// Which part was being decoded.
        what: &'static str,
        /// The parser's error.
        source: serde_json::Error,
    },
    /// The envelope or body has a field missing or of the wrong type.
    #[error("malformed {what}: {detail}")]
    Malformed {
        /// Which part was being decoded.
        what: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// Pickle is refused: decoding it would let any client run code in the worker.
    #[error(
        "refusing content type 'application/x-python-serialize' (pickle): it allows remote code execution; \
         send tasks with serializer 'json', 'msgpack' or 'yaml'"
    )]
    PickleRefused,
    /// A content type this worker does not know.
    #[error("unsupported content type {0:?}")]
    UnsupportedContentType(String),
    /// A compression this worker does not know.
    #[error("unsupported compression {0:?}")]
    UnsupportedCompression(String),
    /// The body could not be decompressed.
    #[error("cannot decompress body ({compression}): {detail}")]
    Decompress {
        /// The compression named by the message.
        compression: String,
        /// What went wrong.
        detail: String,
    },
    /// The body is not valid base64.
    #[error("invalid base64 body: {0}")]
    Base64(#[from] base64::DecodeError),
    /// msgpack decoding failed.
    #[error("invalid msgpack body: {0}")]
    Msgpack(String),
    /// YAML decoding failed.
    #[error("invalid YAML body: {0}")]
    Yaml(String),
    /// The body is not text in the declared encoding.
    #[error("body is not valid {0}")]
    Encoding(&'static str),
}

impl ProtocolError {
    pub(crate) fn malformed(what: &'static str, detail: impl Into<String>) -> Self {
        Self::Malformed {
            what,
            detail: detail.into(),
        }
    }
}
