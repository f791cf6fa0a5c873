//! `derp-relay derpmap`: the DERP map entry that points Tailscale clients at
//! this relay, in the two shapes operators paste it into: JSON (a Tailscale
//! policy file's `derpMap`, or a map headscale fetches from `derp.urls`) and
//! headscale's YAML file format (`derp.paths`).
//!
//! Field names follow Tailscale's `tailcfg.DERPMap`. Getting them wrong fails
//! silently (clients ignore the region), which is why this is generated.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use serde::Serialize;

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Format {
    /// Tailscale's JSON `DERPMap` (policy file `derpMap`, headscale `derp.urls`).
    Json,
    /// headscale's YAML file for `derp.paths`.
    Headscale,
}

#[derive(clap::Args)]
pub struct Args {
    /// Public DNS name clients connect to with TLS (the certificate's name).
    #[arg(long)]
    hostname: String,
    /// Region ID; 900-999 are reserved for self-hosted regions.
    #[arg(long, default_value_t = 900, value_parser = clap::value_parser!(u32).range(1..))]
    region_id: u32,
    /// Short region code shown in `tailscale netcheck`.
    #[arg(long, default_value = "myrelay")]
    region_code: String,
    /// Human-readable region name.
    #[arg(long, default_value = "My Relay")]
    region_name: String,
    /// TLS port clients connect to (the terminator's, not the relay's 8443).
    #[arg(long, default_value_t = 443, value_parser = clap::value_parser!(u16).range(1..))]
    port: u16,
    /// STUN port to advertise (the relay's --stun-addr port), or -1 when the
    /// relay runs with --stun=false and nothing else answers STUN on this host.
    #[arg(long, default_value_t = 3478, allow_negative_numbers = true, value_parser = parse_stun_port)]
    stun_port: i32,
    /// Node name [default: the region ID followed by "a", e.g. 900a].
    #[arg(long)]
    node_name: Option<String>,
    /// Fixed public IPv4 address (skips DNS on clients).
    #[arg(long)]
    ipv4: Option<Ipv4Addr>,
    /// Fixed public IPv6 address.
    #[arg(long)]
    ipv6: Option<Ipv6Addr>,
    /// Add "OmitDefaultRegions": true so clients use only this map (JSON only).
    #[arg(long)]
    omit_default_regions: bool,
    /// Output format.
    #[arg(long, value_enum, default_value = "json")]
    format: Format,
}

fn parse_stun_port(s: &str) -> Result<i32, String> {
    match s.trim().parse::<i32>() {
        Ok(-1) => Ok(-1),
        Ok(p) if (1..=65535).contains(&p) => Ok(p),
        // Tailscale reads 0 as "the default, 3478": say so rather than guess.
        Ok(0) => Err("0 means Tailscale's default 3478; write 3478, or -1 for no STUN".into()),
        _ => Err(format!("{s:?} is not a port (1-65535) or -1")),
    }
}

#[derive(Serialize)]
struct DerpMap {
    #[serde(
        rename = "OmitDefaultRegions",
        skip_serializing_if = "std::ops::Not::not"
    )]
    omit_default_regions: bool,
    #[serde(rename = "Regions")]
    regions: BTreeMap<String, Region>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct Region {
    #[serde(rename = "RegionID")]
    region_id: u32,
    region_code: String,
    region_name: String,
    nodes: Vec<Node>,
}

#[derive(Serialize)]
struct Node {
    #[serde(rename = "Name")]
    name: String,
    #[serde(rename = "RegionID")]
    region_id: u32,
    #[serde(rename = "HostName")]
    host_name: String,
    #[serde(rename = "IPv4", skip_serializing_if = "Option::is_none")]
    ipv4: Option<String>,
    #[serde(rename = "IPv6", skip_serializing_if = "Option::is_none")]
    ipv6: Option<String>,
    #[serde(rename = "STUNPort")]
    stun_port: i32,
    #[serde(rename = "STUNOnly")]
    stun_only: bool,
    #[serde(rename = "DERPPort")]
    derp_port: u16,
}

pub fn run(a: Args) -> Result<(), String> {
    let map = build(&a)?;
    let text = match a.format {
        Format::Json => {
            serde_json::to_string_pretty(&map).map_err(|e| format!("encoding JSON: {e}"))? + "\n"
        }
        Format::Headscale => to_headscale_yaml(&map),
    };
    print!("{text}");
    if a.stun_port == -1 {
        eprintln!(
            "note: STUNPort is -1: clients will not use this host for STUN and find their \
             public address through other regions' STUN"
        );
    }
    Ok(())
}

