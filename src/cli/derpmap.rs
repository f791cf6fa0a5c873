//! `derp-relay derpmap`: the DERP map that points Tailscale clients at your
//! relays, in the two shapes operators paste it into: JSON (the value of a
//! Tailscale policy file's `derpMap`, or a map headscale fetches from
//! `derp.urls`) and headscale's YAML file format (`derp.paths`).
//!
//! The map is either one node described by flags or, with `--from`, several
//! regions and nodes described by a small TOML file
//! (`config/derpmap.toml.example`). Field names and omission rules follow
//! Tailscale's `tailcfg.DERPMap` (PROTOCOL.md §11). Getting them wrong fails
//! silently (clients ignore the region), which is why this is generated.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use toml::Spanned;

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Format {
    /// Tailscale's JSON `DERPMap` (policy file `derpMap`, headscale `derp.urls`).
    Json,
    /// headscale's YAML file for `derp.paths`.
    Headscale,
}

/// Region IDs Tailscale leaves to self-hosted relays.
const SELF_HOSTED_IDS: std::ops::RangeInclusive<i64> = 900..=999;

#[derive(clap::Args)]
pub struct Args {
    /// Build the map from a TOML file of regions and nodes (see
    /// config/derpmap.toml.example) instead of the one-node flags.
    #[arg(long, value_name = "FILE.toml", conflicts_with_all = [
        "hostname", "region_id", "region_code", "region_name", "port", "stun_port",
        "node_name", "ipv4", "ipv6", "can_port_80", "insecure_for_tests",
    ])]
    from: Option<PathBuf>,
    /// Public DNS name clients connect to with TLS (the certificate's name).
    #[arg(long, required_unless_present_any = ["from", "tls_self_signed"])]
    hostname: Option<String>,
    /// The relay's own --tls-self-signed setting (read from the same
    /// environment variable): the node is this host, marked InsecureForTests.
    /// Ignored with --from, whose file says per node.
    #[arg(long, value_name = "HOSTNAME", env = "DERP_RELAY_TLS_SELF_SIGNED")]
    tls_self_signed: Option<String>,
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
    /// STUN port clients query over UDP (the relay answers STUN on 3478), or
    /// -1 when no STUN reaches this host.
    #[arg(long, default_value_t = 3478, allow_negative_numbers = true, value_parser = parse_stun_port)]
    stun_port: i32,
    /// Node name [default: the region ID followed by "a", e.g. 900a].
    #[arg(long)]
    node_name: Option<String>,
    /// Fixed public IPv4 address (skips DNS on clients), or "none" for no IPv4.
    #[arg(long, value_parser = parse_ip::<Ipv4Addr>)]
    ipv4: Option<String>,
    /// Fixed public IPv6 address, or "none" for no IPv6.
    #[arg(long, value_parser = parse_ip::<Ipv6Addr>)]
    ipv6: Option<String>,
    /// The node answers http://<IPv4>/generate_204 on port 80 (captive-portal checks).
    #[arg(long)]
    can_port_80: bool,
    /// Clients skip TLS verification of this node (a test relay with a
    /// self-signed certificate; never in production).
    #[arg(long)]
    insecure_for_tests: bool,
    /// Add "omitDefaultRegions": true so clients use only this map (JSON only).
    #[arg(long)]
    omit_default_regions: bool,
    /// Output format.
    #[arg(long, value_enum, default_value = "json")]
    format: Format,
}

fn parse_stun_port(s: &str) -> Result<i32, String> {
    let p = s
        .trim()
        .parse::<i64>()
        .map_err(|_| format!("{s:?} is not a port (1-65535) or -1"))?;
    stun_port(p)
}

fn stun_port(p: i64) -> Result<i32, String> {
    match p {
        -1 => Ok(-1),
        // Tailscale reads 0 as "the default, 3478": say so rather than guess.
        0 => Err("0 means Tailscale's default 3478; write 3478, or -1 for no STUN".into()),
        1..=65535 => Ok(p as i32),
        _ => Err(format!("{p} is not a port (1-65535) or -1")),
    }
}

