//! Consul's `jwt` auth method for tests of `consul.login` on a machine without a Kubernetes API
//! server: a test-only ES256 key pair (made per issuer, with `ring`, which the sidecar already
//! builds), JWTs shaped like a service account token (`service_account` claim, audience,
//! expiry), and the auth method and binding rules set up through the management token. The login
//! and logout calls and the bindings are the ones a `kubernetes` method serves.

use std::time::{SystemTime, UNIX_EPOCH};

use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde_json::{Value, json};

use crate::ConsulAgent;

/// The audience the test auth method accepts.
pub const AUDIENCE: &str = "consul-registrar-test";

/// Signs JWTs with a key pair of its own.
pub struct JwtIssuer {
    key: EcdsaKeyPair,
    rng: SystemRandom,
}

impl Default for JwtIssuer {
    fn default() -> Self {
        Self::new()
    }
}

impl JwtIssuer {
    pub fn new() -> JwtIssuer {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .expect("generate an ES256 key");
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .expect("read the ES256 key");
        JwtIssuer { key, rng }
    }

    /// The public key as a PEM SubjectPublicKeyInfo (Consul's `JWTValidationPubKeys`).
    pub fn public_key_pem(&self) -> String {
        // The DER prefix of a P-256 SubjectPublicKeyInfo, before the 65-byte uncompressed point.
        let mut der = vec![
            0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06,
            0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
        ];
        der.extend_from_slice(self.key.public_key().as_ref());
        let b64 = base64(&der, false);
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).expect("base64 is ASCII"))
            .collect();
        format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            lines.join("\n")
        )
    }

    /// A signed JWT with `claims`.
    pub fn sign(&self, claims: &Value) -> String {
        let header = base64(br#"{"alg":"ES256","typ":"JWT"}"#, true);
        let payload = base64(claims.to_string().as_bytes(), true);
        let input = format!("{header}.{payload}");
        let sig = self
            .key
            .sign(&self.rng, input.as_bytes())
            .expect("sign the JWT");
        format!("{input}.{}", base64(sig.as_ref(), true))
    }

    /// A token for service account `name` with audience `audience`, valid for an hour; `nonce`
    /// makes two tokens of the same account differ (a rotation).
    pub fn service_account_token(&self, name: &str, audience: &str, nonce: u64) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        self.sign(&json!({
            "iss": "consul-registrar-testkit",
            "sub": format!("system:serviceaccount:default:{name}"),
            "aud": [audience],
            "iat": now,
            "nbf": now - 60,
            "exp": now + 3600,
            "jti": format!("{name}-{nonce}"),
            "service_account": name,
        }))
    }

    /// Creates the `jwt` auth method `name` on `consul` that accepts this issuer's tokens with
    /// [`AUDIENCE`], mapping the `service_account` claim to `value.service_account`.
    pub async fn create_auth_method(&self, consul: &ConsulAgent, name: &str) {
        let method = json!({
            "Name": name,
            "Type": "jwt",
            "Config": {
                "JWTValidationPubKeys": [self.public_key_pem()],
                "JWTSupportedAlgs": ["ES256"],
                "BoundAudiences": [AUDIENCE],
                "ClaimMappings": {"service_account": "service_account"},
            },
        });
        let status = consul
            .put("/v1/acl/auth-method", &method)
            .await
            .expect("create the auth method");
        assert_eq!(status, 200, "auth method {name}");
    }
}

/// A binding rule of auth method `method`: `bind_type` (`service`, `policy`, ...) with
/// `bind_name`, for tokens whose claims match `selector` (empty: every token).
pub async fn create_binding_rule(
    consul: &ConsulAgent,
    method: &str,
    bind_type: &str,
    bind_name: &str,
    selector: &str,
) {
    let rule = json!({
        "AuthMethod": method,
        "BindType": bind_type,
        "BindName": bind_name,
        "Selector": selector,
    });
    let status = consul
        .put("/v1/acl/binding-rule", &rule)
        .await
        .expect("create the binding rule");
    assert_eq!(status, 200, "binding rule {bind_type} {bind_name}");
}

/// The tokens that logins with `method` made and that still exist (`AccessorID`s).
pub async fn login_tokens(consul: &ConsulAgent, method: &str) -> Vec<String> {
    let (status, tokens) = consul
        .get(&format!("/v1/acl/tokens?authmethod={method}"))
        .await
        .expect("list tokens");
    assert_eq!(status, 200, "list tokens of {method}");
    tokens
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| t["AccessorID"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The SecretID of the token `accessor` (read with the management token).
pub async fn secret_of(consul: &ConsulAgent, accessor: &str) -> Option<String> {
    let (status, token) = consul
        .get(&format!("/v1/acl/token/{accessor}"))
        .await
        .expect("read token");
    (status == 200)
        .then(|| token["SecretID"].as_str().map(str::to_string))
        .flatten()
}

/// Base64 (RFC 4648), URL-safe without padding (`url`) or standard with padding.
fn base64(data: &[u8], url: bool) -> String {
    let alphabet: &[u8; 64] = if url {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    } else {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    };
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(alphabet[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    if !url {
        while !out.len().is_multiple_of(4) {
            out.push('=');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(super::base64(b"foobar", false), "Zm9vYmFy");
        assert_eq!(super::base64(b"fooba", false), "Zm9vYmE=");
        assert_eq!(super::base64(b"foob", true), "Zm9vYg");
        assert_eq!(super::base64(&[0xfb, 0xff], true), "-_8");
    }
}
