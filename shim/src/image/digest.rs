//! Content digests (`sha256:<64 hex digits>`): the one check of their form, and the
//! check of bytes against one as they stream past.

use sha2::{Digest as _, Sha256};

/// A digest as OCI writes it, known to be `sha256:` and 64 lower-case hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Digest(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("digest {0:?} is not sha256:<64 lower-case hex digits>")]
pub struct BadDigest(pub String);

impl Digest {
    pub fn parse(s: &str) -> Result<Self, BadDigest> {
        let ok = s.strip_prefix("sha256:").is_some_and(|h| {
            h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        });
        if ok {
            Ok(Digest(s.to_string()))
        } else {
            Err(BadDigest(s.to_string()))
        }
    }

    /// The 64 hex digits (the name of a cache entry).
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The bytes did not hash to the digest they were fetched by.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("its {bytes} bytes hash to {actual}, not to {expected}")]
pub struct Mismatch {
    pub expected: String,
    pub actual: String,
    pub bytes: u64,
}

/// Hashes bytes as they pass and checks them against the expected digest at the end.
pub struct Verifier {
    expected: Digest,
    hash: Sha256,
    bytes: u64,
}

impl Verifier {
    pub fn new(expected: Digest) -> Self {
        Verifier {
            expected,
            hash: Sha256::new(),
            bytes: 0,
        }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.hash.update(bytes);
        self.bytes += bytes.len() as u64;
    }

    /// The byte count, if the bytes hashed to the expected digest.
    pub fn finish(self) -> Result<u64, Mismatch> {
        let actual = format!("sha256:{:x}", self.hash.finalize());
        if actual == self.expected.0 {
            Ok(self.bytes)
        } else {
            Err(Mismatch {
                expected: self.expected.0,
                actual,
                bytes: self.bytes,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn only_sha256_with_64_lower_case_hex_digits_is_a_digest() {
        assert_eq!(Digest::parse(EMPTY).unwrap().hex().len(), 64);
        for bad in [
            "sha256:12",
            "sha512:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            "sha256:../../../../etc/passwd/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            "",
        ] {
            assert_eq!(Digest::parse(bad), Err(BadDigest(bad.to_string())), "{bad}");
        }
    }

    #[test]
    fn streamed_bytes_are_checked_against_the_digest() {
        let v = Verifier::new(Digest::parse(EMPTY).unwrap());
        assert_eq!(v.finish(), Ok(0));
        let mut v = Verifier::new(Digest::parse(EMPTY).unwrap());
        v.update(b"x");
        let e = v.finish().unwrap_err();
        assert_eq!(e.bytes, 1);
        assert!(e.to_string().contains(EMPTY), "{e}");
    }
}