fn derp_port(p: i64) -> Result<u16, String> {
    match u16::try_from(p) {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("{p} is not a port (1-65535)")),
    }
}

/// An address of the family `T`, or `none`: Tailscale reads any non-address
/// as "do not use this family", and `none` is the conventional spelling.
fn parse_ip<T: FromStr + ToString>(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s == "none" {
        return Ok(s.to_owned());
    }
    s.parse::<T>()
        .map(|ip| ip.to_string())
        .map_err(|_| format!("{s:?} is not an address of this family, nor \"none\""))
}

fn check_host_name(host: &str) -> Result<(), String> {
    if host.is_empty() || host.contains("://") || host.contains('/') || host.contains(' ') {
        return Err(format!(
            "{host:?}: want a bare DNS name like derp.example.com (no scheme, path or port)"
        ));
    }
    if host
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        && host.parse::<Ipv6Addr>().is_err()
    {
        return Err(format!(
            "{host:?}: give the port separately, not in the host name"
        ));
    }
    Ok(())
}

// ------------------------------------------------------------ the map (§11)

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(f: &f64) -> bool {
    *f == 0.0
}

/// `tailcfg.DERPMap`. Optional fields are left out when zero, as Go's
/// `omitempty` does.
#[derive(Serialize)]
struct DerpMap {
    /// Keyed by region ID; serde_json writes integer keys as strings.
    #[serde(rename = "Regions")]
    regions: BTreeMap<u32, Region>,
    /// Lower-case `o`: the one field whose JSON name is not its Go name.
    #[serde(rename = "omitDefaultRegions", skip_serializing_if = "is_false")]
    omit_default_regions: bool,
}

#[derive(Serialize)]
struct Region {
    #[serde(rename = "RegionID")]
    region_id: u32,
    #[serde(rename = "RegionCode")]
    region_code: String,
    #[serde(rename = "RegionName")]
    region_name: String,
    #[serde(rename = "Latitude", skip_serializing_if = "is_zero")]
    latitude: f64,
    #[serde(rename = "Longitude", skip_serializing_if = "is_zero")]
    longitude: f64,
    #[serde(rename = "NoMeasureNoHome", skip_serializing_if = "is_false")]
    no_measure_no_home: bool,
    /// In priority order.
    #[serde(rename = "Nodes")]
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
    #[serde(rename = "CertName", skip_serializing_if = "Option::is_none")]
    cert_name: Option<String>,
    #[serde(rename = "IPv4", skip_serializing_if = "Option::is_none")]
    ipv4: Option<String>,
    #[serde(rename = "IPv6", skip_serializing_if = "Option::is_none")]
    ipv6: Option<String>,
    /// Never 0 here (0 would mean 3478): -1 or a port.
    #[serde(rename = "STUNPort")]
    stun_port: i32,
    #[serde(rename = "STUNOnly", skip_serializing_if = "is_false")]
    stun_only: bool,
    /// Never 0 here (0 would mean 443).
    #[serde(rename = "DERPPort")]
    derp_port: u16,
    #[serde(rename = "CanPort80", skip_serializing_if = "is_false")]
    can_port_80: bool,
    #[serde(rename = "InsecureForTests", skip_serializing_if = "is_false")]
    insecure_for_tests: bool,
}

pub fn run(a: Args) -> Result<(), String> {
    let mut map = match &a.from {
        Some(path) => from_file(path)?,
        None => from_flags(&a)?,
    };
    map.omit_default_regions |= a.omit_default_regions;
    let text = match a.format {
        Format::Json => {
            serde_json::to_string_pretty(&map).map_err(|e| format!("encoding JSON: {e}"))? + "\n"
        }
        Format::Headscale => to_headscale_yaml(&map),
    };
    print!("{text}");
    for note in notes(&map) {
        eprintln!("note: {note}");
    }
    Ok(())
}

