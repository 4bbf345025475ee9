//! Token signatures checked with `ring`, the crypto library the broker
//! already carries for TLS (rustls).
//!
//! `jsonwebtoken` leaves its cryptography to a [`CryptoProvider`]; its own
//! providers are RustCrypto (RSA, two NIST curves, Ed25519 and their big
//! integer code: about 40 s of a two-core release build) or aws-lc (a C
//! library built with cmake). `ring` verifies every algorithm
//! `jsonwebtoken` names, so the broker installs this provider before it
//! builds a verifier and links one crypto library, not two.
//!
//! The broker only verifies tokens; a signer is refused.

use jsonwebtoken::crypto::{CryptoProvider, JwkUtils, JwtSigner, JwtVerifier};
use jsonwebtoken::errors::{Error, ErrorKind};
use jsonwebtoken::{Algorithm, DecodingKey, DecodingKeyKind, EncodingKey};
use ring::{hmac, signature};

static RING_PROVIDER: CryptoProvider = CryptoProvider {
    signer_factory: refuse_signer,
    verifier_factory: verifier,
    jwk_utils: JwkUtils::new_unimplemented(),
};

/// Makes `ring` the process's `jsonwebtoken` provider. Idempotent; call it
/// before the first token is verified.
pub fn install() {
    // Err means a provider is installed already: ours, from an earlier
    // call, or one a test process chose to sign tokens with.
    let _ = RING_PROVIDER.install_default();
}

fn refuse_signer(_: &Algorithm, _: &EncodingKey) -> Result<Box<dyn JwtSigner>, Error> {
    Err(ErrorKind::Provider("muxgate verifies tokens and never signs one".into()).into())
}

/// How a signature is checked: a MAC with the shared secret, or a public
/// key algorithm over the key's bytes (DER or a raw point) or its RSA
/// components (from a JWK).
enum Check {
    Hmac(hmac::Key),
    PublicKey(&'static dyn signature::VerificationAlgorithm, Vec<u8>),
    RsaComponents(&'static signature::RsaParameters, Vec<u8>, Vec<u8>),
}

struct RingVerifier {
    algorithm: Algorithm,
    check: Check,
}

fn verifier(algorithm: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>, Error> {
    use Algorithm::*;
    // A key of another family is refused before any check: an RSA public
    // key must never serve as an HMAC secret (algorithm confusion).
    if key.family() != algorithm.family() {
        return Err(ErrorKind::InvalidKeyFormat.into());
    }
    let mac = |alg| -> Result<Check, Error> {
        Ok(Check::Hmac(hmac::Key::new(alg, key.try_get_hmac_secret()?)))
    };
    let rsa = |params: &'static signature::RsaParameters| match key.kind() {
        DecodingKeyKind::SecretOrDer(der) => Check::PublicKey(params, der.clone()),
        DecodingKeyKind::RsaModulusExponent { n, e } => {
            Check::RsaComponents(params, n.clone(), e.clone())
        }
    };
    let raw = |alg: &'static dyn signature::VerificationAlgorithm| match key.kind() {
        DecodingKeyKind::SecretOrDer(bytes) => Ok(Check::PublicKey(alg, bytes.clone())),
        DecodingKeyKind::RsaModulusExponent { .. } => Err(Error::from(ErrorKind::InvalidKeyFormat)),
    };
    let check = match algorithm {
        HS256 => mac(hmac::HMAC_SHA256)?,
        HS384 => mac(hmac::HMAC_SHA384)?,
        HS512 => mac(hmac::HMAC_SHA512)?,
        RS256 => rsa(&signature::RSA_PKCS1_2048_8192_SHA256),
        RS384 => rsa(&signature::RSA_PKCS1_2048_8192_SHA384),
        RS512 => rsa(&signature::RSA_PKCS1_2048_8192_SHA512),
        PS256 => rsa(&signature::RSA_PSS_2048_8192_SHA256),
        PS384 => rsa(&signature::RSA_PSS_2048_8192_SHA384),
        PS512 => rsa(&signature::RSA_PSS_2048_8192_SHA512),
        // JWS carries ECDSA signatures as r || s, ring's "fixed" encoding.
        ES256 => raw(&signature::ECDSA_P256_SHA256_FIXED)?,
        ES384 => raw(&signature::ECDSA_P384_SHA384_FIXED)?,
        EdDSA => raw(&signature::ED25519)?,
    };
    Ok(Box::new(RingVerifier {
        algorithm: *algorithm,
        check,
    }))
}

impl jsonwebtoken::signature::Verifier<Vec<u8>> for RingVerifier {
    fn verify(&self, msg: &[u8], sig: &Vec<u8>) -> Result<(), jsonwebtoken::signature::Error> {
        let checked = match &self.check {
            Check::Hmac(key) => hmac::verify(key, msg, sig),
            Check::PublicKey(alg, key) => {
                signature::UnparsedPublicKey::new(*alg, key).verify(msg, sig)
            }
            Check::RsaComponents(params, n, e) => {
                signature::RsaPublicKeyComponents { n, e }.verify(params, msg, sig)
            }
        };
        checked.map_err(|_| jsonwebtoken::signature::Error::new())
    }
}

impl JwtVerifier for RingVerifier {
    fn algorithm(&self) -> Algorithm {
        self.algorithm
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEYS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/keys");

    /// (private PEM, public PEM) of a new key on `alg`'s curve.
    fn generated(alg: &'static rcgen::SignatureAlgorithm) -> (String, String) {
        let pair = rcgen::KeyPair::generate_for(alg).unwrap();
        (pair.serialize_pem(), pair.public_key_pem())
    }

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!("{KEYS}/{name}")).unwrap()
    }

