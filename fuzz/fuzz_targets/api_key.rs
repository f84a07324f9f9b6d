//! API-key parsing (`ward::keyformat`): any text either parses or is refused, never a panic.
//! A key that parses is exactly the text given, re-forms from its parts to the same text, and
//! no longer parses after any one change of a body character (the checksum catches it). Its
//! redacted and Debug forms never show the random part. The input's first byte also picks a
//! character to change, so the fuzzer explores typos of the keys it finds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ward::keyformat::{check_prefix, ApiKey, KeyFormatError, BODY_LEN, RANDOM_LEN};
use ward_fuzz::write_seeds;

const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

fuzz_target!(
    init: {
        write_seeds(seeds());
    },
    |data: &[u8]| {
        let Some((&pick, rest)) = data.split_first() else {
            return;
        };
        let Ok(text) = std::str::from_utf8(rest) else {
            return;
        };
        let Ok(key) = ApiKey::parse(text) else {
            // Prefixes the parser refuses are refused by `generate` too.
            if let Some((issuer, env)) = text.split_once('_') {
                let env = env.split('_').next().unwrap_or("");
                if check_prefix(issuer, 16).is_err() || check_prefix(env, 32).is_err() {
                    assert!(ApiKey::generate(issuer, env).is_err());
                } else {
                    let fresh = ApiKey::generate(issuer, env).expect("valid prefixes generate");
                    let again = ApiKey::parse(fresh.expose()).expect("a generated key parses");
                    assert_eq!((again.issuer(), again.environment()), (issuer, env));
                }
            }
            return;
        };
        assert_eq!(key.expose(), text);
        let body = &text[text.len() - BODY_LEN..];
        assert_eq!(format!("{}_{}_{body}", key.issuer(), key.environment()), text);
        assert!(check_prefix(key.issuer(), 16).is_ok());
        assert!(check_prefix(key.environment(), 32).is_ok());
        // The random part never shows in what may be printed or logged.
        let random = &body[..RANDOM_LEN];
        assert!(!key.redacted().contains(&random[..8]));
        assert!(!format!("{key:?}").contains(&random[..8]));
        // Any one changed body character is caught by the checksum.
        let at = text.len() - BODY_LEN + usize::from(pick) % BODY_LEN;
        let mut typo = text.as_bytes().to_vec();
        let old = typo[at];
        let offset = 1 + usize::from(pick) % (BASE62.len() - 1);
        let position = BASE62.iter().position(|&c| c == old).expect("a base62 body");
        typo[at] = BASE62[(position + offset) % BASE62.len()];
        let typo = String::from_utf8(typo).expect("ASCII");
        assert_eq!(ApiKey::parse(&typo).err(), Some(KeyFormatError::Checksum));
    }
);

fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for (i, (issuer, env)) in [("ward", "prod"), ("w", "x"), ("a1b2c3d4e5f6g7h8", "dev")]
        .iter()
        .enumerate()
    {
        if let Ok(k) = ApiKey::generate(issuer, env) {
            let mut input = vec![i as u8 * 13];
            input.extend_from_slice(k.expose().as_bytes());
            out.push((format!("key-{i}"), input));
        }
    }
    out.push(("short".into(), b"\0ward_dev_0000".to_vec()));
    out
}