/// What an operator should know about a map that is nonetheless valid.
fn notes(map: &DerpMap) -> Vec<String> {
    let mut notes = Vec::new();
    for r in map.regions.values() {
        let derp_nodes = r.nodes.iter().filter(|n| !n.stun_only).count();
        if derp_nodes > 1 {
            notes.push(format!(
                "region {} has {derp_nodes} DERP nodes: they must all mesh with each other, \
                 or clients homed on different nodes cannot reach each other; run each \
                 derp-relay with the same mesh key and --mesh-with {} (or --mesh-dns)",
                r.region_id,
                r.nodes
                    .iter()
                    .filter(|n| !n.stun_only)
                    .map(|n| n.host_name.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            ));
        }
        for n in &r.nodes {
            if n.stun_port == -1 {
                notes.push(format!(
                    "node {}: STUNPort is -1, so clients find their public address through \
                     other regions' STUN",
                    n.name
                ));
            }
            if n.insecure_for_tests {
                notes.push(format!(
                    "node {}: InsecureForTests: clients skip TLS verification; for test setups only",
                    n.name
                ));
            }
        }
    }
    notes
}

fn from_flags(a: &Args) -> Result<DerpMap, String> {
    // A self-signed relay's certificate names its --tls-self-signed host, so
    // that is the name clients must use unless --hostname says otherwise.
    let self_signed = a.tls_self_signed.as_deref().map(str::trim);
    let host = a
        .hostname
        .as_deref()
        .or(self_signed)
        .unwrap_or_default()
        .trim();
    check_host_name(host).map_err(|e| format!("--hostname {e}"))?;
    for (flag, v) in [
        ("--region-code", &a.region_code),
        ("--region-name", &a.region_name),
    ] {
        if v.trim().is_empty() {
            return Err(format!("{flag} must not be empty"));
        }
    }
    let name = match &a.node_name {
        Some(n) if n.trim().is_empty() => return Err("--node-name must not be empty".into()),
        Some(n) => n.trim().to_owned(),
        None => format!("{}a", a.region_id),
    };
    let node = Node {
        name,
        region_id: a.region_id,
        host_name: host.to_owned(),
        cert_name: None,
        ipv4: a.ipv4.clone(),
        ipv6: a.ipv6.clone(),
        stun_port: a.stun_port,
        stun_only: false,
        derp_port: a.port,
        can_port_80: a.can_port_80,
        insecure_for_tests: a.insecure_for_tests || self_signed.is_some(),
    };
    let region = Region {
        region_id: a.region_id,
        region_code: a.region_code.trim().to_owned(),
        region_name: a.region_name.trim().to_owned(),
        latitude: 0.0,
        longitude: 0.0,
        no_measure_no_home: false,
        nodes: vec![node],
    };
    Ok(DerpMap {
        omit_default_regions: false,
        regions: BTreeMap::from([(a.region_id, region)]),
    })
}

// ------------------------------------------------------------ --from FILE.toml

/// The `--from` file. Every value that can be wrong keeps its position, so
/// an error names the line.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMap {
    #[serde(default)]
    omit_default_regions: bool,
    #[serde(default)]
    regions: Vec<Spanned<FileRegion>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRegion {
    id: Spanned<i64>,
    code: Spanned<String>,
    name: Spanned<String>,
    #[serde(default)]
    latitude: f64,
    #[serde(default)]
    longitude: f64,
    #[serde(default)]
    no_measure_no_home: bool,
    /// Tailscale deprecated `Avoid` for `NoMeasureNoHome`; refused with a pointer.
    avoid: Option<Spanned<toml::Value>>,
    #[serde(default)]
    nodes: Vec<Spanned<FileNode>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileNode {
    name: Option<Spanned<String>>,
    host_name: Spanned<String>,
    cert_name: Option<Spanned<String>>,
    ipv4: Option<Spanned<String>>,
    ipv6: Option<Spanned<String>>,
    derp_port: Option<Spanned<i64>>,
    stun_port: Option<Spanned<i64>>,
    #[serde(default)]
    stun_only: bool,
    #[serde(default)]
    can_port_80: bool,
    #[serde(default)]
    insecure_for_tests: bool,
}

fn from_file(path: &Path) -> Result<DerpMap, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse_file(&path.display().to_string(), &text)
}

/// `file`, `line`: `what`, for errors in `--from` files.
struct Located<'a> {
    file: &'a str,
    text: &'a str,
}

