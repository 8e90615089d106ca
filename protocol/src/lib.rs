//! The Celery wire protocol, with no I/O: what a task message, a signature and a result meta look like on the
//! wire, and how their bytes are produced and read so Python Celery 5.7 accepts them unchanged.
//!
//! # Layout
//! - [`json`]: JSON byte-compatible with Python's `json.dumps` (separators, `ensure_ascii`, float repr).
//! - [`repr`]: Python `repr()` of JSON values, for the `argsrepr`/`kwargsrepr` headers.
//! - [`time`]: `datetime.isoformat()` and its parser (ETA, expires, `date_done`).
//! - [`codec`]: content types (JSON, msgpack, YAML; pickle refused) and kombu compression.
//! - [`signature`]: canvas signatures as Celery serializes them.
//! - [`message`]: task messages, protocol v2 (encode and decode) and v1 (decode).
//! - [`envelope`]: kombu's Redis envelope around a message (base64 body, delivery info).
//! - [`headers`]: a v2 header table sorted into the headers we model and the rest.
//! - [`receive`]: a consumer's one-pass decoding of an envelope (same outcome as [`envelope`]'s maps).
//! - [`event`]: Celery events (body, routing key, envelope).
//! - [`result`]: task states, exceptions and the result meta stored by result backends.
//! - [`error`]: the decode error type.

pub mod codec;
pub mod envelope;
pub mod error;
pub mod event;
pub mod headers;
pub mod json;
pub mod message;
pub mod pidbox;
pub mod receive;
pub mod repr;
pub mod result;
pub mod signature;
pub mod time;

pub use error::ProtocolError;
pub use message::{Embed, TaskHeaders, TaskMessage, TaskProperties};
pub use result::{ExceptionInfo, ResultMeta, State};
pub use signature::Signature;

/// JSON values as the protocol carries them (objects keep insertion order).
pub use serde_json::{Map, Value};