    /// Every algorithm: a signature made by RustCrypto verifies, and the
    /// same signature over another message or under another key fails.
    #[test]
    fn verifies_what_rust_crypto_signs_for_every_algorithm() {
        use Algorithm::*;
        let rsa = (fixture("rsa-private.pem"), fixture("rsa-public.pem"));
        let p256 = (fixture("ec-private.pem"), fixture("ec-public.pem"));
        let p384 = generated(&rcgen::PKCS_ECDSA_P384_SHA384);
        let ed = generated(&rcgen::PKCS_ED25519);
        let other_ed = generated(&rcgen::PKCS_ED25519);
        let secret = b"a shared secret of enough length".as_slice();
        let cases: Vec<(Algorithm, EncodingKey, DecodingKey, DecodingKey)> = vec![
            (
                HS256,
                EncodingKey::from_secret(secret),
                DecodingKey::from_secret(secret),
                DecodingKey::from_secret(b"another"),
            ),
            (
                HS384,
                EncodingKey::from_secret(secret),
                DecodingKey::from_secret(secret),
                DecodingKey::from_secret(b"another"),
            ),
            (
                HS512,
                EncodingKey::from_secret(secret),
                DecodingKey::from_secret(secret),
                DecodingKey::from_secret(b"another"),
            ),
            (
                ES256,
                EncodingKey::from_ec_pem(&p256.0).unwrap(),
                DecodingKey::from_ec_pem(&p256.1).unwrap(),
                DecodingKey::from_ec_pem(generated(&rcgen::PKCS_ECDSA_P256_SHA256).1.as_bytes())
                    .unwrap(),
            ),
            (
                ES384,
                EncodingKey::from_ec_pem(p384.0.as_bytes()).unwrap(),
                DecodingKey::from_ec_pem(p384.1.as_bytes()).unwrap(),
                DecodingKey::from_ec_pem(generated(&rcgen::PKCS_ECDSA_P384_SHA384).1.as_bytes())
                    .unwrap(),
            ),
            (
                EdDSA,
                EncodingKey::from_ed_pem(ed.0.as_bytes()).unwrap(),
                DecodingKey::from_ed_pem(ed.1.as_bytes()).unwrap(),
                DecodingKey::from_ed_pem(other_ed.1.as_bytes()).unwrap(),
            ),
        ]
        .into_iter()
        .chain([RS256, RS384, RS512, PS256, PS384, PS512].map(|alg| {
            let public = DecodingKey::from_rsa_pem(&rsa.1).unwrap();
            // Another modulus: another key.
            (
                alg,
                EncodingKey::from_rsa_pem(&rsa.0).unwrap(),
                public,
                DecodingKey::from_rsa_raw_components(&[0xc5; 256], &[1, 0, 1]),
            )
        }))
        .collect();
        let signer = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.signer_factory;
        let msg = b"eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9".to_vec();
        for (alg, private, public, wrong) in cases {
            let sig = signer(&alg, &private).unwrap().try_sign(&msg).unwrap();
            let v = verifier(&alg, &public).unwrap();
            assert_eq!(v.algorithm(), alg);
            assert!(v.verify(&msg, &sig).is_ok(), "{alg:?} must verify");
            assert!(
                v.verify(b"another message", &sig).is_err(),
                "{alg:?}: other message"
            );
            let mut flipped = sig.clone();
            flipped[0] ^= 1;
            assert!(
                v.verify(&msg, &flipped).is_err(),
                "{alg:?}: altered signature"
            );
            assert!(
                verifier(&alg, &wrong).unwrap().verify(&msg, &sig).is_err(),
                "{alg:?}: other key"
            );
        }
    }

    /// An RSA key given as a JWK's modulus and exponent verifies as well.
    #[test]
    fn verifies_with_rsa_components() {
        let private = EncodingKey::from_rsa_pem(&fixture("rsa-private.pem")).unwrap();
        let signer = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.signer_factory;
        let msg = b"header.claims".to_vec();
        let sig = signer(&Algorithm::RS256, &private)
            .unwrap()
            .try_sign(&msg)
            .unwrap();
        let (n, e) = (jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER
            .jwk_utils
            .extract_rsa_public_key_components)(private.inner())
        .unwrap();
        let public = DecodingKey::from_rsa_raw_components(&n, &e);
        assert!(verifier(&Algorithm::RS256, &public)
            .unwrap()
            .verify(&msg, &sig)
            .is_ok());
    }

    /// A key of another family is no key for the algorithm: above all an
    /// RSA public key is not taken as an HMAC secret.
    #[test]
    fn refuses_a_key_of_another_family() {
        let rsa = DecodingKey::from_rsa_pem(&fixture("rsa-public.pem")).unwrap();
        let ec = DecodingKey::from_ec_pem(&fixture("ec-public.pem")).unwrap();
        let hmac = DecodingKey::from_secret(b"secret");
        for (alg, key) in [
            (Algorithm::HS256, &rsa),
            (Algorithm::HS256, &ec),
            (Algorithm::RS256, &hmac),
            (Algorithm::ES256, &rsa),
            (Algorithm::EdDSA, &ec),
        ] {
            let Err(e) = verifier(&alg, key) else {
                panic!("{alg:?} must refuse a key of another family");
            };
            assert_eq!(e.kind(), &ErrorKind::InvalidKeyFormat);
        }
    }

    #[test]
    fn refuses_to_sign() {
        let key = EncodingKey::from_secret(b"secret");
        assert!(refuse_signer(&Algorithm::HS256, &key).is_err());
    }
}
