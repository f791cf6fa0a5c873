//! `deploy/nginx/derp-relay.conf`: both upgrades passed through (DERP and
//! WebSocket), buffering off, timeouts well above the ping interval, the
//! upstream on the relay's default port, and the relay flags its comments show.

use derp_relay::config::Config;

use crate::common::{comment_flags_are_real, port_of, read, secs};

#[test]
fn nginx_passes_both_upgrades_with_long_timeouts() {
    let conf = read("deploy/nginx/derp-relay.conf");
    let lines: Vec<&str> = conf
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    let has = |s: &str| lines.iter().any(|l| l.contains(s));
    assert!(has("map $http_upgrade $connection_upgrade"));
    assert!(has("proxy_set_header Upgrade $http_upgrade;"));
    assert!(has("proxy_set_header Connection $connection_upgrade;"));
    assert!(has("proxy_http_version 1.1;"));
    assert!(has("proxy_buffering off;"));
    assert!(has("proxy_set_header X-Forwarded-For"));
    let ping = Config::default().ping_interval;
    for directive in ["proxy_read_timeout", "proxy_send_timeout"] {
        let v = lines
            .iter()
            .find_map(|l| l.strip_prefix(directive))
            .unwrap_or_else(|| panic!("no {directive}"));
        let d = secs(v.trim().trim_end_matches(';'));
        assert!(
            d > ping * 2,
            "{directive} {d:?} well above the ping interval"
        );
    }
    let upstream = lines
        .iter()
        .find_map(|l| l.strip_prefix("server 127.0.0.1:"))
        .expect("upstream server");
    let port: u16 = upstream.trim_end_matches(';').parse().unwrap();
    assert_eq!(port, port_of(&Config::default().addr));
    comment_flags_are_real("deploy/nginx/derp-relay.conf");
}
