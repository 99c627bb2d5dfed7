//! Tokens and roles: who may read, who may change the fleet, and which node is which.
//!
//! The tokens file holds operator, viewer and join tokens, each as the token
//! itself or as its SHA-256. Only hashes are kept in memory; a presented token
//! is hashed and compared against every configured hash in constant time.
//! Node tokens are issued at registration; their hashes live in the store.

use std::path::Path;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read the status API.
    Viewer,
    /// Read, apply, delete, and drive rollouts.
    Operator,
}

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A person or tool with a role.
    User {
        /// The token's name in the tokens file (`anonymous` without one).
        name: String,
        /// Its role.
        role: Role,
    },
    /// A join token: may register nodes, nothing else.
    Join {
        /// The token's name.
        name: String,
    },
    /// A registered node: may read its own assignment and write its own status.
    Node {
        /// The node's name.
        name: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TokensFile {
    #[serde(default)]
    tokens: Vec<UserTokenEntry>,
    #[serde(default)]
    join_tokens: Vec<JoinTokenEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserTokenEntry {
    name: String,
    role: Role,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    sha256: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JoinTokenEntry {
    name: String,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    sha256: Option<String>,
}

#[derive(Debug, Clone)]
enum Grant {
    User(Role),
    Join,
}

#[derive(Debug, Clone)]
struct Entry {
    name: String,
    sha256: [u8; 32],
    grant: Grant,
}

/// The configured tokens; `None` of them means the server runs open on loopback.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    entries: Vec<Entry>,
    open: bool,
}

/// Minimum length of a token given in clear, so that a typo'd short word never becomes a credential.
pub const MIN_TOKEN_LEN: usize = 16;

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn hash_of(name: &str, token: Option<String>, sha256: Option<String>) -> Result<[u8; 32], String> {
    match (token, sha256) {
        (Some(token), None) => {
            if token.len() < MIN_TOKEN_LEN {
                return Err(format!("token `{name}` is shorter than {MIN_TOKEN_LEN} characters; generate one with `openssl rand -hex 32`"));
            }
            Ok(digest(&token))
        }
        (None, Some(hex_digest)) => {
            let wrong = || {
                format!("token `{name}`: sha256 must be 64 hexadecimal characters (`printf %s TOKEN | sha256sum`)")
            };
            hex::decode(hex_digest.trim())
                .map_err(|_| wrong())?
                .try_into()
                .map_err(|_| wrong())
        }
        _ => Err(format!(
            "token `{name}`: give exactly one of `token` or `sha256`"
        )),
    }
}

impl Tokens {
    /// No tokens file: everyone is an operator, so the server must stay on loopback.
    pub fn open() -> Self {
        Tokens {
            entries: Vec::new(),
            open: true,
        }
    }

    /// True when running without a tokens file.
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Reads a tokens file (see docs/security.md for its format).
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the tokens file {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses the tokens file's text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: TokensFile = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
        let mut entries = Vec::new();
        for t in file.tokens {
            let sha256 = hash_of(&t.name, t.token, t.sha256)?;
            entries.push(Entry {
                name: t.name,
                sha256,
                grant: Grant::User(t.role),
            });
        }
        for t in file.join_tokens {
            let sha256 = hash_of(&t.name, t.token, t.sha256)?;
            entries.push(Entry {
                name: t.name,
                sha256,
                grant: Grant::Join,
            });
        }
        if entries.is_empty() {
            return Err(
                "the tokens file defines no tokens; add `tokens:` and `joinTokens:` entries".into(),
            );
        }
        let mut names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        names.sort();
        if let Some(pair) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(format!("token name `{}` is used twice", pair[0]));
        }
        Ok(Tokens {
            entries,
            open: false,
        })
    }

    /// The principal of a bearer token from the file, if any matches. Every entry is compared,
    /// without stopping at a match, so the time taken says nothing about which one matched.
    pub fn authenticate(&self, bearer: &str) -> Option<Principal> {
        let presented = digest(bearer);
        let mut found: Option<&Entry> = None;
        for entry in &self.entries {
            if bool::from(entry.sha256.ct_eq(&presented)) {
                found = Some(entry);
            }
        }
        found.map(|entry| match entry.grant {
            Grant::User(role) => Principal::User {
                name: entry.name.clone(),
                role,
            },
            Grant::Join => Principal::Join {
                name: entry.name.clone(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
tokens:
  - {name: alice, role: operator, token: "operator-token-0123456789"}
  - {name: grafana, role: viewer, sha256: "5f5e1b5f8ed8c7bb8bb57a57ff8d8a4f1c5bd5cc4a3fa2d4b2d3be6f4a5d3a90"}
joinTokens:
  - {name: boards, token: "join-token-0123456789abcdef"}
"#;

    #[test]
    fn authenticates_by_hash() {
        let tokens = Tokens::parse(FILE).unwrap();
        assert_eq!(
            tokens.authenticate("operator-token-0123456789"),
            Some(Principal::User {
                name: "alice".into(),
                role: Role::Operator
            })
        );
        assert_eq!(
            tokens.authenticate("join-token-0123456789abcdef"),
            Some(Principal::Join {
                name: "boards".into()
            })
        );
        assert_eq!(tokens.authenticate("operator-token-012345678"), None);
        assert!(!tokens.is_open());
    }

    #[test]
    fn rejects_bad_files() {
        assert!(Tokens::parse("tokens: []\n")
            .unwrap_err()
            .contains("no tokens"));
        assert!(
            Tokens::parse("tokens: [{name: a, role: operator, token: short}]")
                .unwrap_err()
                .contains("shorter")
        );
        assert!(
            Tokens::parse("tokens: [{name: a, role: admin, token: xxxxxxxxxxxxxxxxxxxx}]").is_err()
        );
        assert!(
            Tokens::parse("tokens: [{name: a, role: viewer, sha256: abc}]")
                .unwrap_err()
                .contains("64")
        );
        assert!(Tokens::parse("tokens: [{name: a, role: viewer}]")
            .unwrap_err()
            .contains("exactly one"));
        assert!(Tokens::parse("tokenz: []").is_err());
        let twice = "tokens: [{name: a, role: viewer, token: xxxxxxxxxxxxxxxxxxxx}, {name: a, role: viewer, token: yyyyyyyyyyyyyyyyyyyy}]";
        assert!(Tokens::parse(twice).unwrap_err().contains("twice"));
    }
}
