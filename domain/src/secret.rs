//! Secrets kept per tenant in the database (shop tokens, webhook secrets) are sealed with ChaCha20-Poly1305
//! under a key derived from `CELERIAC_SECRET_KEY` (platform.md §4): the database holds only
//! `nonce || ciphertext || tag`, and a value sealed for one tenant and purpose cannot be opened as another's
//! (both are bound as associated data).

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use thiserror::Error;

/// Why a secret could not be sealed or opened.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SecretError {
    /// No key configured.
    #[error(
        "CELERIAC_SECRET_KEY is not set: it encrypts the secrets kept per tenant (use 32 random bytes, e.g. `openssl rand -hex 32`)"
    )]
    NoKey,
    /// The key is too short to be a key.
    #[error(
        "CELERIAC_SECRET_KEY is too short: use at least 32 characters (e.g. `openssl rand -hex 32`)"
    )]
    WeakKey,
    /// The stored value does not open with this key (another key, or tampered).
    #[error("a stored secret does not open with CELERIAC_SECRET_KEY (was the key changed?)")]
    Undecryptable,
}

/// Seals and opens per-tenant secrets.
pub struct Sealer {
    key: LessSafeKey,
    rng: SystemRandom,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(***)")
    }
}

impl Sealer {
    /// From `CELERIAC_SECRET_KEY`.
    pub fn from_env() -> Result<Self, SecretError> {
        Self::new(&std::env::var("CELERIAC_SECRET_KEY").map_err(|_| SecretError::NoKey)?)
    }

    /// From a key text (at least 32 characters); the AEAD key is its SHA-256.
    pub fn new(text: &str) -> Result<Self, SecretError> {
        if text.trim().len() < 32 {
            return Err(SecretError::WeakKey);
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, text.trim().as_bytes());
        let key = UnboundKey::new(&CHACHA20_POLY1305, digest.as_ref())
            .map_err(|_| SecretError::WeakKey)?;
        Ok(Self {
            key: LessSafeKey::new(key),
            rng: SystemRandom::new(),
        })
    }

    /// Seals `plain` for `context` (e.g. `shopify-token:<tenant id>`).
    pub fn seal(&self, context: &str, plain: &str) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).expect("the OS random source");
        let mut out = plain.as_bytes().to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context.as_bytes()),
                &mut out,
            )
            .expect("sealing cannot fail for in-memory buffers");
        let mut sealed = nonce.to_vec();
        sealed.extend(out);
        sealed
    }

    /// Opens what [`Sealer::seal`] made for the same `context`.
    pub fn open(&self, context: &str, sealed: &[u8]) -> Result<String, SecretError> {
        if sealed.len() < NONCE_LEN {
            return Err(SecretError::Undecryptable);
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce =
            Nonce::try_assume_unique_for_key(nonce).map_err(|_| SecretError::Undecryptable)?;
        let mut buf = body.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(context.as_bytes()), &mut buf)
            .map_err(|_| SecretError::Undecryptable)?;
        String::from_utf8(plain.to_vec()).map_err(|_| SecretError::Undecryptable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_secrets_open_only_with_their_key_and_context() {
        let s = Sealer::new("0123456789abcdef0123456789abcdef").unwrap();
        let sealed = s.seal("shopify-token:t1", "shpat_secret");
        assert!(!String::from_utf8_lossy(&sealed).contains("shpat_secret"));
        assert_eq!(s.open("shopify-token:t1", &sealed).unwrap(), "shpat_secret");
        assert_eq!(
            s.open("shopify-token:t2", &sealed),
            Err(SecretError::Undecryptable)
        );
        let other = Sealer::new("fedcba9876543210fedcba9876543210").unwrap();
        assert_eq!(
            other.open("shopify-token:t1", &sealed),
            Err(SecretError::Undecryptable)
        );
        assert_ne!(
            s.seal("c", "x"),
            s.seal("c", "x"),
            "a fresh nonce each time"
        );
        assert_eq!(Sealer::new("short").unwrap_err(), SecretError::WeakKey);
    }
}
