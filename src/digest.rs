//! Content digests: blake3, always the full 32 bytes, printed as 64 lowercase hex digits.

use std::fmt;
use std::str::FromStr;

/// A full blake3 digest. Never truncated: names in the store are whole digests.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest([u8; 32]);

impl Digest {
    pub fn of(bytes: &[u8]) -> Self {
        Digest(*blake3::hash(bytes).as_bytes())
    }

    pub fn to_hex(&self) -> String {
        self.hex().to_string()
    }

    /// The 64 hex digits without allocating (what a manifest hashes, once per entry).
    pub fn hex(&self) -> impl AsRef<str> + fmt::Display {
        blake3::Hash::from_bytes(self.0).to_hex()
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Digest(bytes)
    }
}

impl From<blake3::Hash> for Digest {
    fn from(hash: blake3::Hash) -> Self {
        Digest(*hash.as_bytes())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.to_hex())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("expected 64 lowercase hex digits, got {0:?}")]
pub struct DigestParseError(pub String);

impl FromStr for Digest {
    type Err = DigestParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // Lowercase only: one spelling per digest, so store names never alias.
        let ok = s.len() == 64
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !ok {
            return Err(DigestParseError(s.to_string()));
        }
        let hash = blake3::Hash::from_hex(s).map_err(|_| DigestParseError(s.to_string()))?;
        Ok(hash.into())
    }
}

macro_rules! digest_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
        pub struct $name(pub Digest);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl FromStr for $name {
            type Err = DigestParseError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                s.parse().map($name)
            }
        }
    };
}

digest_newtype!(
    /// Names a working_dir package: the digest of its canonical manifest.
    PackageDigest
);
digest_newtype!(
    /// Names a resolved runtime environment: the digest of its canonical description.
    EnvId
);
digest_newtype!(
    /// Names a virtualenv in the store: the digest of what decides its contents.
    EnvKey
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_strictness() {
        let d = Digest::of(b"renv");
        assert_eq!(d.to_hex().parse::<Digest>().unwrap(), d);
        assert!(d.to_hex().to_uppercase().parse::<Digest>().is_err());
        assert!("abc".parse::<Digest>().is_err());
        assert!(format!("{}g", &d.to_hex()[1..]).parse::<Digest>().is_err());
    }
}
