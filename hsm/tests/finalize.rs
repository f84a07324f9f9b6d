//! `finalize()` in a process of its own: it ends PKCS#11 for the whole process.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use ward_hsm::{HsmError, KeyWrapper, Pkcs11Config, Pkcs11Wrapper};
use zeroize::Zeroizing;

#[test]
fn finalize_ends_the_library() {
    let dir = tempfile::tempdir().unwrap();
    let conf = ward_hsm::softhsm::write_config(dir.path()).unwrap();
    ward_hsm::softhsm::export_conf(&conf);
    let module = ward_hsm::softhsm::find_module().expect("SoftHSM module");

    // Nothing loaded yet: nothing to do.
    ward_hsm::pkcs11::finalize().unwrap();

    Pkcs11Wrapper::init_token(&module, "ward-fin", "so-pin-1234", "user-pin-1234").unwrap();
    let cfg = Pkcs11Config::new(&module, "ward-fin", Zeroizing::new("user-pin-1234".into()));
    let w = Pkcs11Wrapper::open(cfg.clone()).unwrap();
    w.create_master_key("mk").unwrap();
    let blob = w.wrap("mk", b"aad", &[9; 32]).unwrap();
    assert_eq!(w.unwrap("mk", b"aad", &blob).unwrap().as_slice(), &[9; 32]);

    ward_hsm::pkcs11::finalize().unwrap();
    // Idempotent.
    ward_hsm::pkcs11::finalize().unwrap();

    assert!(matches!(
        w.wrap("mk", b"aad", &[9; 32]),
        Err(HsmError::Unavailable(_))
    ));
    assert!(matches!(
        Pkcs11Wrapper::open(cfg),
        Err(HsmError::Unavailable(_))
    ));
}