fn build(a: &Args) -> Result<DerpMap, String> {
    let host = a.hostname.trim();
    if host.is_empty() || host.contains("://") || host.contains('/') || host.contains(' ') {
        return Err(format!(
            "--hostname {:?}: want a bare DNS name like derp.example.com (no scheme, path or port)",
            a.hostname
        ));
    }
    if host
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        && host.parse::<Ipv6Addr>().is_err()
    {
        return Err(format!(
            "--hostname {host:?}: give the port with --port, not in the host name"
        ));
    }
    for (flag, v) in [
        ("--region-code", &a.region_code),
        ("--region-name", &a.region_name),
    ] {
        if v.trim().is_empty() {
            return Err(format!("{flag} must not be empty"));
        }
    }
    let name = a
        .node_name
        .clone()
        .unwrap_or_else(|| format!("{}a", a.region_id));
    let node = Node {
        name,
        region_id: a.region_id,
        host_name: host.to_owned(),
        ipv4: a.ipv4.map(|ip| ip.to_string()),
        ipv6: a.ipv6.map(|ip| ip.to_string()),
        stun_port: a.stun_port,
        stun_only: false,
        derp_port: a.port,
    };
    let region = Region {
        region_id: a.region_id,
        region_code: a.region_code.trim().to_owned(),
        region_name: a.region_name.trim().to_owned(),
        nodes: vec![node],
    };
    Ok(DerpMap {
        omit_default_regions: a.omit_default_regions,
        regions: BTreeMap::from([(a.region_id.to_string(), region)]),
    })
}

/// headscale reads its DERP map file with lowercased field names. Strings are
/// written JSON-quoted, which YAML reads as double-quoted scalars, so no name
/// or host can break the document.
fn to_headscale_yaml(map: &DerpMap) -> String {
    let q = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
    let mut y = String::from(
        "# DERP map for headscale's derp.paths, generated by `derp-relay derpmap`.\nregions:\n",
    );
    for (id, r) in &map.regions {
        y.push_str(&format!("  {id}:\n"));
        y.push_str(&format!("    regionid: {}\n", r.region_id));
        y.push_str(&format!("    regioncode: {}\n", q(&r.region_code)));
        y.push_str(&format!("    regionname: {}\n", q(&r.region_name)));
        y.push_str("    nodes:\n");
        for n in &r.nodes {
            y.push_str(&format!("      - name: {}\n", q(&n.name)));
            y.push_str(&format!("        regionid: {}\n", n.region_id));
            y.push_str(&format!("        hostname: {}\n", q(&n.host_name)));
            if let Some(ip) = &n.ipv4 {
                y.push_str(&format!("        ipv4: {}\n", q(ip)));
            }
            if let Some(ip) = &n.ipv6 {
                y.push_str(&format!("        ipv6: {}\n", q(ip)));
            }
            y.push_str(&format!("        stunport: {}\n", n.stun_port));
            y.push_str(&format!("        stunonly: {}\n", n.stun_only));
            y.push_str(&format!("        derpport: {}\n", n.derp_port));
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(host: &str) -> Args {
        Args {
            hostname: host.into(),
            region_id: 900,
            region_code: "myrelay".into(),
            region_name: "My Relay".into(),
            port: 443,
            stun_port: -1,
            node_name: None,
            ipv4: None,
            ipv6: None,
            omit_default_regions: false,
            format: Format::Json,
        }
    }

    #[test]
    fn json_has_tailscale_field_names() {
        let v = serde_json::to_value(build(&args("derp.example.com")).unwrap()).unwrap();
        let node = &v["Regions"]["900"]["Nodes"][0];
        assert_eq!(node["Name"], "900a");
        assert_eq!(node["HostName"], "derp.example.com");
        assert_eq!(node["STUNPort"], -1);
        assert_eq!(node["DERPPort"], 443);
        assert!(v.get("OmitDefaultRegions").is_none());
    }

    #[test]
    fn bad_host_names_and_stun_ports_are_refused() {
        assert!(build(&args("https://derp.example.com")).is_err());
        assert!(build(&args("derp.example.com:443")).is_err());
        assert!(build(&args("")).is_err());
        assert!(parse_stun_port("0").is_err());
        assert_eq!(parse_stun_port("-1"), Ok(-1));
        assert_eq!(parse_stun_port("3478"), Ok(3478));
    }
}
