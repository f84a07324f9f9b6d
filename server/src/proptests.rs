//! Property tests of everything that parses untrusted input: secret names, API keys, policy
//! files, stored-record decoding and envelope opening. Each property either compares the
//! parser with an independent model of its grammar or states what must never happen (a panic,
//! a wrong plaintext). Run with `PROPTEST_CASES=N` for a longer search.

use crate::envelope::{random_key, Keyring, SealedValue};
use crate::error::Error;
use crate::model::SecretName;
use crate::policy::{glob, Policy, Verb};
use crate::store::{decode, encode};
use proptest::prelude::*;
use ward::keyformat::{ApiKey, KeyFormatError, BODY_LEN};
use zeroize::Zeroizing;

/// The name grammar, written independently of `SecretName::parse`.
fn name_model(s: &str) -> bool {
    let b = s.as_bytes();
    let allowed = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._/-".contains(&c);
    !b.is_empty()
        && b.len() <= 256
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|&c| allowed(c))
        && !b.windows(2).any(|w| w == b"//" || w == b"..")
        && b.last() != Some(&b'/')
}

/// CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320), bit by bit: the model of the
/// checksum in an API key, written independently of the table-driven `crc32fast` the key format
/// uses.
fn crc32_model(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// The six checksum characters a key body must end with: the CRC-32 of the 32 random
/// characters in base62 (digits, then upper case, then lower case), most significant first,
/// padded with '0'.
fn checksum_model(random: &str) -> String {
    const DIGITS: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut n = crc32_model(random.as_bytes());
    let mut out = [b'0'; 6];
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(n % 62) as usize];
        n /= 62;
    }
    String::from_utf8(out.to_vec()).unwrap()
}

/// Whether `body` (what follows the second '_') is a body the key format accepts: 32 base62
/// characters and their checksum.
fn body_model(body: &str) -> bool {
    body.len() == 38
        && body.bytes().all(|b| b.is_ascii_alphanumeric())
        && checksum_model(&body[..32]) == body[32..]
}

/// Strings mostly from the name alphabet, with some characters from outside it.
fn name_like() -> impl Strategy<Value = String> {
    let unit = prop_oneof![
        8 => prop::sample::select(b"abz09._/-".to_vec()).prop_map(char::from),
        1 => prop::sample::select(vec!['A', ' ', '\0', '\n', '*', 'é', '\u{202e}', '\\', ':']),
    ];
    prop::collection::vec(unit, 0..300).prop_map(|v| v.into_iter().collect())
}

/// A simple recursive glob, the model for `policy::glob`.
fn glob_model(p: &[char], t: &[char]) -> bool {
    match (p.first(), t.first()) {
        (None, None) => true,
        (Some('*'), _) => glob_model(&p[1..], t) || (!t.is_empty() && glob_model(p, &t[1..])),
        (Some('?'), Some(_)) => glob_model(&p[1..], &t[1..]),
        (Some(a), Some(b)) if a == b => glob_model(&p[1..], &t[1..]),
        _ => false,
    }
}

