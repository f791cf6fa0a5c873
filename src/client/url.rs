//! Where the relay is: a `http(s)://` or `ws(s)://` URL parsed into the
//! transport, TLS, host, port and path the rest of the client needs. It is kept
//! apart so a bad address is refused with a clear message before any socket is
//! opened, and so `host:port` is written one way (IPv6 bracketed) everywhere.

use super::error::ClientError;

/// A relay address: `http(s)://` means `Upgrade: DERP`, `ws(s)://` WebSocket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayUrl {
    pub websocket: bool,
    pub tls: bool,
    /// Host name or IP literal, without IPv6 brackets.
    pub host: String,
    pub port: u16,
    /// Path and query; `/derp` when the URL has none.
    pub path: String,
}

impl RelayUrl {
    /// Parses `http://`, `https://`, `ws://` or `wss://` URLs; the path
    /// defaults to `/derp` and the port to the scheme's.
    pub fn parse(text: &str) -> Result<Self, ClientError> {
        let bad = |why: String| ClientError::Url {
            url: text.to_owned(),
            why,
        };
        let uri: http::Uri = text.trim().parse().map_err(|e| bad(format!("{e}")))?;
        let (websocket, tls) = match uri.scheme_str() {
            Some("http") => (false, false),
            Some("https") => (false, true),
            Some("ws") => (true, false),
            Some("wss") => (true, true),
            Some(other) => {
                return Err(bad(format!(
                    "scheme {other:?} is not one of http, https, ws, wss"
                )));
            }
            None => {
                return Err(bad(
                    "no scheme: use http://, https://, ws:// or wss://".into()
                ));
            }
        };
        let host = uri.host().ok_or_else(|| bad("no host".into()))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let path = match uri.path_and_query().map(|p| p.as_str()) {
            None | Some("") | Some("/") => "/derp".to_owned(),
            Some(p) => p.to_owned(),
        };
        Ok(RelayUrl {
            websocket,
            tls,
            host,
            port,
            path,
        })
    }

    /// `host:port`, with brackets around an IPv6 literal.
    pub fn authority(&self) -> String {
        authority(&self.host, self.port)
    }

    pub fn scheme(&self) -> &'static str {
        match (self.websocket, self.tls) {
            (false, false) => "http",
            (false, true) => "https",
            (true, false) => "ws",
            (true, true) => "wss",
        }
    }

    /// What the transport is called in messages.
    pub fn transport(&self) -> &'static str {
        if self.websocket {
            "WebSocket"
        } else {
            "Upgrade: DERP"
        }
    }
}

impl std::fmt::Display for RelayUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}{}", self.scheme(), self.authority(), self.path)
    }
}

/// `host:port`, bracketing IPv6 literals.
pub fn authority(host: &str, port: u16) -> String {
    if host.parse::<std::net::Ipv6Addr>().is_ok() {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_default_path_and_port() {
        let u = RelayUrl::parse("https://derp.example.com").unwrap();
        assert_eq!((u.tls, u.websocket, u.port), (true, false, 443));
        assert_eq!(u.path, "/derp");
        assert_eq!(u.to_string(), "https://derp.example.com:443/derp");
        let u = RelayUrl::parse("ws://127.0.0.1:8443/derp").unwrap();
        assert_eq!((u.tls, u.websocket, u.port), (false, true, 8443));
        let u = RelayUrl::parse("wss://[::1]:9/x").unwrap();
        assert_eq!(u.host, "::1");
        assert_eq!(u.authority(), "[::1]:9");
        assert_eq!(u.path, "/x");
        assert!(RelayUrl::parse("ftp://x").is_err());
        assert!(RelayUrl::parse("derp.example.com").is_err());
    }
}
