//! Ward's API-key format: `<issuer>_<environment>_<body>`, where body is 32 base62 characters
//! from the OS CSPRNG followed by the 6-character base62 CRC32 of those 32 characters.
//!
//! This is GitHub's token scheme: a secret scanner can tell a real candidate from a look-alike
//! offline, without asking the server, and the server rejects a mistyped key before any lookup.
//! 32 base62 characters carry log2(62^32) ≈ 190 bits of entropy.

use rand::{rngs::OsRng, RngCore};
use std::fmt;
use zeroize::Zeroizing;

/// Base62 alphabet, digits first (the order GitHub's checksum encoding uses).
const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// Random characters in a key body.
pub const RANDOM_LEN: usize = 32;
/// Checksum characters in a key body.
pub const CHECKSUM_LEN: usize = 6;
/// Characters in a key body.
pub const BODY_LEN: usize = RANDOM_LEN + CHECKSUM_LEN;
/// Longest issuer prefix accepted.
pub const MAX_ISSUER_LEN: usize = 16;
/// Longest environment accepted inside a key.
pub const MAX_ENV_LEN: usize = 32;
/// Longest well-formed key.
pub const MAX_KEY_LEN: usize = MAX_ISSUER_LEN + 1 + MAX_ENV_LEN + 1 + BODY_LEN;

/// Why a string is not a well-formed Ward API key. Never carries the key itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyFormatError {
    /// Not `<issuer>_<environment>_<body>`.
    Shape,
    /// Issuer or environment empty, too long, or outside `[a-z0-9]`.
    Prefix,
    /// Body has the wrong length or a character outside base62.
    Body,
    /// The checksum does not match the random part.
    Checksum,
}

impl fmt::Display for KeyFormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Shape => "not of the form <issuer>_<environment>_<body>",
            Self::Prefix => "issuer or environment is empty, too long or not [a-z0-9]",
            Self::Body => "key body is not 38 base62 characters",
            Self::Checksum => "key checksum does not match",
        })
    }
}

impl std::error::Error for KeyFormatError {}

/// A well-formed API key. The plaintext is zeroized on drop and never printed by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey {
    text: Zeroizing<String>,
    env_start: usize,
    body_start: usize,
}

impl ApiKey {
    /// Generates a fresh key for `issuer` and `environment` (each `[a-z0-9]{1,16|32}`).
    pub fn generate(issuer: &str, environment: &str) -> Result<Self, KeyFormatError> {
        check_prefix(issuer, MAX_ISSUER_LEN)?;
        check_prefix(environment, MAX_ENV_LEN)?;
        let mut text = Zeroizing::new(String::with_capacity(
            issuer.len() + environment.len() + 2 + BODY_LEN,
        ));
        text.push_str(issuer);
        text.push('_');
        text.push_str(environment);
        text.push('_');
        let body_start = text.len();
        let mut random = Zeroizing::new([0u8; RANDOM_LEN]);
        fill_base62(&mut random[..]);
        // Every byte is an ALPHABET character, so this is ASCII.
        text.extend(random.iter().map(|&b| b as char));
        text.push_str(&checksum(&random[..]));
        Ok(Self {
            text,
            env_start: issuer.len() + 1,
            body_start,
        })
    }

    /// Parses and checks a presented key: shape, prefix characters, body and checksum.
    pub fn parse(s: &str) -> Result<Self, KeyFormatError> {
        if s.len() > MAX_KEY_LEN || !s.is_ascii() {
            return Err(KeyFormatError::Shape);
        }
        let mut parts = s.splitn(3, '_');
        let (Some(issuer), Some(env), Some(body)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(KeyFormatError::Shape);
        };
        check_prefix(issuer, MAX_ISSUER_LEN)?;
        check_prefix(env, MAX_ENV_LEN)?;
        if body.len() != BODY_LEN || !body.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(KeyFormatError::Body);
        }
        let (random, sum) = body.split_at(RANDOM_LEN);
        if checksum(random.as_bytes()) != sum {
            return Err(KeyFormatError::Checksum);
        }
        Ok(Self {
            text: Zeroizing::new(s.to_owned()),
            env_start: issuer.len() + 1,
            body_start: issuer.len() + env.len() + 2,
        })
    }

    /// The whole key. Handle with care: this is the secret.
    pub fn expose(&self) -> &str {
        &self.text
    }

    /// The issuer prefix.
    pub fn issuer(&self) -> &str {
        &self.text[..self.env_start - 1]
    }

    /// The environment named in the key.
    pub fn environment(&self) -> &str {
        &self.text[self.env_start..self.body_start - 1]
    }

    /// A preview safe to show a person: the prefix and the last four characters.
    pub fn redacted(&self) -> String {
        let tail = &self.text[self.text.len() - 4..];
        format!("{}_{}_…{}", self.issuer(), self.environment(), tail)
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ApiKey").field(&self.redacted()).finish()
    }
}