fn ring() -> Keyring {
    Keyring::new(vec![(1, Zeroizing::new(random_key().to_vec()))]).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn secret_names_follow_the_grammar(s in name_like()) {
        let parsed = SecretName::parse(&s);
        prop_assert_eq!(parsed.is_ok(), name_model(&s), "{:?}", s);
        if let Err(e) = parsed {
            prop_assert!(matches!(e, Error::InvalidArgument(_)));
        }
    }

    #[test]
    fn any_text_as_a_name_is_answered_not_panicked(s in any::<String>()) {
        let _ = SecretName::parse(&s);
    }

    #[test]
    fn generated_keys_parse_and_every_one_character_change_is_caught(
        issuer in "[a-z0-9]{1,16}",
        env in "[a-z0-9]{1,32}",
        pos in 0usize..BODY_LEN,
        replacement in prop::sample::select(
            b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz".to_vec()),
    ) {
        let key = ApiKey::generate(&issuer, &env).unwrap();
        let text = key.expose().to_owned();
        let again = ApiKey::parse(&text).unwrap();
        prop_assert_eq!((again.issuer(), again.environment()), (issuer.as_str(), env.as_str()));
        let body_start = text.len() - BODY_LEN;
        // What generate wrote carries the checksum the model computes.
        prop_assert!(body_model(&text[body_start..]), "{}", key.redacted());
        let mut bytes = text.clone().into_bytes();
        if bytes[body_start + pos] != replacement {
            bytes[body_start + pos] = replacement;
            let typo = String::from_utf8(bytes).unwrap();
            prop_assert_eq!(ApiKey::parse(&typo).err(), Some(KeyFormatError::Checksum));
        }
    }

    #[test]
    fn any_text_as_a_key_is_answered_not_panicked(s in any::<String>()) {
        if let Ok(k) = ApiKey::parse(&s) {
            // Whatever parses is exactly the text given and well-formed.
            prop_assert_eq!(k.expose(), s.as_str());
            prop_assert!(ward::keyformat::check_prefix(k.issuer(), 16).is_ok());
        }
    }

    #[test]
    fn parse_accepts_exactly_the_bodies_whose_checksum_matches(
        issuer in "[a-z0-9]{1,16}",
        env in "[a-z0-9]{1,32}",
        random in "[0-9A-Za-z]{32}",
        other in "[0-9A-Za-z]{6}",
        honest in any::<bool>(),
    ) {
        // Half the cases carry the model's checksum, half six random characters (which match
        // about once in 62^6).
        let sum = if honest { checksum_model(&random) } else { other };
        let text = format!("{issuer}_{env}_{random}{sum}");
        let matches = checksum_model(&random) == sum;
        match ApiKey::parse(&text) {
            Ok(k) => {
                prop_assert!(matches, "accepted a key whose checksum does not match");
                prop_assert_eq!(k.expose(), text.as_str());
            }
            Err(e) => {
                prop_assert!(!matches, "refused a key whose checksum matches: {:?}", e);
                prop_assert_eq!(e, KeyFormatError::Checksum);
            }
        }
        // Every one-character change of an accepted key is refused (CRC-32 catches every
        // single-character error).
        if matches {
            for pos in 0..BODY_LEN {
                let mut bytes = text.clone().into_bytes();
                let at = text.len() - BODY_LEN + pos;
                bytes[at] = if bytes[at] == b'z' { b'0' } else { b'z' };
                let typo = String::from_utf8(bytes).unwrap();
                prop_assert!(!body_model(&typo[typo.len() - BODY_LEN..]));
                prop_assert_eq!(ApiKey::parse(&typo).err(), Some(KeyFormatError::Checksum));
            }
        }
    }

    #[test]
    fn key_shaped_text_is_checked_to_the_last_character(
        s in "[a-z0-9]{1,4}_[a-z0-9]{1,4}_[0-9A-Za-z]{36,40}",
    ) {
        // Whatever the body's length, parse accepts it exactly when the model does.
        let body = s.splitn(3, '_').nth(2).unwrap();
        prop_assert_eq!(ApiKey::parse(&s).is_ok(), body_model(body), "{:?}", s);
    }

    #[test]
    fn glob_matches_its_model(
        p in "[ab*?]{0,8}",
        t in "[ab]{0,10}",
    ) {
        let (pc, tc): (Vec<char>, Vec<char>) = (p.chars().collect(), t.chars().collect());
        prop_assert_eq!(glob(&p, &t), glob_model(&pc, &tc), "{:?} {:?}", p, t);
    }

    #[test]
    fn any_text_as_a_policy_is_answered_not_panicked(s in any::<String>()) {
        let _ = Policy::parse(&s);
    }

    #[test]
    fn generated_policies_grant_exactly_what_they_say(
        ident in "[a-z*?]{1,6}",
        secret in "[a-z/*?]{1,8}",
        verb in prop::sample::select(Verb::ALL.to_vec()),
        who in "[a-z]{1,6}",
        name in "[a-z/]{1,8}",
    ) {
        let text = format!(
            "[[rule]]\nidentities = [{ident:?}]\nverbs = [{:?}]\nsecrets = [{secret:?}]\n",
            verb.name()
        );
        let policy = Policy::parse(&text).unwrap();
        let want = glob_model(&ident.chars().collect::<Vec<_>>(), &who.chars().collect::<Vec<_>>())
            && glob_model(&secret.chars().collect::<Vec<_>>(), &name.chars().collect::<Vec<_>>());
        prop_assert_eq!(policy.allows(&who, verb, &name, None), want);
        // Deny by default: no other verb is granted.
        for other in Verb::ALL.iter().filter(|v| **v != verb) {
            prop_assert!(!policy.allows(&who, *other, &name, None));
        }
    }

    #[test]
    fn any_bytes_as_a_stored_record_are_answered_not_panicked(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        for r in [
            decode::<SealedValue>("sealed value", &bytes).err(),
            decode::<crate::model::SecretRecord>("secret", &bytes).err(),
            decode::<crate::unseal::KeyringEntry>("keyring entry", &bytes).err(),
        ].into_iter().flatten() {
            prop_assert!(matches!(r, Error::DataLoss(_)), "{r:?}");
        }
        // Audit records have their own hashed encoding and decoder: an error, never a panic.
        let _ = crate::audit::decode(&bytes);
    }

    #[test]
    fn a_damaged_envelope_never_opens_to_other_plaintext(
        value in prop::collection::vec(any::<u8>(), 1..200),
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
    ) {
        let k = ring();
        let sealed = k.seal("p/name", 7, &value).unwrap();
        let mut bytes = encode(&sealed);
        for (at, mask) in &flips {
            let i = at.index(bytes.len());
            bytes[i] ^= mask;
        }
        match decode::<SealedValue>("sealed value", &bytes) {
            Err(e) => prop_assert!(matches!(e, Error::DataLoss(_))),
            Ok(damaged) => match k.open("p/name", 7, &damaged) {
                // Only a change that postcard decodes back to the same fields can open.
                Ok(plain) => {
                    prop_assert_eq!(&damaged, &sealed);
                    prop_assert_eq!(&plain[..], &value[..]);
                }
                Err(e) => prop_assert!(matches!(e, Error::DataLoss(_)), "{e:?}"),
            },
        }
    }
}

#[test]
fn the_checksum_model_matches_the_crc32_check_value() {
    // The standard check value of CRC-32/IEEE: CRC("123456789") = 0xCBF43926.
    assert_eq!(crc32_model(b"123456789"), 0xCBF4_3926);
    assert_eq!(crc32_model(b""), 0);
    assert_eq!(checksum_model(""), "000000");
    // 0xCBF43926 = 3421780262 = 3·62^5 + 45·62^4 + 35·62^3 + 27·62^2 + 22·62 + 14.
    assert_eq!(checksum_model("123456789"), "3jZRME");
}
