//! Bearer-token authentication for the one admin user, and the admin
//! kubeconfig that carries the token.

use std::fs;
use std::path::Path;

use anyhow::Result;
use base64::Engine;

/// Paths that answer without credentials (probes and the version), as on
/// a real apiserver with anonymous auth limited to health checks.
pub fn is_public(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz" | "/livez" | "/version")
        || path.starts_with("/healthz/")
        || path.starts_with("/readyz/")
        || path.starts_with("/livez/")
}

/// Reads `DIR/admin.token`, creating it (0600) on first start.
pub fn ensure_token(dir: &Path) -> Result<String> {
    let path = dir.join("admin.token");
    if let Ok(t) = fs::read_to_string(&path) {
        let t = t.trim().to_string();
        if !t.is_empty() {
            return Ok(t);
        }
    }
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("getrandom: {e}"))?;
    let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    super::tls::write_private(&path, format!("{token}\n").as_bytes())?;
    Ok(token)
}

/// Whether the `Authorization` header carries the token (constant time in
/// the token's bytes).
pub fn authorized(header: Option<&str>, token: &str) -> bool {
    let Some(h) = header else { return false };
    let Some(given) = h.strip_prefix("Bearer ").map(str::trim) else {
        return false;
    };
    let (a, b) = (given.as_bytes(), token.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `DIR/kubeconfig.yaml` for the admin user (0600: it holds the token).
pub fn write_kubeconfig(dir: &Path, server: &str, ca_pem: &str, token: &str) -> Result<()> {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let yaml = format!(
        "apiVersion: v1
kind: Config
clusters:
- name: kcontrol
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: admin
  user:
    token: {token}
contexts:
- name: kcontrol
  context:
    cluster: kcontrol
    user: admin
    namespace: default
current-context: kcontrol
preferences: {{}}
"
    );
    super::tls::write_private(&dir.join("kubeconfig.yaml"), yaml.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_check() {
        assert!(authorized(Some("Bearer abc"), "abc"));
        assert!(!authorized(Some("Bearer abd"), "abc"));
        assert!(!authorized(Some("Basic abc"), "abc"));
        assert!(!authorized(None, "abc"));
        assert!(is_public("/readyz"));
        assert!(!is_public("/api"));
    }
}