impl Located<'_> {
    fn line(&self, span: &Range<usize>) -> usize {
        let end = span.start.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    fn err(&self, span: &Range<usize>, what: impl std::fmt::Display) -> String {
        format!("{}, line {}: {what}", self.file, self.line(span))
    }
}

fn parse_file(file: &str, text: &str) -> Result<DerpMap, String> {
    let at = Located { file, text };
    let parsed: FileMap = toml::from_str(text).map_err(|e| {
        let what = e.message().trim().replace('\n', "; ");
        match e.span() {
            Some(span) => at.err(&span, what),
            None => format!("{file}: {what}"),
        }
    })?;
    if parsed.regions.is_empty() {
        return Err(format!(
            "{file}: no regions; add at least one [[regions]] table with its [[regions.nodes]]"
        ));
    }

    let mut regions = BTreeMap::new();
    let mut region_lines: HashMap<u32, usize> = HashMap::new();
    let mut node_lines: HashMap<String, usize> = HashMap::new();
    for r in parsed.regions {
        let r_span = r.span();
        let r = r.into_inner();
        let id_span = r.id.span();
        let id = *r.id.get_ref();
        if !SELF_HOSTED_IDS.contains(&id) {
            return Err(at.err(
                &id_span,
                format!(
                    "region id {id} is outside 900-999, the IDs Tailscale reserves for \
                     self-hosted regions"
                ),
            ));
        }
        // In range, so it fits.
        let id = id as u32;
        if let Some(first) = region_lines.insert(id, at.line(&id_span)) {
            return Err(at.err(
                &id_span,
                format!("region id {id} is already used on line {first}"),
            ));
        }
        if let Some(avoid) = &r.avoid {
            return Err(at.err(
                &avoid.span(),
                "`avoid` is deprecated in Tailscale; write no_measure_no_home = true",
            ));
        }
        let text_field = |name: &str, v: &Spanned<String>| {
            let s = v.get_ref().trim();
            if s.is_empty() {
                Err(at.err(&v.span(), format!("{name} must not be empty")))
            } else {
                Ok(s.to_owned())
            }
        };
        let region_code = text_field("code", &r.code)?;
        let region_name = text_field("name", &r.name)?;
        if r.nodes.is_empty() {
            return Err(at.err(
                &r_span,
                format!("region {id} has no nodes; add a [[regions.nodes]] table"),
            ));
        }

        let mut nodes = Vec::with_capacity(r.nodes.len());
        for (i, n) in r.nodes.into_iter().enumerate() {
            let n_span = n.span();
            let n = n.into_inner();
            let (name, name_span) = match &n.name {
                Some(v) => (text_field("node name", v)?, v.span()),
                None => (format!("{id}{}", node_letter(i)), n_span.clone()),
            };
            if let Some(first) = node_lines.insert(name.clone(), at.line(&name_span)) {
                return Err(at.err(
                    &name_span,
                    format!(
                        "node name {name:?} is already used on line {first}; names are \
                         unique across all regions"
                    ),
                ));
            }
            let host_name = n.host_name.get_ref().trim().to_owned();
            check_host_name(&host_name)
                .map_err(|e| at.err(&n.host_name.span(), format!("host_name {e}")))?;
            let cert_name = n
                .cert_name
                .as_ref()
                .map(|v| text_field("cert_name", v))
                .transpose()?;
            let ip = |v: &Option<Spanned<String>>,
                      key: &str,
                      parse: fn(&str) -> Result<String, String>| {
                v.as_ref()
                    .map(|v| {
                        parse(v.get_ref()).map_err(|e| at.err(&v.span(), format!("{key} {e}")))
                    })
                    .transpose()
            };
            let ipv4 = ip(&n.ipv4, "ipv4", parse_ip::<Ipv4Addr>)?;
            let ipv6 = ip(&n.ipv6, "ipv6", parse_ip::<Ipv6Addr>)?;
            let derp_port = match &n.derp_port {
                Some(v) => derp_port(*v.get_ref())
                    .map_err(|e| at.err(&v.span(), format!("derp_port {e}")))?,
                None => 443,
            };
            let stun_port = match &n.stun_port {
                Some(v) => stun_port(*v.get_ref())
                    .map_err(|e| at.err(&v.span(), format!("stun_port {e}")))?,
                None => 3478,
            };
            if n.stun_only && stun_port == -1 {
                return Err(at.err(
                    &n_span,
                    format!("node {name:?} is stun_only but has stun_port = -1 (no STUN)"),
                ));
            }
            nodes.push(Node {
                name,
                region_id: id,
                host_name,
                cert_name,
                ipv4,
                ipv6,
                stun_port,
                stun_only: n.stun_only,
                derp_port,
                can_port_80: n.can_port_80,
                insecure_for_tests: n.insecure_for_tests,
            });
        }
        if nodes.iter().all(|n| n.stun_only) {
            return Err(at.err(
                &r_span,
                format!("region {id} has only stun_only nodes: clients could not relay through it"),
            ));
        }
        regions.insert(
            id,
            Region {
                region_id: id,
                region_code,
                region_name,
                latitude: r.latitude,
                longitude: r.longitude,
                no_measure_no_home: r.no_measure_no_home,
                nodes,
            },
        );
    }
    Ok(DerpMap {
        omit_default_regions: parsed.omit_default_regions,
        regions,
    })
}

