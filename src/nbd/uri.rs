//! NBD URIs, as qemu and libnbd write them (the NBD URI specification): where a remote
//! export is. `nbd+unix:///EXPORT?socket=PATH` (a unix socket) and `nbd://HOST[:PORT]/EXPORT`
//! (TCP, port 10809 by default; an IPv6 host in brackets). The export name is the path
//! without its leading `/`, percent-decoded; empty is the server's default export. TLS
//! (`nbds://`) and vsock are refused: not supported. Pure.

use std::fmt;
use std::path::PathBuf;
use thiserror::Error;

/// The NBD port (IANA).
pub const DEFAULT_PORT: u16 = 10809;

/// Why a string is not an NBD URI snapblk can use.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum UriError {
    #[error(
        "{0:?} is not an NBD URI (nbd+unix:///EXPORT?socket=PATH or nbd://HOST[:PORT]/EXPORT)"
    )]
    NotNbd(String),
    #[error("{0}: TLS (nbds://) and vsock are not supported")]
    Unsupported(String),
    #[error("{uri}: {why}")]
    Invalid { uri: String, why: &'static str },
}

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    Unix(PathBuf),
    Tcp { host: String, port: u16 },
}

/// A parsed NBD URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub transport: Transport,
    /// The export name ("" = the default export).
    pub export: String,
}

/// Whether `s` looks like an NBD URI at all (its scheme), so a caller can tell it from a path.
pub fn is_nbd_uri(s: &str) -> bool {
    s.split_once("://")
        .is_some_and(|(scheme, _)| scheme.starts_with("nbd"))
}

/// Percent-decodes `s`; `None` on a bad escape or bytes that are not UTF-8.
fn decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Percent-encodes what cannot stand in a URI path or query value.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &c in s.as_bytes() {
        if c.is_ascii_alphanumeric() || b"-._~/:".contains(&c) {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}

impl NbdUri {
    /// Parses `nbd+unix:///EXPORT?socket=PATH` or `nbd://HOST[:PORT]/EXPORT`.
    pub fn parse(uri: &str) -> Result<Self, UriError> {
        let bad = |why| UriError::Invalid {
            uri: uri.to_string(),
            why,
        };
        let (scheme, rest) = uri
            .split_once("://")
            .ok_or_else(|| UriError::NotNbd(uri.to_string()))?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = decode(path).ok_or(bad("bad percent-encoding in the export name"))?;
        let mut socket = None;
        for kv in query.into_iter().flat_map(|q| q.split('&')) {
            match kv.split_once('=') {
                Some(("socket", v)) => {
                    socket = Some(decode(v).ok_or(bad("bad percent-encoding in the socket"))?)
                }
                _ => return Err(bad("unknown query parameter (only socket= is understood)")),
            }
        }
        let transport = match scheme {
            "nbd+unix" => {
                if !authority.is_empty() {
                    return Err(bad(
                        "a unix socket URI has no host (nbd+unix:///EXPORT?socket=PATH)",
                    ));
                }
                let s = socket.ok_or(bad("missing ?socket=PATH"))?;
                if s.is_empty() {
                    return Err(bad("empty socket path"));
                }
                Transport::Unix(PathBuf::from(s))
            }
            "nbd" | "nbd+tcp" => {
                if socket.is_some() {
                    return Err(bad("socket= belongs to nbd+unix:// URIs"));
                }
                let (host, port) = split_host_port(authority).ok_or(bad("bad host or port"))?;
                Transport::Tcp { host, port }
            }
            s if s.starts_with("nbds") || s.contains("vsock") => {
                return Err(UriError::Unsupported(uri.to_string()))
            }
            _ => return Err(UriError::NotNbd(uri.to_string())),
        };
        Ok(NbdUri { transport, export })
    }
}

/// `HOST`, `HOST:PORT`, `[V6]` or `[V6]:PORT`.
fn split_host_port(a: &str) -> Option<(String, u16)> {
    let (host, port) = if let Some(rest) = a.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        match after {
            "" => (h, None),
            p => (h, Some(p.strip_prefix(':')?)),
        }
    } else {
        match a.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (a, None),
        }
    };
    if host.is_empty() {
        return None;
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => p.parse().ok().filter(|&p| p != 0)?,
    };
    Some((host.to_string(), port))
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let export = encode(&self.export);
        match &self.transport {
            Transport::Unix(p) => write!(
                f,
                "nbd+unix:///{export}?socket={}",
                encode(&p.display().to_string())
            ),
            Transport::Tcp { host, port } if host.contains(':') => {
                write!(f, "nbd://[{host}]:{port}/{export}")
            }
            Transport::Tcp { host, port } => write!(f, "nbd://{host}:{port}/{export}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse_as_qemu_and_libnbd_write_them() {
        let u = NbdUri::parse("nbd+unix:///golden?socket=/run/nbd.sock").unwrap();
        assert_eq!(u.transport, Transport::Unix("/run/nbd.sock".into()));
        assert_eq!(u.export, "golden");
        assert_eq!(u.to_string(), "nbd+unix:///golden?socket=/run/nbd.sock");
        let u = NbdUri::parse("nbd+unix://?socket=/tmp/a%20b.sock").unwrap();
        assert_eq!(u.export, "");
        assert_eq!(u.transport, Transport::Unix("/tmp/a b.sock".into()));
        let u = NbdUri::parse("nbd://storage.example:10900/disk%2F1").unwrap();
        assert_eq!(
            u.transport,
            Transport::Tcp {
                host: "storage.example".into(),
                port: 10900
            }
        );
        assert_eq!(u.export, "disk/1");
        let u = NbdUri::parse("nbd://10.0.0.1").unwrap();
        assert_eq!(
            u.transport,
            Transport::Tcp {
                host: "10.0.0.1".into(),
                port: DEFAULT_PORT
            }
        );
        let u = NbdUri::parse("nbd://[::1]:7000/x").unwrap();
        assert_eq!(u.to_string(), "nbd://[::1]:7000/x");
        for bad in [
            "nbd+unix:///x",
            "nbd+unix://host/x?socket=/s",
            "nbd://:80/x",
            "nbd://h:99999/x",
            "nbd://h/x?socket=/s",
            "nbd://h/%zz",
            "nbd+unix:///x?socket=/s&tls=on",
        ] {
            assert!(
                matches!(NbdUri::parse(bad), Err(UriError::Invalid { .. })),
                "{bad}"
            );
        }
        assert!(matches!(
            NbdUri::parse("nbds://h/x"),
            Err(UriError::Unsupported(_))
        ));
        assert!(matches!(
            NbdUri::parse("/images/golden.img"),
            Err(UriError::NotNbd(_))
        ));
        assert!(is_nbd_uri("nbd://h/x") && is_nbd_uri("nbds+unix:///x?socket=/s"));
        assert!(!is_nbd_uri("/images/nbd://x"));
        assert!(!is_nbd_uri("golden.img"));
    }
}
