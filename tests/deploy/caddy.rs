//! `deploy/caddy/Caddyfile`: the reverse proxy to the relay's default port,
//! the health check path, and the relay flags its comments show.

use derp_relay::config::Config;

use crate::common::{comment_flags_are_real, port_of, read};

#[test]
fn caddy_proxies_to_the_relay() {
    let conf = read("deploy/caddy/Caddyfile");
    let want = format!(
        "reverse_proxy {{$DERP_UPSTREAM:127.0.0.1:{}}}",
        port_of(&Config::default().addr)
    );
    assert!(conf.contains(&want), "Caddyfile: {want}");
    assert!(conf.contains("health_uri /healthz"));
    comment_flags_are_real("deploy/caddy/Caddyfile");
}