/// Default node names follow Tailscale's: 900a, 900b, ..., 900z, 900aa, ...
fn node_letter(mut i: usize) -> String {
    let mut s = Vec::new();
    loop {
        s.push(b'a' + (i % 26) as u8);
        if i < 26 {
            break;
        }
        i = i / 26 - 1;
    }
    s.reverse();
    String::from_utf8_lossy(&s).into_owned()
}

// ------------------------------------------------------------ headscale YAML

/// headscale reads its DERP map file into the same Go struct with lower-cased
/// field names (the layout of its `derp-example.yaml`). The fields that
/// example always shows are always written; the others only when set. Strings
/// are written JSON-quoted, which YAML reads as double-quoted scalars, so no
/// name or host can break the document.
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
        if !is_zero(&r.latitude) {
            y.push_str(&format!("    latitude: {}\n", r.latitude));
        }
        if !is_zero(&r.longitude) {
            y.push_str(&format!("    longitude: {}\n", r.longitude));
        }
        if r.no_measure_no_home {
            y.push_str("    nomeasurenohome: true\n");
        }
        y.push_str("    nodes:\n");
        for n in &r.nodes {
            y.push_str(&format!("      - name: {}\n", q(&n.name)));
            y.push_str(&format!("        regionid: {}\n", n.region_id));
            y.push_str(&format!("        hostname: {}\n", q(&n.host_name)));
            if let Some(c) = &n.cert_name {
                y.push_str(&format!("        certname: {}\n", q(c)));
            }
            if let Some(ip) = &n.ipv4 {
                y.push_str(&format!("        ipv4: {}\n", q(ip)));
            }
            if let Some(ip) = &n.ipv6 {
                y.push_str(&format!("        ipv6: {}\n", q(ip)));
            }
            y.push_str(&format!("        stunport: {}\n", n.stun_port));
            y.push_str(&format!("        stunonly: {}\n", n.stun_only));
            y.push_str(&format!("        derpport: {}\n", n.derp_port));
            if n.can_port_80 {
                y.push_str("        canport80: true\n");
            }
            if n.insecure_for_tests {
                y.push_str("        insecurefortests: true\n");
            }
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(host: &str) -> Args {
        Args {
            from: None,
            hostname: Some(host.into()),
            tls_self_signed: None,
            region_id: 900,
            region_code: "myrelay".into(),
            region_name: "My Relay".into(),
            port: 443,
            stun_port: 3478,
            node_name: None,
            ipv4: None,
            ipv6: None,
            can_port_80: false,
            insecure_for_tests: false,
            omit_default_regions: false,
            format: Format::Json,
        }
    }

    #[test]
    fn self_signed_relay_is_marked_insecure() {
        let a = Args {
            hostname: None,
            tls_self_signed: Some("192.0.2.10".into()),
            ..args("unused")
        };
        let v = serde_json::to_value(from_flags(&a).unwrap()).unwrap();
        let node = &v["Regions"]["900"]["Nodes"][0];
        assert_eq!(node["HostName"], "192.0.2.10");
        assert_eq!(node["InsecureForTests"], true);
        let named = Args {
            tls_self_signed: Some("dev.internal".into()),
            ..args("derp.dev.internal")
        };
        let v = serde_json::to_value(from_flags(&named).unwrap()).unwrap();
        assert_eq!(
            v["Regions"]["900"]["Nodes"][0]["HostName"],
            "derp.dev.internal"
        );
        assert_eq!(v["Regions"]["900"]["Nodes"][0]["InsecureForTests"], true);
    }

    #[test]
    fn derpmap_json_has_tailscale_field_names() {
        let v = serde_json::to_value(from_flags(&args("derp.example.com")).unwrap()).unwrap();
        let node = &v["Regions"]["900"]["Nodes"][0];
        assert_eq!(node["Name"], "900a");
        assert_eq!(node["HostName"], "derp.example.com");
        assert_eq!(node["STUNPort"], 3478);
        assert_eq!(node["DERPPort"], 443);
        assert!(node.get("STUNOnly").is_none(), "false is omitted");
        assert!(v.get("omitDefaultRegions").is_none());
    }

    #[test]
    fn derpmap_bad_host_names_and_ports_are_refused() {
        assert!(from_flags(&args("https://derp.example.com")).is_err());
        assert!(from_flags(&args("derp.example.com:443")).is_err());
        assert!(from_flags(&args("")).is_err());
        assert!(parse_stun_port("0").is_err());
        assert!(parse_stun_port("70000").is_err());
        assert_eq!(parse_stun_port("-1"), Ok(-1));
        assert_eq!(parse_stun_port("3478"), Ok(3478));
        assert!(derp_port(0).is_err());
        assert!(derp_port(65536).is_err());
        assert_eq!(parse_ip::<Ipv4Addr>("none"), Ok("none".into()));
        assert!(parse_ip::<Ipv4Addr>("2001:db8::1").is_err());
    }

    #[test]
    fn derpmap_default_node_names_count_in_letters() {
        assert_eq!(node_letter(0), "a");
        assert_eq!(node_letter(1), "b");
        assert_eq!(node_letter(25), "z");
        assert_eq!(node_letter(26), "aa");
    }

    #[test]
    fn derpmap_file_errors_name_the_line() {
        let e = parse_file(
            "m.toml",
            "\n[[regions]]\nid = 5\ncode = \"a\"\nname = \"A\"\n",
        )
        .err()
        .unwrap();
        assert!(e.starts_with("m.toml, line 3: region id 5"), "{e}");
        let e = parse_file(
            "m.toml",
            "[[regions]]\nid = 900\ncode = \"a\"\nname = \"A\"\n",
        )
        .err()
        .unwrap();
        assert!(e.contains("line 1") && e.contains("no nodes"), "{e}");
    }
}