/// Checks an issuer or environment for use inside a key.
pub fn check_prefix(s: &str, max: usize) -> Result<(), KeyFormatError> {
    if s.is_empty()
        || s.len() > max
        || !s
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Err(KeyFormatError::Prefix);
    }
    Ok(())
}

/// Fills `out` with uniformly random base62 characters (rejection sampling: a byte ≥ 248 is
/// drawn again, so no character is more likely than another).
fn fill_base62(out: &mut [u8]) {
    let mut pool = Zeroizing::new([0u8; 64]);
    let mut i = 0;
    while i < out.len() {
        OsRng.fill_bytes(&mut pool[..]);
        for &b in pool.iter() {
            if b < 248 {
                out[i] = ALPHABET[(b % 62) as usize];
                i += 1;
                if i == out.len() {
                    break;
                }
            }
        }
    }
}

/// Base62 CRC32 (IEEE) of `data`, left-padded with '0' to six characters.
fn checksum(data: &[u8]) -> String {
    let mut n = crc32fast::hash(data);
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(n % 62) as usize];
        n /= 62;
    }
    // Base62 digits are ASCII.
    out.iter().map(|&b| b as char).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_and_differ() {
        let a = ApiKey::generate("ward", "prod").unwrap();
        let b = ApiKey::generate("ward", "prod").unwrap();
        assert_ne!(a.expose(), b.expose());
        let p = ApiKey::parse(a.expose()).unwrap();
        assert_eq!(p.issuer(), "ward");
        assert_eq!(p.environment(), "prod");
        assert_eq!(a.expose().len(), "ward_prod_".len() + BODY_LEN);
    }

    #[test]
    fn checksum_catches_a_changed_character() {
        let k = ApiKey::generate("ward", "dev").unwrap();
        let mut s = k.expose().to_owned();
        let i = "ward_dev_".len() + 3;
        let c = if &s[i..=i] == "a" { "b" } else { "a" };
        s.replace_range(i..=i, c);
        assert_eq!(ApiKey::parse(&s), Err(KeyFormatError::Checksum));
    }

    #[test]
    fn malformed_keys_are_rejected() {
        for bad in [
            "",
            "ward",
            "ward_dev",
            "ward_dev_short",
            "Ward_dev_0000",
            "ward__x",
            "wärd_dev_x",
        ] {
            assert!(ApiKey::parse(bad).is_err(), "{bad}");
        }
        let long = format!("ward_dev_{}", "a".repeat(200));
        assert_eq!(ApiKey::parse(&long), Err(KeyFormatError::Shape));
    }

    #[test]
    fn debug_does_not_show_the_key() {
        let k = ApiKey::generate("ward", "dev").unwrap();
        let shown = format!("{k:?}");
        assert!(!shown.contains(&k.expose()[9..30]));
    }

    #[test]
    fn known_checksum_vector() {
        // CRC32("") = 0 encodes as six zeros; a fixed input gives a fixed output.
        assert_eq!(checksum(b""), "000000");
        assert_eq!(checksum(b"123456789"), {
            // CRC32 check value 0xCBF43926 in base62.
            let mut n: u32 = 0xCBF4_3926;
            let mut s = [b'0'; 6];
            for slot in s.iter_mut().rev() {
                *slot = ALPHABET[(n % 62) as usize];
                n /= 62;
            }
            String::from_utf8(s.to_vec()).unwrap()
        });
    }
}
